"""The virtio-scsi wire format (virtio 1.2 §5.6): constants, config space, LUN field,
request/response/event layouts.

Everything here is pure data: no rings, no SCSI semantics. All multi-byte fields are
little endian (VIRTIO_F_VERSION_1 is the only mode we speak).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace

# -- feature bits (bit numbers) specific to virtio-scsi, §5.6.3 ------------------------------

VIRTIO_SCSI_F_INOUT = 0          # bidirectional requests: NOT offered (our disks never need it)
VIRTIO_SCSI_F_HOTPLUG = 1        # TRANSPORT_RESET RESCAN/REMOVED events
VIRTIO_SCSI_F_CHANGE = 2         # PARAM_CHANGE events
VIRTIO_SCSI_F_T10_PI = 3         # protection information: NOT offered

# -- queues ----------------------------------------------------------------------------------

CONTROL_QUEUE = 0
EVENT_QUEUE = 1
FIRST_REQUEST_QUEUE = 2

# -- response codes, §5.6.6.1 (request queue) and §5.6.6.2 (control queue) ---------------------

VIRTIO_SCSI_S_OK = 0
VIRTIO_SCSI_S_FUNCTION_COMPLETE = 0   # the TMF spelling of OK
VIRTIO_SCSI_S_OVERRUN = 1
VIRTIO_SCSI_S_ABORTED = 2
VIRTIO_SCSI_S_BAD_TARGET = 3
VIRTIO_SCSI_S_RESET = 4
VIRTIO_SCSI_S_BUSY = 5
VIRTIO_SCSI_S_TRANSPORT_FAILURE = 6
VIRTIO_SCSI_S_TARGET_FAILURE = 7
VIRTIO_SCSI_S_NEXUS_FAILURE = 8
VIRTIO_SCSI_S_FAILURE = 9
VIRTIO_SCSI_S_FUNCTION_SUCCEEDED = 10
VIRTIO_SCSI_S_FUNCTION_REJECTED = 11
VIRTIO_SCSI_S_INCORRECT_LUN = 12

# -- task attributes (ignored: every request of one queue runs to completion in order) ---------

VIRTIO_SCSI_S_SIMPLE = 0
VIRTIO_SCSI_S_ORDERED = 1
VIRTIO_SCSI_S_HEAD = 2
VIRTIO_SCSI_S_ACA = 3

# -- control queue, §5.6.6.2 -----------------------------------------------------------------

VIRTIO_SCSI_T_TMF = 0
VIRTIO_SCSI_T_AN_QUERY = 1
VIRTIO_SCSI_T_AN_SUBSCRIBE = 2

VIRTIO_SCSI_T_TMF_ABORT_TASK = 0
VIRTIO_SCSI_T_TMF_ABORT_TASK_SET = 1
VIRTIO_SCSI_T_TMF_CLEAR_ACA = 2
VIRTIO_SCSI_T_TMF_CLEAR_TASK_SET = 3
VIRTIO_SCSI_T_TMF_I_T_NEXUS_RESET = 4
VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET = 5
VIRTIO_SCSI_T_TMF_QUERY_TASK = 6
VIRTIO_SCSI_T_TMF_QUERY_TASK_SET = 7

# asynchronous notification classes (event_requested / event_actual bit masks); we support none
VIRTIO_SCSI_EVT_ASYNC_OPERATIONAL_CHANGE = 2
VIRTIO_SCSI_EVT_ASYNC_POWER_MGMT = 4
VIRTIO_SCSI_EVT_ASYNC_EXTERNAL_REQUEST = 8
VIRTIO_SCSI_EVT_ASYNC_MEDIA_CHANGE = 16
VIRTIO_SCSI_EVT_ASYNC_MULTI_HOST = 32
VIRTIO_SCSI_EVT_ASYNC_DEVICE_BUSY = 64

# -- event queue, §5.6.6.3 -------------------------------------------------------------------

VIRTIO_SCSI_T_NO_EVENT = 0
VIRTIO_SCSI_T_TRANSPORT_RESET = 1
VIRTIO_SCSI_T_ASYNC_NOTIFY = 2
VIRTIO_SCSI_T_PARAM_CHANGE = 3
VIRTIO_SCSI_T_EVENTS_MISSED = 0x80000000

VIRTIO_SCSI_EVT_RESET_HARD = 0
VIRTIO_SCSI_EVT_RESET_RESCAN = 1
VIRTIO_SCSI_EVT_RESET_REMOVED = 2

# -- fixed layouts ---------------------------------------------------------------------------

#: VirtIOSCSICmdReq without its cdb: lun[8], id u64, task_attr u8, prio u8, crn u8
CMD_REQ_FIXED = 19
#: VirtIOSCSICmdResp without its sense: sense_len u32, resid u32, status_qualifier u16,
#: status u8, response u8
CMD_RESP_FIXED = 12

#: TMF request: type u32, subtype u32, lun[8], id u64; response: response u8
TMF_REQ = struct.Struct("<II8sQ")
TMF_RESP = struct.Struct("<B")
#: AN request: type u32, lun[8], event_requested u32; response: event_actual u32, response u8
AN_REQ = struct.Struct("<I8sI")
AN_RESP = struct.Struct("<IB")
#: the control request's leading type field, common to every control request
CTRL_TYPE = struct.Struct("<I")
#: struct virtio_scsi_event: event u32, lun[8], reason u32
EVENT = struct.Struct("<I8sI")


def cmd_req_struct(cdb_size: int) -> struct.Struct:
    """The request header for a given cdb_size; the cdb comes out as bytes."""
    return struct.Struct(f"<8sQBBB{cdb_size}s")


def cmd_resp_struct(sense_size: int) -> struct.Struct:
    """The response header for a given sense_size. ``s`` pads short sense with zeros, so one
    pack writes the whole header: the used length may then honestly cover it (§2.7.8.2)."""
    return struct.Struct(f"<IIHBB{sense_size}s")


# -- config space, §5.6.4 --------------------------------------------------------------------

class ConfigError(ValueError):
    """A config space value (or a driver's write to it) the device cannot accept."""


_CONFIG = struct.Struct("<7I2HI")
CONFIG_SIZE = _CONFIG.size  # 36

DEFAULT_SENSE_SIZE = 96
DEFAULT_CDB_SIZE = 32

#: byte ranges of the fields the driver may write (§5.6.4: sense_size and cdb_size)
SENSE_SIZE_OFF = 20
CDB_SIZE_OFF = 24
_WRITABLE = range(SENSE_SIZE_OFF, CDB_SIZE_OFF + 4)

#: the narrowest CDB is 6 bytes (group 0); 255 is the widest a one-byte length allows and
#: what QEMU accepts. sense_size is a u32 on the wire; QEMU caps it below 65536, so do we.
CDB_SIZE_RANGE = range(6, 256)
SENSE_SIZE_RANGE = range(0, 65536)


@dataclass
class ScsiConfig:
    """virtio-scsi config space, virtio 1.2 §5.6.4.

    The constructor and :meth:`unpack` accept any values that fit the wire (the driver side
    reads other devices' config with them); :meth:`validate` is what a device applies.
    """

    num_queues: int
    seg_max: int = 126
    max_sectors: int = 0xFFFF
    cmd_per_lun: int = 128
    event_info_size: int = 16
    sense_size: int = DEFAULT_SENSE_SIZE
    cdb_size: int = DEFAULT_CDB_SIZE
    max_channel: int = 0
    max_target: int = 255
    max_lun: int = 16383

    def pack(self) -> bytes:
        try:
            return _CONFIG.pack(
                self.num_queues, self.seg_max, self.max_sectors, self.cmd_per_lun,
                self.event_info_size, self.sense_size, self.cdb_size,
                self.max_channel, self.max_target, self.max_lun,
            )
        except struct.error as e:
            raise ConfigError(f"config value out of range: {e}") from None

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> ScsiConfig:
        if len(data) != CONFIG_SIZE:
            raise ConfigError(f"virtio-scsi config space is {CONFIG_SIZE} bytes, got {len(data)}")
        return cls(*_CONFIG.unpack(data))

    def validate(self) -> None:
        """Check the values a device can actually serve; raise ConfigError otherwise."""
        self.pack()  # every field fits its wire width
        if self.num_queues < 1:
            raise ConfigError("num_queues must be at least 1")
        if self.seg_max < 1:
            raise ConfigError("seg_max must be at least 1")
        if self.event_info_size < EVENT.size:
            raise ConfigError(f"event_info_size must be at least {EVENT.size}")
        if self.sense_size not in SENSE_SIZE_RANGE:
            raise ConfigError(f"sense_size {self.sense_size} outside 0..65535")
        if self.cdb_size not in CDB_SIZE_RANGE:
            raise ConfigError(f"cdb_size {self.cdb_size} outside 6..255")
        # the LUN field carries the target in one byte and the LUN in 14 bits
        if self.max_channel != 0:
            raise ConfigError("max_channel must be 0 (virtio-scsi has one channel)")
        if self.max_target > 255:
            raise ConfigError("max_target must be at most 255")
        if self.max_lun > 16383:
            raise ConfigError("max_lun must be at most 16383")

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> ScsiConfig:
        """Apply a driver's config-space write; return the new config (self is unchanged).

        Only sense_size and cdb_size are driver-writable (§5.6.4). A write may cover other
        fields too (a driver writing the structure back), as long as it leaves them
        unchanged; changing a read-only field, writing outside the 36 bytes, or writing a
        value the device cannot serve raises ConfigError and changes nothing.
        """
        end = offset + len(data)
        if offset < 0 or end > CONFIG_SIZE:
            raise ConfigError(f"config write [{offset}, {end}) outside the {CONFIG_SIZE} bytes")
        old = self.pack()
        new = old[:offset] + bytes(data) + old[end:]
        for i in range(offset, end):
            if new[i] != old[i] and i not in _WRITABLE:
                raise ConfigError(f"config byte {i} is read-only")
        updated = ScsiConfig.unpack(new)
        if updated.sense_size not in SENSE_SIZE_RANGE:
            raise ConfigError(f"sense_size {updated.sense_size} outside 0..65535")
        if updated.cdb_size not in CDB_SIZE_RANGE:
            raise ConfigError(f"cdb_size {updated.cdb_size} outside 6..255")
        return updated

    def reset_writable(self) -> ScsiConfig:
        """The config after a device reset: writable fields back to their defaults."""
        return replace(self, sense_size=DEFAULT_SENSE_SIZE, cdb_size=DEFAULT_CDB_SIZE)


# -- the LUN field, §5.6.6.1 -----------------------------------------------------------------
#
# byte 0 is 1, byte 1 the target, bytes 2-3 the LUN in SAM form, bytes 4-7 zero. LUN < 256 in
# single-level peripheral addressing (00 LL), otherwise flat space (01HHHHHH LL). Linux's
# driver sends flat space even below 256 (0x40 0x05 for LUN 5), so decode accepts both.

_ZERO4 = b"\0\0\0\0"


def encode_lun(target: int, lun: int) -> bytes:
    """The 8-byte virtio-scsi LUN field for (target, lun)."""
    if not 0 <= target <= 255:
        raise ValueError(f"target {target} outside 0..255")
    if not 0 <= lun <= 16383:
        raise ValueError(f"lun {lun} outside 0..16383")
    if lun < 256:
        return bytes((1, target, 0, lun, 0, 0, 0, 0))
    return bytes((1, target, 0x40 | (lun >> 8), lun & 0xFF, 0, 0, 0, 0))


def decode_lun(field: bytes | bytearray | memoryview) -> tuple[int, int] | None:
    """(target, lun) from an 8-byte LUN field, or None when it is malformed: wrong length,
    byte 0 not 1, a nonzero tail, or an address method other than peripheral (bus 0) and
    flat space."""
    if len(field) != 8 or field[0] != 1 or field[4:8] != _ZERO4:
        return None
    method = field[2]
    if method == 0:                       # peripheral device addressing, bus 0
        return field[1], field[3]
    if method >> 6 == 1:                  # flat space: 14-bit LUN
        return field[1], ((method & 0x3F) << 8) | field[3]
    return None
