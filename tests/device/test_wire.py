"""Config space and the LUN field."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vscsi.device import CONFIG_SIZE, ConfigError, ScsiConfig, decode_lun, encode_lun

# -- config space ----------------------------------------------------------------------------


def test_config_layout_is_the_spec_one() -> None:
    cfg = ScsiConfig(num_queues=4, seg_max=126, max_sectors=0xFFFF, cmd_per_lun=128,
                     event_info_size=16, sense_size=96, cdb_size=32, max_channel=0,
                     max_target=255, max_lun=16383)
    raw = cfg.pack()
    assert len(raw) == CONFIG_SIZE == 36
    assert raw == struct.pack("<IIIIIIIHHI", 4, 126, 0xFFFF, 128, 16, 96, 32, 0, 255, 16383)
    # spot-check offsets against §5.6.4 by hand
    assert raw[0:4] == b"\x04\0\0\0"
    assert raw[20:24] == b"\x60\0\0\0"           # sense_size at 20
    assert raw[24:28] == b"\x20\0\0\0"           # cdb_size at 24
    assert raw[30:32] == b"\xff\0"               # max_target at 30
    assert raw[32:36] == struct.pack("<I", 16383)


def test_config_defaults() -> None:
    cfg = ScsiConfig(num_queues=1)
    assert (cfg.sense_size, cfg.cdb_size, cfg.event_info_size) == (96, 32, 16)
    assert (cfg.max_channel, cfg.max_target, cfg.max_lun) == (0, 255, 16383)
    cfg.validate()


u32 = st.integers(0, 2**32 - 1)
u16 = st.integers(0, 2**16 - 1)


@given(st.tuples(u32, u32, u32, u32, u32, u32, u32, u16, u16, u32))
def test_config_round_trip(values: tuple[int, ...]) -> None:
    cfg = ScsiConfig(*values)
    raw = cfg.pack()
    assert len(raw) == 36
    assert ScsiConfig.unpack(raw) == cfg
    assert ScsiConfig.unpack(raw).pack() == raw


@pytest.mark.parametrize("n", [0, 35, 37])
def test_config_unpack_wrong_size(n: int) -> None:
    with pytest.raises(ConfigError):
        ScsiConfig.unpack(bytes(n))


def test_config_pack_out_of_range() -> None:
    with pytest.raises(ConfigError):
        ScsiConfig(num_queues=1, max_target=70000).pack()


@pytest.mark.parametrize("change", [
    {"num_queues": 0}, {"seg_max": 0}, {"event_info_size": 15}, {"cdb_size": 5},
    {"cdb_size": 256}, {"sense_size": 65536}, {"max_channel": 1}, {"max_target": 256},
    {"max_lun": 16384},
])
def test_config_validate_rejects(change: dict[str, int]) -> None:
    cfg = ScsiConfig(**{"num_queues": 2, **change})
    with pytest.raises(ConfigError):
        cfg.validate()


def test_config_write_sense_and_cdb_size() -> None:
    cfg = ScsiConfig(num_queues=2)
    new = cfg.write(20, struct.pack("<II", 252, 16))
    assert (new.sense_size, new.cdb_size) == (252, 16)
    assert (cfg.sense_size, cfg.cdb_size) == (96, 32)          # the original is untouched
    assert new.num_queues == 2
    # partial write of one byte of cdb_size
    assert cfg.write(24, b"\x10").cdb_size == 16
    # writing the whole structure back unchanged except the writable fields is fine
    whole = bytearray(cfg.pack())
    whole[20:24] = struct.pack("<I", 0)
    assert cfg.write(0, bytes(whole)).sense_size == 0
    assert new.reset_writable() == cfg


@pytest.mark.parametrize("offset,data", [
    (0, b"\x08"),                          # num_queues is read-only
    (16, struct.pack("<I", 32)),           # event_info_size is read-only
    (28, b"\x01\x00"),                     # max_channel
    (34, b"\x00\x00\x01"),                 # straddles the end
    (-1, b"\x00"),
    (24, struct.pack("<I", 300)),          # cdb_size too large
    (24, struct.pack("<I", 2)),            # cdb_size too small
    (20, struct.pack("<I", 1 << 16)),      # sense_size too large
])
def test_config_write_rejected(offset: int, data: bytes) -> None:
    with pytest.raises(ConfigError):
        ScsiConfig(num_queues=2).write(offset, data)


# -- LUN field ---------------------------------------------------------------------------------


@pytest.mark.parametrize("target,lun,field", [
    (0, 0, "0100000000000000"),
    (3, 7, "0103000700000000"),
    (255, 255, "01ff00ff00000000"),
    (1, 256, "0101410000000000"),
    (2, 0x1234, "0102523400000000"),
    (0, 16383, "01007fff00000000"),
])
def test_encode_lun_examples(target: int, lun: int, field: str) -> None:
    assert encode_lun(target, lun).hex() == field
    assert decode_lun(bytes.fromhex(field)) == (target, lun)


def test_decode_accepts_linux_flat_space_below_256() -> None:
    # drivers/scsi/virtio_scsi.c always sets lun[2] = (lun >> 8) | 0x40
    assert decode_lun(bytes.fromhex("0104400500000000")) == (4, 5)


@pytest.mark.parametrize("field", [
    "0001000000000000",      # byte 0 must be 1
    "0201000000000000",
    "0101000000000001",      # nonzero tail
    "0101000001000000",
    "0101010000000000",      # peripheral addressing, bus 1
    "01013f0000000000",
    "0101800000000000",      # logical unit addressing method
    "0101c00000000000",      # extended addressing method
    "01010000000000",        # 7 bytes
    "010100000000000000",    # 9 bytes
    "",
])
def test_decode_malformed(field: str) -> None:
    assert decode_lun(bytes.fromhex(field)) is None


@given(st.integers(0, 255), st.integers(0, 16383))
def test_lun_round_trip(target: int, lun: int) -> None:
    field = encode_lun(target, lun)
    assert len(field) == 8
    assert field[0] == 1 and field[1] == target and field[4:] == bytes(4)
    assert (field[2] == 0) == (lun < 256)
    assert decode_lun(field) == (target, lun)
    assert decode_lun(memoryview(bytearray(field))) == (target, lun)


@given(st.binary(min_size=0, max_size=12))
def test_decode_garbage(field: bytes) -> None:
    out = decode_lun(field)
    if out is None:
        return
    # whatever decodes is a well-formed field, and means what its bytes say
    t, lun = out
    assert len(field) == 8 and field[0] == 1 and field[4:] == bytes(4)
    assert field[1] == t and field[3] == lun & 0xFF
    assert field[2] == 0 or field[2] >> 6 == 1
    # and re-encoding gives the canonical form (single-level below 256)
    canon = encode_lun(t, lun)
    assert decode_lun(canon) == out
    assert canon == field or (field[2] == 0x40 and lun < 256)


@pytest.mark.parametrize("target,lun", [(-1, 0), (256, 0), (0, -1), (0, 16384)])
def test_encode_out_of_range(target: int, lun: int) -> None:
    with pytest.raises(ValueError):
        encode_lun(target, lun)
