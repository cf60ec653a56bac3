# One request of a request queue in C: the virtio-scsi headers, the LUN, and the common
# commands -- READ and WRITE (6/10/12/16) on RAM, null and file LUNs -- with the device's
# counters and task slot. The reference is the Python path (device/device.py
# _serve_request, scsi/commands/block.py _read/_write, device/stats.py QueueCounters): its
# named steps -- locate, look up, execute, respond -- are this file's too.
#
# What this path serves, it serves exactly as the Python path would. Anything else -- a
# layout other than Linux's, a LUN field that is not a present LUN of a plain unit, any
# other opcode, a pending unit attention, a TMF holding the target, a CDB or a buffer the
# Python path would answer with sense or a transport failure, an unaligned O_DIRECT buffer,
# a durable write to a file, an I/O that did not move every byte -- goes to the Python
# path whole, before anything was counted or moved (or after its count was undone): the
# Python path answers it, and only it ever builds sense data.

from vscsi.device.device import VirtioScsiDevice
from vscsi.device import stats as device_stats
from vscsi.device import wire
from vscsi.scsi.backends import FileBackend, NullBackend, RamBackend
from vscsi.scsi.unit import LogicalUnit

# The device's layouts as C constants (device/stats.py, device/wire.py): checked against
# the Python modules when this one is imported.
cdef enum:
    MAX_TARGETS = 256
    BUCKETS = 32
    READ_BYTES = 0
    WRITE_BYTES = 1
    LUN_FAILURES = 2
    HIST = 3
    CMD_REQ_FIXED = 19
    CMD_RESP_FIXED = 12
    FIRST_REQUEST_QUEUE = 2
    TASK_ATTR = 16          # the request header's task_attr byte (lun 8, tag 8, attr)

if ((device_stats.MAX_TARGETS, device_stats.BUCKETS, device_stats.READ_BYTES,
     device_stats.WRITE_BYTES, device_stats.FAILURES, device_stats.HIST, wire.CMD_REQ_FIXED,
     wire.CMD_RESP_FIXED, wire.FIRST_REQUEST_QUEUE)
        != (MAX_TARGETS, BUCKETS, READ_BYTES, WRITE_BYTES, LUN_FAILURES, HIST, CMD_REQ_FIXED,
            CMD_RESP_FIXED, FIRST_REQUEST_QUEUE)):
    raise ImportError("vscsi.dataplane is out of step with vscsi.device's layouts")

cdef enum:
    HANDOVER = -1       # serve(): the Python path takes this chain
    LATER = -2          # serve(): answered later (an io_uring I/O in flight)

cdef enum LunKind:
    LUN_RAM = 1
    LUN_NULL = 2
    LUN_FILE = 3        # synchronous preadv / pwritev (page cache, or O_DIRECT aligned)
    LUN_URING = 4       # asynchronous, through the worker's io_uring

cdef enum:
    STATE_WCE = 0       # the unit's shared state page (scsi/unitstate.py)
    STATE_ATTENTION = 1 # a unit attention or a reservation to look at: the Python path
    SLOT_CANCEL = 1     # a task slot (device/tasks.py SLOT): active, cancel, target, pad,
    HOLD_SIZE = 4       # lun u16, pad u16, tag u64; a target's hold: response, pad, lun


cdef struct Lun:
    int kind
    int target
    int lun
    int block_shift
    uint64_t num_blocks
    bint read_only
    char *ram               # LUN_RAM: the store
    int fd                  # LUN_FILE / LUN_URING
    uint64_t align_mask     # O_DIRECT: offsets, addresses and lengths aligned to this + 1
    uint8_t *state          # the unit's shared state page (WCE, unit attention)
    long row                # its LUN row in the device's counters (u64 index); -1: none
    uint8_t *order          # its row in the device's task sets (ordering.py), or NULL:
                            # per queue u16 started, u16 ORDERED held


cdef struct Command:
    # A READ or WRITE as the fast path understood it.
    bint write
    bint fua
    uint64_t lba
    uint64_t blocks


cdef enum:
    REQ_IOV = 16        # iovecs a request in flight keeps inline (more: allocated)


cdef struct Req:
    # A request answered later by the worker's io_uring (one per head of its ring).
    Lun *lun
    uint64_t tag
    int64_t started
    uint64_t nbytes
    uint64_t offset
    bint write
    bint switched       # its arrival counted a switch
    uint8_t imposed     # the response a TMF imposed (0: none)
    bint busy           # in flight
    bint waited         # a TMF waits for it to finish (CompiledServed.waiters)
    void *owner         # the CompiledServed whose ring it came from
    uint16_t head
    Seg hdr             # the request header and the response header (the Python path
    Seg resp            # rebuilds the chain from these and the iovecs if it takes over)
    int niov
    iovec *iov          # small, or allocated for more than REQ_IOV
    iovec small[REQ_IOV]


cdef class Held:
    """A buffer export held for as long as the compiled plane uses the pointer."""
    cdef Py_buffer buf
    cdef bint held

    def __cinit__(self, obj, bint writable=True):
        PyObject_GetBuffer(obj, &self.buf, PyBUF_WRITABLE if writable else 0)
        self.held = True

    def __dealloc__(self):
        if self.held:
            PyBuffer_Release(&self.buf)

    cdef inline char *ptr(self) noexcept:
        return <char *>self.buf.buf


cdef char *_pointer(obj, list holds) except NULL:
    cdef Held h = Held(obj)
    holds.append(h)
    return h.ptr()


cdef class FastScsi:
    """The fast path of one request queue (task slot ``slot``) of a VirtioScsiDevice, in
    the worker process that serves it. Built when the worker starts serving the queue: the
    LUNs are the device's then (a LUN or filter change restarts the rings, management.py)."""

    cdef readonly bint enabled      # False: every request goes to the Python path
    cdef int slot
    cdef uint32_t req_len
    cdef uint32_t resp_len
    cdef uint32_t cdb_size
    cdef Lun *luns
    cdef int nluns
    cdef int first[MAX_TARGETS + 1]  # LUNs of target t: luns[first[t]:first[t + 1]]
    cdef uint64_t *u64              # the device's shared counters (device/stats.py)
    cdef long requests_base         # requests[q][t] at requests_base + t
    cdef long switch_base
    cdef long change_base
    cdef uint8_t *last_queue        # last_queue[t]: 1 + the queue of t's last request
    cdef uint8_t *inflight          # inflight[t * num_queues + q]
    cdef int num_queues
    cdef uint8_t *tasks             # the task table: holds, then the slots
    cdef long task_off
    cdef uint8_t *order             # the task sets (ordering.py): a row per LUN slot
    cdef long order_row
    cdef iovec *iov                 # scratch iovecs for a synchronous I/O
    cdef int iov_cap
    cdef list holds                 # the buffers whose pointers we keep
    cdef readonly object uring_luns # whether a LUN needs the worker's io_uring

    def __dealloc__(self):
        free(self.luns)
        free(self.iov)

    def __cinit__(self, device, int slot, int iov_cap, bint uring):
        cdef int t, k
        self.holds = []
        self.slot = slot
        self.iov_cap = iov_cap
        self.iov = <iovec *>malloc(iov_cap * sizeof(iovec))
        if self.iov == NULL:
            raise MemoryError()
        self.uring_luns = False
        self.enabled = type(device) is VirtioScsiDevice and device.on_arrival is None
        if not self.enabled:
            return
        config = device.config
        self.req_len = CMD_REQ_FIXED + config.cdb_size
        self.resp_len = CMD_RESP_FIXED + config.sense_size
        self.cdb_size = config.cdb_size
        stats = device.stats
        self.num_queues = stats.num_queues
        self.u64 = <uint64_t *>_pointer(stats.u64, self.holds)
        self.requests_base = slot * MAX_TARGETS
        self.switch_base = stats.num_queues * MAX_TARGETS + slot * MAX_TARGETS
        self.change_base = 2 * stats.num_queues * MAX_TARGETS + slot * MAX_TARGETS
        self.last_queue = <uint8_t *>_pointer(stats.last_queue, self.holds)
        self.inflight = <uint8_t *>_pointer(stats.inflight, self.holds)
        self.tasks = <uint8_t *>_pointer(device.tasks.mem, self.holds)
        self.task_off = device.tasks.slot_offset(slot)
        self.order = <uint8_t *>_pointer(device.task_sets.mem, self.holds)
        self.order_row = device.task_sets.row_size
        units = []
        for t in sorted(device.targets):
            for lun, unit in sorted(getattr(device.targets[t], "luns", {}).items()):
                units.append((t, lun, unit))
        self.luns = <Lun *>calloc(max(1, len(units)), sizeof(Lun))
        if self.luns == NULL:
            raise MemoryError()
        k = 0
        for t in range(MAX_TARGETS + 1):
            self.first[t] = 0
        for t, lun, unit in units:
            if self._describe(&self.luns[k], t, lun, unit, stats, uring):
                self.first[t + 1] = k + 1
                k += 1
        self.nluns = k
        for t in range(1, MAX_TARGETS + 1):     # targets without LUNs: empty ranges
            if self.first[t] < self.first[t - 1]:
                self.first[t] = self.first[t - 1]
        self.first[MAX_TARGETS] = k

    cdef bint _describe(self, Lun *e, int t, int lun, unit, stats, bint uring) except -1:
        """Fill ``e`` for a unit the fast path serves; False for one it leaves to the
        Python path (filters, plugins, NBD, a thread pool, a backend of a subclass)."""
        if type(unit) is not LogicalUnit or len(unit.filters):
            return False
        backend = unit.backend
        kind = type(backend)
        if kind is RamBackend:
            e.kind = LUN_RAM
            e.ram = _pointer(backend.view, self.holds)
        elif kind is NullBackend:
            e.kind = LUN_NULL
        elif kind is FileBackend:
            if backend.uring is not None:
                if not uring:
                    return False
                e.kind = LUN_URING
                self.uring_luns = True
            elif backend.io_pool is not None:
                return False
            else:
                e.kind = LUN_FILE
            e.fd = backend.fd
            e.align_mask = backend.direct_align - 1 if backend.direct else 0
        else:
            return False
        e.target = t
        e.lun = lun
        e.block_shift = unit.block_shift
        e.num_blocks = unit.num_blocks
        e.read_only = unit.read_only
        e.state = <uint8_t *>_pointer(unit._state, self.holds)
        slot = stats.slots.get((t, lun))
        e.row = -1 if slot is None else stats._lun_row(self.slot, slot)
        e.order = NULL
        if slot is not None:
            e.order = self.order + <long>slot * self.order_row
        return True

    def release(self):
        """Let go of every buffer (the queue stops): everything goes to the Python path."""
        self.enabled = False
        self.nluns = 0
        self.holds = []

    # -- look up ------------------------------------------------------------------------------

    cdef Lun *find(self, const uint8_t *field) noexcept:
        """The LUN a request's 8-byte LUN field names, if the fast path serves it
        (wire.decode_lun: byte 0 is 1, bytes 4-7 are 0, peripheral or flat addressing)."""
        cdef int t, lun, k
        if field[0] != 1 or field[4] or field[5] or field[6] or field[7]:
            return NULL
        t = field[1]
        if field[2] == 0:
            lun = field[3]
        elif field[2] >> 6 == 1:
            lun = (field[2] & 0x3F) << 8 | field[3]
        else:
            return NULL
        for k in range(self.first[t], self.first[t + 1]):
            if self.luns[k].lun == lun:
                return &self.luns[k]
        return NULL

    cdef bint decode(self, const uint8_t *cdb, Command *cmd) noexcept:
        """READ / WRITE (6/10/12/16) as scsi/commands/block.py reads them; False for any other
        opcode, a CDB field it would refuse (RDPROTECT / WRPROTECT), or a CDB field
        shorter than the command."""
        cdef uint8_t op = cdb[0]
        cdef uint32_t need
        if op == 0x08 or op == 0x0A:
            need = 6
        elif op == 0x28 or op == 0x2A:
            need = 10
        elif op == 0xA8 or op == 0xAA:
            need = 12
        elif op == 0x88 or op == 0x8A:
            need = 16
        else:
            return False
        if self.cdb_size < need:
            return False
        cmd.write = op == 0x0A or op == 0x2A or op == 0xAA or op == 0x8A
        if need == 6:       # a 21-bit LBA; a length of 0 means 256 blocks
            cmd.lba = (cdb[1] & 0x1F) << 16 | cdb[2] << 8 | cdb[3]
            cmd.blocks = cdb[4] if cdb[4] else 256
            cmd.fua = False
            return True
        if cdb[1] & 0xE0:
            return False
        cmd.fua = (cdb[1] & 0x08) != 0 and cmd.write
        if need == 10:
            cmd.lba = vs_be32(cdb + 2)
            cmd.blocks = vs_be16(cdb + 7)
        elif need == 12:
            cmd.lba = vs_be32(cdb + 2)
            cmd.blocks = vs_be32(cdb + 6)
        else:
            cmd.lba = vs_be64(cdb + 2)
            cmd.blocks = vs_be32(cdb + 10)
        return True

    # -- counting (QueueCounters, written straight into the shared table) ----------------------

    cdef bint arrive(self, int t) noexcept:
        """A request of target t arrived on this queue: requests[q][t], and with several
        queues its in-flight byte, if another queue runs t a switch, and if its last
        request came on another queue a change. Returns whether it counted a switch
        (undo() takes it back; not the change: the request did arrive here, and the Python
        path, counting its arrival again, finds the last queue already this one)."""
        cdef uint8_t *row
        cdef int q
        cdef bint switched = False
        cdef uint8_t last
        self.u64[self.requests_base + t] += 1
        if self.num_queues > 1:
            last = self.last_queue[t]
            if last != self.slot + 1:
                if last:
                    self.u64[self.change_base + t] += 1
                self.last_queue[t] = self.slot + 1
            row = self.inflight + t * self.num_queues
            for q in range(self.num_queues):
                if q != self.slot and row[q]:
                    switched = True
                    self.u64[self.switch_base + t] += 1
                    break
            if row[self.slot] < 255:
                row[self.slot] += 1
        return switched

    cdef void left(self, int t) noexcept:
        cdef uint8_t *cell
        if self.num_queues > 1:
            cell = self.inflight + t * self.num_queues + self.slot
            if cell[0]:
                cell[0] -= 1

    cdef void undo(self, int t, bint switched) noexcept:
        """Take an arrival back (its request goes to the Python path, which counts it)."""
        self.u64[self.requests_base + t] -= 1
        if switched:
            self.u64[self.switch_base + t] -= 1
        self.left(t)

    cdef void done(self, Lun *e, bint failed, uint64_t read, uint64_t written,
                   int64_t ns) noexcept:
        """One command of LUN ``e`` ended after ``ns`` (QueueCounters.done)."""
        cdef int bucket
        cdef uint64_t *row
        self.left(e.target)
        if e.row < 0:
            return
        row = self.u64 + e.row
        bucket = vs_bit_length(<uint64_t>(ns // 1000) if ns > 0 else 0)
        if bucket > BUCKETS - 1:
            bucket = BUCKETS - 1
        row[HIST + bucket] += 1
        row[READ_BYTES] += read
        row[WRITE_BYTES] += written
        if failed:
            row[LUN_FAILURES] += 1

    # -- the task set (device/ordering.py): SIMPLE commands while no ORDERED one is held ----

    cdef bint ordered_held(self, Lun *e) noexcept:
        cdef int q
        if e.order == NULL:
            return False
        for q in range(self.num_queues):
            if vs_le16(e.order + 4 * q + 2):
                return True
        return False

    cdef void started(self, Lun *e, int change) noexcept:
        """This queue's count of the LUN's commands started and not completed."""
        cdef uint8_t *cell
        if e.order != NULL:
            cell = e.order + 4 * self.slot
            vs_put_le16(cell, <uint16_t>(vs_le16(cell) + change))

    # -- the task slot (device/tasks.py: what TaskTable.begin / end do) ------------------------

    cdef bint begin(self, Lun *e, uint64_t tag) noexcept:
        """Publish the running task; False if a TMF holds its LUN (slot released)."""
        cdef uint8_t *slot = self.tasks + self.task_off
        cdef uint8_t *hold = self.tasks + e.target * HOLD_SIZE
        slot[0] = 0
        slot[1] = 0
        slot[2] = <uint8_t>e.target
        vs_put_le16(slot + 4, <uint16_t>e.lun)
        vs_put_le64(slot + 8, tag)
        vs_wmb()
        slot[0] = 1                                 # active, published last
        vs_mb()
        if hold[0] and (vs_le16(hold + 2) == 0xFFFF or vs_le16(hold + 2) == e.lun):
            slot[0] = 0
            return False
        return True

    cdef uint8_t end(self) noexcept:
        """Release the slot; the response a TMF imposed meanwhile (0: none)."""
        cdef uint8_t *slot = self.tasks + self.task_off
        cdef uint8_t imposed = slot[SLOT_CANCEL]
        slot[0] = 0
        return imposed

    # -- respond ---------------------------------------------------------------------------------

    cdef inline void respond(self, char *resp, uint64_t resid, uint8_t response) noexcept:
        """The response header: no sense, GOOD (or a transport ``response`` with nothing
        else), the residual; the whole header is written (sense padded with zeros)."""
        memset(resp, 0, self.resp_len)
        vs_put_le32(resp + 4, <uint32_t>resid)
        resp[11] = <char>response

    # -- one request ------------------------------------------------------------------------------

    cdef int serve(self, CChain *c, Req *later) except -3:
        """Serve the chain ``c``: the bytes written into its writable part, HANDOVER (the
        Python path takes it, nothing was done), or LATER (``later`` holds it: an
        io_uring I/O is in flight)."""
        cdef Seg *hdr
        cdef Seg *resp
        cdef Seg *data
        cdef int ndata, k, niov
        cdef Lun *e
        cdef Command cmd
        cdef uint64_t nbytes, have, tag, offset, moved
        cdef int64_t started
        cdef ssize_t done
        cdef bint switched
        cdef uint8_t imposed
        if not self.enabled:
            return HANDOVER
        # locate: Linux's layout, each header a descriptor of its own
        if c.nread < 1 or c.nseg - c.nread < 1:
            return HANDOVER
        hdr = &c.segs[0]
        resp = &c.segs[c.nread]
        if hdr.len != self.req_len or resp.len != self.resp_len:
            return HANDOVER
        # look up
        e = self.find(<uint8_t *>hdr.ptr)
        if e == NULL or not self.decode(<uint8_t *>hdr.ptr + CMD_REQ_FIXED, &cmd):
            return HANDOVER
        if (<uint8_t *>hdr.ptr)[TASK_ATTR] != 0 or self.ordered_held(e):
            return HANDOVER     # not SIMPLE, or an ORDERED command holds the task set
        if cmd.write:       # data-out only (a WRITE with data-in is the Python path's)
            if c.nseg - c.nread != 1:
                return HANDOVER
            data = &c.segs[1]
            ndata = c.nread - 1
        else:
            if c.nread != 1:
                return HANDOVER
            data = &c.segs[c.nread + 1]
            ndata = c.nseg - c.nread - 1
        have = 0
        for k in range(ndata):
            have += data[k].len
        nbytes = cmd.blocks << e.block_shift
        if (cmd.blocks == 0 or nbytes > have or e.state[STATE_ATTENTION]
                or (cmd.write and e.read_only)
                or cmd.lba > e.num_blocks or cmd.blocks > e.num_blocks - cmd.lba
                or self.tasks[e.target * HOLD_SIZE]):
            return HANDOVER
        if cmd.write and (e.kind == LUN_FILE or e.kind == LUN_URING) and (
                cmd.fua or not e.state[STATE_WCE]):
            return HANDOVER         # durable writes: write + flush, the Python path's
        offset = cmd.lba << e.block_shift
        if offset & e.align_mask:
            return HANDOVER
        niov = 0
        if e.kind == LUN_FILE or e.kind == LUN_URING:
            niov = self.iovecs(data, ndata, nbytes, e.align_mask)
            if niov < 0:
                return HANDOVER     # unaligned O_DIRECT (the Python path bounces it)
        tag = vs_le64(hdr.ptr + 8)
        switched = self.arrive(e.target)
        # execute, with the task published in the queue's slot
        if not self.begin(e, tag):
            self.undo(e.target, switched)
            return HANDOVER
        self.started(e, 1)
        started = vs_now_ns()
        if e.kind == LUN_URING:
            if later == NULL or have != nbytes:
                self.end()
                self.started(e, -1)
                self.undo(e.target, switched)
                return HANDOVER
            later.iov = later.small
            if niov > REQ_IOV:
                later.iov = <iovec *>malloc(niov * sizeof(iovec))
                if later.iov == NULL:
                    later.iov = later.small
                    self.end()
                    self.started(e, -1)
                    self.undo(e.target, switched)
                    return HANDOVER
            later.lun = e
            later.tag = tag
            later.started = started
            later.nbytes = nbytes
            later.write = cmd.write
            later.switched = switched
            later.hdr = hdr[0]
            later.resp = resp[0]
            later.niov = niov
            memcpy(later.iov, self.iov, niov * sizeof(iovec))
            later.offset = offset
            later.imposed = self.end()
            return LATER
        if e.kind == LUN_RAM:
            self.copy(e.ram + offset, data, ndata, nbytes, cmd.write)
        elif e.kind == LUN_NULL:
            if not cmd.write:
                self.zero(data, ndata, nbytes)
        else:
            if cmd.write:
                done = pwritev(e.fd, self.iov, niov, offset)
            else:
                done = preadv(e.fd, self.iov, niov, offset)
            if done != <ssize_t>nbytes:
                # short or failed: the Python path does it again and says what happened
                self.end()
                self.started(e, -1)
                self.undo(e.target, switched)
                return HANDOVER
        imposed = self.end()
        self.started(e, -1)
        if imposed:       # a TMF aborted / reset it while it ran
            self.done(e, True, 0, 0, vs_now_ns() - started)
            self.respond(resp.ptr, 0, imposed)
            return self.resp_len
        moved = 0 if cmd.write else nbytes
        self.done(e, False, moved, nbytes if cmd.write else 0, vs_now_ns() - started)
        self.respond(resp.ptr, have - nbytes, 0)
        return self.resp_len + moved

    cdef void copy(self, char *store, Seg *data, int ndata, uint64_t nbytes,
                   bint write) noexcept:
        cdef int k
        cdef uint64_t n
        for k in range(ndata):
            if not nbytes:
                return
            n = data[k].len if data[k].len < nbytes else nbytes
            if write:
                memcpy(store, data[k].ptr, n)
            else:
                memcpy(data[k].ptr, store, n)
            store += n
            nbytes -= n

    cdef void zero(self, Seg *data, int ndata, uint64_t nbytes) noexcept:
        cdef int k
        cdef uint64_t n
        for k in range(ndata):
            if not nbytes:
                return
            n = data[k].len if data[k].len < nbytes else nbytes
            memset(data[k].ptr, 0, n)
            nbytes -= n

    cdef int iovecs(self, Seg *data, int ndata, uint64_t nbytes,
                    uint64_t align_mask) noexcept:
        """The data buffers, trimmed to ``nbytes``, as iovecs in self.iov; -1 if there are
        more than it holds or, with O_DIRECT, one is not aligned."""
        cdef int k, n = 0
        cdef uint64_t take
        for k in range(ndata):
            if not nbytes:
                break
            if n == self.iov_cap:
                return -1
            take = data[k].len if data[k].len < nbytes else nbytes
            if align_mask and ((<uint64_t>data[k].ptr) & align_mask or take & align_mask):
                return -1
            self.iov[n].iov_base = data[k].ptr
            self.iov[n].iov_len = take
            nbytes -= take
            n += 1
        return n
