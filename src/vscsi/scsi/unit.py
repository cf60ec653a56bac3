"""Logical units and targets: the entry points of the SCSI layer.

LogicalUnit.execute is called once per request from the device's queue workers, which
may be forked processes, on behalf of one of several I_T nexuses (the VMs of one `vscsi
serve`): the unit's mutable state -- WCE, unit attentions per nexus, persistent and SPC-2
reservations -- lives in a shared page (unitstate.py) so that what one worker changes holds
for all of them at once.
"""

from __future__ import annotations

import logging
import mmap
from collections.abc import Callable, Iterable, Sequence

from vscsi.memory.sgl import Views, total

from .backends import BlockBackend, open_backend
from .commands import Handler, build_dispatch, build_missing_lun_dispatch, request_sense_response
from .commands.atomic import MAX_COMPARE_AND_WRITE_BLOCKS, offers_compare_and_write
from .constants import (
    ASC_INTERNAL_TARGET_FAILURE,
    ASC_INVALID_COMMAND_OPERATION_CODE,
    ASC_INVALID_FIELD_IN_CDB,
    ASC_LOGICAL_UNIT_NOT_SUPPORTED,
    CHECK_CONDITION,
    HARDWARE_ERROR,
    ILLEGAL_REQUEST,
    INQUIRY,
    REPORT_LUNS,
    REQUEST_SENSE,
    RESERVATION_CONFLICT,
    TYPE_DISK,
    UNIT_ATTENTION,
)
from .filters import Command, FilterStack
from .pages import Identity, naa_locally_assigned, standard_inquiry, vpd_pages
from .pending import Pending, Scheduler
from .plugin import load_plugin
from .prfile import PrFile
from .reservations import allowed, command_field
from .sense import ScsiError, ScsiResult, check_condition, fixed_sense
from .spec import MAX_LUN, LunSpec, LunSpecError
from .unitstate import MAX_NEXUS, UnitState

log = logging.getLogger("vscsi.scsi")

# commands that change the medium without a data-out transfer of their own, or besides it
# (a reservation that lets a nexus read refuses it these)
MEDIUM_CHANGING = frozenset({0x04, 0x35, 0x91, 0x41, 0x93, 0x42, 0x89, 0x1B})

# Limits advertised in the block limits VPD page, in bytes (converted to blocks per unit).
# 32 MiB matches virtio-scsi's default max_sectors (0xFFFF sectors); an UNMAP or WRITE SAME
# of 1 GiB is one fallocate / madvise call, cheap enough to do inline.
MAX_TRANSFER_BYTES = 32 << 20
MAX_UNMAP_BYTES = 1 << 30
MAX_UNMAP_DESCRIPTORS = 64
MAX_WRITE_SAME_BYTES = 1 << 30

# The shared state page's ATTENTION byte (unitstate.py): nonzero when a unit attention or
# a reservation must be looked at before a command runs.
_ATTENTION = UnitState.ATTENTION
_STATE_SIZE = 16

# SAM-5 5.11: the unit attention a LOGICAL UNIT RESET leaves behind, and the one for a
# target-wide reset.
UA_LUN_RESET = (0x29, 0x03)         # BUS DEVICE RESET FUNCTION OCCURRED
UA_RESET = (0x29, 0x00)             # POWER ON, RESET, OR BUS DEVICE RESET OCCURRED


class _Unit:
    """What a logical unit and the stand-in for a missing LUN share: :meth:`execute`,
    which dispatches a CDB by opcode to the class's handler table and is the one place a
    failure becomes a ScsiResult, and the pending unit attention it reports first."""

    _handlers: list[Handler]
    _cdb_lengths: list[int]     # the shortest CDB each opcode's handler accepts
    _state: mmap.mmap | bytes   # the shared page (its ATTENTION byte: see unitstate.py)
    _empty_cdb = ASC_INVALID_COMMAND_OPERATION_CODE     # the ASC/ASCQ a CDB of 0 bytes gets
    report_lun_ids: Sequence[int]
    #: the I_T nexus of the command being executed (the PERSISTENT RESERVE handlers ask)
    nexus = 0

    def execute(self, cdb: bytes, data_out: Views, data_in: Views, nexus: int = 0
                ) -> ScsiResult | Pending:
        """Run one command from ``nexus``. Never raises: every failure is a ScsiResult. A
        Pending comes back only once set_scheduler gave the unit a loop and its backend
        does I/O asynchronously (READ, WRITE, SYNCHRONIZE CACHE)."""
        try:
            self.nexus = nexus
            if self._state[_ATTENTION]:
                return self._with_attention(cdb, data_out, data_in, nexus)
            return self._dispatch(cdb, data_out, data_in)
        except ScsiError as e:
            return e.result()
        except Exception:
            if len(cdb) == 0:
                return check_condition(ILLEGAL_REQUEST, self._empty_cdb)
            log.exception("internal error executing CDB %s", bytes(cdb).hex())
            return check_condition(HARDWARE_ERROR, ASC_INTERNAL_TARGET_FAILURE)

    def _dispatch(self, cdb: bytes, data_out: Views, data_in: Views
                  ) -> ScsiResult | Pending:
        """The command's handler, once its CDB is long enough for it (ScsiError)."""
        op = cdb[0]
        if len(cdb) < self._cdb_lengths[op]:
            raise ScsiError(ILLEGAL_REQUEST, ASC_INVALID_FIELD_IN_CDB)
        return self._handlers[op](self, cdb, data_out, data_in)

    def _with_attention(self, cdb: bytes, data_out: Views, data_in: Views, nexus: int
                        ) -> ScsiResult | Pending:
        """The command when the unit's state asks for a look first (LogicalUnit: unit
        attentions, reservations)."""
        return self._dispatch(cdb, data_out, data_in)

    @staticmethod
    def _report_unit_attention(cdb: bytes, data_in: Views, asc_ascq: tuple[int, int]
                               ) -> ScsiResult:
        """SPC-4 5.14: a pending unit attention is reported (and so cleared) by this
        command: as REQUEST SENSE parameter data, otherwise as CHECK CONDITION instead of
        executing it."""
        sense = fixed_sense(UNIT_ATTENTION, *asc_ascq)
        if cdb[0] == REQUEST_SENSE and len(cdb) >= 6:
            return request_sense_response(cdb, sense, data_in)
        return ScsiResult(CHECK_CONDITION, sense)


class _Counted(Pending):
    """A Pending that runs ``ended`` once the command it stands for has finished (its
    result is in, or an abort ended it), and is that command for everyone else."""

    __slots__ = ("inner", "ended")

    def __init__(self, inner: Pending, ended: Callable[[], None]) -> None:
        super().__init__(on_abort=lambda _self: inner.abort())
        self.inner = inner
        self.ended = ended
        inner.then(self._finished)

    def _finished(self, result: ScsiResult) -> None:
        self.ended()
        self.finish(result)


class LogicalUnit(_Unit):
    """A direct-access block device (SBC-3) over a BlockBackend."""

    _handlers, _cdb_lengths = build_dispatch()

    def __init__(
        self,
        backend: BlockBackend,
        *,
        block_size: int = 512,
        read_only: bool = False,
        serial: str | None = None,
        lun_id: int = 0,
        target_id: int = 0,
        product: str | None = None,
    ) -> None:
        if block_size < 512 or block_size & (block_size - 1):
            raise ValueError(f"block size {block_size} is not a power of two >= 512")
        self.backend = backend
        self.block_size = block_size
        self.block_shift = block_size.bit_length() - 1
        self.num_blocks = backend.size // block_size
        if self.num_blocks == 0:
            raise ValueError(f"backend of {backend.size} bytes holds no {block_size}-byte block")
        self.read_only = read_only
        self.lun_id = lun_id
        self.target_id = target_id
        self.serial = serial if serial is not None else f"vscsi-{target_id}-{lun_id}"
        # The LUN list REPORT LUNS gives when the unit is used on its own; a ScsiTarget
        # replaces it with all of its LUNs.
        self.report_lun_ids: Sequence[int] = (lun_id,)
        self.zero_block = bytes(block_size)

        self.max_transfer_blocks = min(0xFFFFFFFF, MAX_TRANSFER_BYTES // block_size)
        self.max_unmap_blocks = min(0xFFFFFFFF, MAX_UNMAP_BYTES // block_size)
        self.max_unmap_descriptors = MAX_UNMAP_DESCRIPTORS
        self.max_write_same_blocks = MAX_WRITE_SAME_BYTES // block_size

        key = f"serial/{serial}" if serial is not None else f"addr/{target_id}/{lun_id}"
        self.identity = Identity(
            peripheral=TYPE_DISK,
            product=product or f"{backend.kind.upper()} DISK",
            serial=self.serial,
            naa=naa_locally_assigned(key),
            block_size=block_size,
            max_transfer_blocks=self.max_transfer_blocks,
            max_unmap_blocks=self.max_unmap_blocks,
            max_unmap_descriptors=self.max_unmap_descriptors,
            max_write_same_blocks=self.max_write_same_blocks,
            max_compare_and_write_blocks=(MAX_COMPARE_AND_WRITE_BLOCKS
                                          if offers_compare_and_write(backend) else 0),
        )
        self.inquiry_data = standard_inquiry(TYPE_DISK, self.identity.product)
        self.vpd = vpd_pages(self.identity)

        # Filters in front of execute() (docs/filters.md); empty: submit() is execute().
        self.filters = FilterStack(self._execute_command, target=target_id, lun=lun_id,
                                   block_size=block_size)

        # The shared page (survives fork()); the compiled data plane reads its WCE and
        # ATTENTION bytes through ``_state``.
        self.state = UnitState()
        self._state = self.state.page
        #: the I_T nexuses that may send commands (the VMs of one `vscsi serve`): unit
        #: attentions meant for all go to each; reservations name them (transport_ids)
        self.nexuses = 1
        self.transport_ids: Sequence[bytes] = ()
        #: where the persistent reservations are kept across restarts (APTPL), if anywhere
        self.pr_store: PrFile | None = None
        # No power-on unit attention: initiators that never reset (our own driver, fio
        # jobs) would otherwise see one CHECK CONDITION per LUN at start.
        self.reset(unit_attention=None)

    # -- state ---------------------------------------------------------------------------

    @property
    def wce(self) -> bool:
        """Write cache enabled: when False every write is flushed before it completes."""
        return self.state.wce

    @wce.setter
    def wce(self, value: bool) -> None:
        self.state.wce = value

    def set_unit_attention(self, asc_ascq: tuple[int, int] | None) -> None:
        """Make the next command (other than INQUIRY / REPORT LUNS) of every nexus end in
        CHECK CONDITION, UNIT ATTENTION with this ASC/ASCQ; None clears every pending one.
        E.g. (0x2A, 0x09) CAPACITY DATA HAS CHANGED after resizing a backend."""
        with self.state.locked():
            if asc_ascq is None:
                self.state.clear_unit_attentions()
            else:
                for nexus in range(self.nexuses):
                    self.state.add_unit_attention(nexus, asc_ascq)

    @property
    def unit_attention(self) -> tuple[int, int] | None:
        """The oldest unit attention pending for nexus 0 (not reported by asking)."""
        pending = self.state.unit_attentions(0)
        return pending[0] if pending else None

    def _with_attention(self, cdb: bytes, data_out: Views, data_in: Views, nexus: int
                        ) -> ScsiResult | Pending:
        """Under the state lock: report a unit attention pending for this nexus, or
        refuse a command a reservation does not allow it (RESERVATION CONFLICT); else run
        it. A write under reservations is counted in flight for its nexus until it ends,
        so that a PREEMPT AND ABORT can wait for the writes of the nexuses it removes:
        none of theirs lands after it completed (reserve.py)."""
        op = cdb[0]
        with self.state.locked():
            if op != INQUIRY and op != REPORT_LUNS:
                ua = self.state.take_unit_attention(nexus)
                if ua is not None:
                    return self._report_unit_attention(cdb, data_in, ua)
            record = self.state.load()
            counted = False
            if record.active:
                writes = op in MEDIUM_CHANGING or total(data_out) > 0
                if not allowed(record, nexus, op, command_field(cdb), writes):
                    return ScsiResult(RESERVATION_CONFLICT)
                counted = writes and nexus < self.nexuses
                if counted:
                    self.state.writes_started(nexus)
        if not counted:
            return self._dispatch(cdb, data_out, data_in)
        try:
            result = self._dispatch(cdb, data_out, data_in)
        except BaseException:
            self._writes_ended(nexus)
            raise
        if isinstance(result, Pending):
            return _Counted(result, lambda: self._writes_ended(nexus))
        self._writes_ended(nexus)
        return result

    def _writes_ended(self, nexus: int) -> None:
        with self.state.locked():
            self.state.writes_ended(nexus)

    def share(self, transport_ids: Sequence[bytes], pr_store: PrFile | None = None) -> None:
        """Serve the unit to several I_T nexuses, named by ``transport_ids`` (nexus k is
        the k-th), keeping APTPL reservations in ``pr_store``: what it holds is restored
        now (the nexuses it names that are not among ours lose their registration)."""
        if not 1 <= len(transport_ids) <= MAX_NEXUS:
            raise ValueError(f"{len(transport_ids)} nexuses: 1..{MAX_NEXUS} supported")
        self.nexuses = len(transport_ids)
        self.transport_ids = tuple(transport_ids)
        self.pr_store = pr_store
        if pr_store is None:
            return
        record = pr_store.load(self.transport_ids)
        if record is not None:
            with self.state.locked():
                self.state.store(record)

    def reset(self, unit_attention: tuple[int, int] | None = UA_LUN_RESET) -> None:
        """LOGICAL UNIT RESET: mode parameters go back to their defaults (we have no saved
        ones), an SPC-2 reservation is released (persistent ones stay: SPC-4 5.13.1), and a
        unit attention condition is established, as SAM-5 requires, so the initiator
        learns that its mode settings are gone. Pass None to reset silently."""
        self.wce = True
        with self.state.locked():
            record = self.state.load()
            if record.legacy is not None:
                record.legacy = None
                self.state.store(record)
        self.set_unit_attention(unit_attention)

    @property
    def capacity(self) -> int:
        """Bytes addressable through this unit."""
        return self.num_blocks * self.block_size

    def set_scheduler(self, scheduler: Scheduler | None) -> None:
        """The loop of the worker process that serves this unit: filters and backends
        that answer later wait on it (a file with threads or aio=io_uring completes its
        I/O there). None makes everything synchronous again."""
        self.filters.scheduler = scheduler
        setter = getattr(self.backend, "set_scheduler", None)
        if setter is not None:
            setter(scheduler)

    def submit(self, cdb: bytes, data_out: Views, data_in: Views, queue: int = 0,
               nexus: int = 0, tag: int = 0) -> ScsiResult | Pending:
        """execute() behind the unit's filters: the result may come later (a Pending).
        ``queue`` and ``tag`` (the initiator's task tag) are what filters see of the
        transport."""
        if not self.filters:
            return self.execute(cdb, data_out, data_in, nexus)
        return self.filters.submit(cdb, data_out, data_in, queue, nexus, tag)

    def _execute_command(self, cmd: Command) -> ScsiResult | Pending:
        return self.execute(cmd.cdb, cmd.data_out, cmd.data_in, cmd.nexus)

    def close(self) -> None:
        self.filters.close()
        self.backend.close()
        self.state.close()

    def __repr__(self) -> str:
        return (f"LogicalUnit({self.backend!r}, block_size={self.block_size}, "
                f"read_only={self.read_only}, lun_id={self.lun_id})")


class _MissingLun(_Unit):
    """What answers for a LUN a target does not have (commands.build_missing_lun_dispatch).
    It never has a unit attention."""

    _handlers, _cdb_lengths = build_missing_lun_dispatch()
    _state = bytes(_STATE_SIZE)
    _empty_cdb = ASC_LOGICAL_UNIT_NOT_SUPPORTED

    def __init__(self, report_lun_ids: Sequence[int]) -> None:
        self.report_lun_ids = report_lun_ids


class ScsiTarget:
    """One SCSI target: its logical units by LUN, REPORT LUNS from any LUN, and the
    answers SPC-4 prescribes for a LUN that is not there."""

    def __init__(self, luns: dict[int, LogicalUnit]) -> None:
        for lun in luns:
            if not 0 <= lun <= MAX_LUN:
                raise ValueError(f"LUN {lun} out of range 0..{MAX_LUN}")
        self.luns = dict(luns)
        self.lun_ids: tuple[int, ...] = tuple(sorted(self.luns))
        for lu in self.luns.values():
            lu.report_lun_ids = self.lun_ids
        self._missing = _MissingLun(self.lun_ids)

    def __contains__(self, lun: object) -> bool:
        return lun in self.luns

    def execute(self, lun: int, cdb: bytes, data_out: Views, data_in: Views,
                nexus: int = 0) -> ScsiResult | Pending:
        """Run one command on ``lun``, present or not (SPC-4 answers for a missing one).
        Never raises; a Pending only as LogicalUnit.execute says."""
        unit = self.luns.get(lun)
        if unit is not None:
            return unit.execute(cdb, data_out, data_in, nexus)
        return self._missing.execute(cdb, data_out, data_in, nexus)

    def submit(self, lun: int, cdb: bytes, data_out: Views, data_in: Views, queue: int = 0,
               nexus: int = 0, tag: int = 0) -> ScsiResult | Pending:
        """execute() through the unit's filter stack (see LogicalUnit.submit)."""
        unit = self.luns.get(lun)
        if unit is None:
            return self._missing.execute(cdb, data_out, data_in, nexus)
        return unit.submit(cdb, data_out, data_in, queue, nexus, tag)

    def lun_reset(self, lun: int) -> None:
        """LOGICAL UNIT RESET of one LUN (a missing LUN has nothing to reset)."""
        unit = self.luns.get(lun)
        if unit is not None:
            unit.reset()

    def reset(self) -> None:
        """TARGET RESET / I_T NEXUS RESET: every unit."""
        for unit in self.luns.values():
            unit.reset(UA_RESET)

    def close(self) -> None:
        for unit in self.luns.values():
            unit.close()


def open_unit(spec: LunSpec) -> LogicalUnit:
    """The logical unit a spec describes, its backend opened (a built-in one, or a
    python: plugin); LunSpecError for what the user can fix."""
    backend = load_plugin(spec) if spec.kind == "python" else open_backend(spec)
    try:
        return LogicalUnit(backend, block_size=spec.block_size, read_only=spec.read_only,
                           serial=spec.serial, lun_id=spec.lun, target_id=spec.target)
    except BaseException:
        backend.close()
        raise


def build_targets(specs: Iterable[LunSpec]) -> dict[int, ScsiTarget]:
    """Open every spec's backend and group the units into targets.

    Duplicate (target, LUN) pairs are refused before anything is opened; if a backend
    fails to open, the ones already open are closed again.
    """
    specs = list(specs)
    seen: dict[tuple[int, int], LunSpec] = {}
    for spec in specs:
        key = (spec.target, spec.lun)
        if key in seen:
            raise LunSpecError(f"LUN {spec.target}:{spec.lun} is given twice "
                               f"({seen[key]} and {spec})")
        seen[key] = spec

    units: dict[int, dict[int, LogicalUnit]] = {}
    opened: list[LogicalUnit] = []
    try:
        for spec in specs:
            unit = open_unit(spec)
            opened.append(unit)
            units.setdefault(spec.target, {})[spec.lun] = unit
    except BaseException:
        for unit in opened:
            unit.close()
        raise
    return {t: ScsiTarget(units[t]) for t in sorted(units)}
