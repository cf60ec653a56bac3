# The device side of a virtqueue, compiled: the interface of vscsi.virtio.DeviceRing
# (pop, fill, flush, push, needs_notify, set_notify, has_available, serve_available,
# remap), so the Python drain() and the ring tests drive either, plus take(), the C form of
# pop() the request loop uses: a chain becomes an array of segments, not memoryviews.
#
# A compiled ring adopts a Python ring (``SplitRing.adopt(DeviceRing(...))``): the
# Python constructor stays the one place that validates the addresses, resumes from the
# vhost-user base and recovers the in-flight region after a crash; the compiled ring takes
# its state from there and the Python object is not used again.
#
# Every rule here is the Python ring's, checked in the same order (virtio/device.py,
# virtio/packed.py and virtio/inflight.py are the reference): tests/virtio runs its ring
# tests on both, and tests/dataplane compares them on random rings.

from vscsi.memory import GuestMemoryError
from vscsi.virtio import Chain, ChainError, RingBroken


cdef enum:
    F_NEXT = 1
    F_WRITE = 2
    F_INDIRECT = 4
    DESC_SIZE = 16


cdef struct CChain:
    uint16_t head       # the head index (split) or Buffer ID (packed)
    int nseg            # segments taken; segs[:nread] readable, the rest writable
    int nread
    const char *why     # not NULL: a bad chain (its head was consumed: fill(head, 0))
    Seg *segs           # the ring's scratch array (valid until the next take)


cdef class Ring:
    """What both compiled ring kinds share."""

    cdef MemoryTable mt
    cdef readonly object addrs
    cdef readonly int size
    cdef readonly bint event_idx
    cdef readonly uint32_t max_indirect
    cdef bint _broken
    cdef public long inflight       # taken (bad chains included) minus filled
    cdef public long taken          # chains taken, ever (workers count requests with it)
    cdef object _tracker            # the Python in-flight tracker it adopted (or None)
    cdef bint notify_on             # set_notify(True) last
    cdef Seg *scratch               # segments of the chain being taken
    cdef int cap
    cdef Py_buffer track_buf        # the in-flight region part, while tracked
    cdef bint tracked

    def __dealloc__(self):
        free(self.scratch)
        if self.tracked:
            PyBuffer_Release(&self.track_buf)

    cdef int _alloc_scratch(self) except -1:
        # A chain visits at most `size` descriptors of the queue's table and at most
        # max_indirect of one indirect table (the walks' budgets): room for the worst.
        self.cap = self.size + <int>self.max_indirect + 1
        self.scratch = <Seg *>malloc(self.cap * sizeof(Seg))
        if self.scratch == NULL:
            raise MemoryError()
        return 0

    cdef int _track(self, tracker) except -1:
        self._tracker = tracker
        if tracker is not None:
            PyObject_GetBuffer(tracker.view, &self.track_buf, PyBUF_WRITABLE)
            self.tracked = True
        return 0

    @property
    def tracker(self):
        """The in-flight tracker adopted (its region is written by this ring now)."""
        return self._tracker

    @tracker.setter
    def tracker(self, value):
        """Only None: stop tracking (a test's way to die between two steps)."""
        if value is not None:
            raise ValueError("a compiled ring adopts its tracker; it can only drop it")
        if self.tracked:
            self.tracked = False
            PyBuffer_Release(&self.track_buf)
        self._tracker = None

    @property
    def broken(self):
        return self._broken

    @broken.setter
    def broken(self, value):
        self._broken = bool(value)

    cdef object _break(self, str why):
        self._broken = True
        return RingBroken(why)

    # -- what each kind implements (C) ----------------------------------------------------

    cdef int take(self, CChain *c) except -1:
        """The next available chain into ``c``: 1, or 0 when there is none. A bad chain
        is taken with ``c.why`` set; RingBroken when the ring itself is."""
        return 0

    cdef int fill_c(self, uint16_t head, uint32_t written) except -1:
        return 0

    cdef void flush_c(self) noexcept:
        pass

    cdef bint needs_notify_c(self) noexcept:
        return False

    cdef void set_notify_c(self, bint enabled) noexcept:
        pass

    cdef int has_available_c(self) except -1:
        return 0

    cdef uint64_t base(self) noexcept:
        """last_avail_idx: what vhost-user's GET_VRING_BASE answers."""
        return 0

    # -- the Python interface ---------------------------------------------------------------

    cdef object chain_of(self, CChain *c):
        """The Python path's Chain of a taken chain (memoryviews of guest memory)."""
        cdef int i
        cdef MemoryTable mt = self.mt
        readable = [mt.view_of(&c.segs[i]) for i in range(c.nread)]
        writable = [mt.view_of(&c.segs[i]) for i in range(c.nread, c.nseg)]
        return Chain(c.head, readable, writable)

    def pop(self):
        """The next available chain, or None. Raises ChainError (push(e.head, 0) to fail
        that request) or RingBroken."""
        cdef CChain c
        if not self.take(&c):
            return None
        if c.why != NULL:
            raise ChainError(c.head, c.why.decode())
        return self.chain_of(&c)

    def fill(self, int head, long written):
        if not 0 <= head < self.size:
            raise ValueError(f"head {head} out of range for a queue of {self.size}")
        self.fill_c(<uint16_t>head, <uint32_t>written)

    def flush(self):
        self.flush_c()

    def push(self, int head, long written):
        self.fill(head, written)
        self.flush_c()

    def needs_notify(self):
        return self.needs_notify_c()

    def set_notify(self, bint enabled):
        self.set_notify_c(enabled)

    def has_available(self):
        return bool(self.has_available_c())

    def serve_available(self, handle):
        """drain()'s inner loop: take every available chain, ``handle`` it (the Python
        path), fill its used element; a bad chain is filled (head, 0); a handler that
        raises has its chain filled (head, 0) and the exception propagates; None leaves
        the chain in flight."""
        cdef CChain c
        while self.take(&c):
            if c.why != NULL:
                self.fill_c(c.head, 0)
                continue
            try:
                written = handle(self.chain_of(&c))
            except BaseException:
                self.fill_c(c.head, 0)
                self.set_notify_c(True)
                raise
            if written is not None:
                self.fill_c(c.head, <uint32_t>written)

    def remap(self, mem):
        """A new memory table (vhost-user SET_MEM_TABLE): GuestMemoryError if one of the
        ring's areas is not in it."""
        raise NotImplementedError


# --------------------------------------------------------------------------- split rings

cdef enum:
    IDX_OFF = 2
    RING_OFF = 4


cdef class SplitRing(Ring):
    """The device side of a split virtqueue (virtio/device.py's DeviceRing)."""

    cdef char *desc
    cdef char *avail
    cdef char *used
    cdef uint16_t mask
    cdef uint16_t last_avail        # next avail entry to take
    cdef uint16_t shadow_avail      # the avail idx last read
    cdef uint16_t used_published    # the used idx last stored
    cdef uint16_t fill_idx          # the next used entry to write
    cdef uint16_t signalled_used    # the used idx at the last notify decision
    cdef bint signalled_valid
    cdef long pushed                # fills since the last notify decision
    cdef int avail_event_off        # in the used area
    cdef int used_event_off         # in the avail area
    cdef uint16_t *resubmit         # heads to run again (a stack: taken from the end)
    cdef int nresubmit
    # in-flight tracking (virtio/inflight.py, InflightQueue): the region part's header is
    # 16 bytes, then one 16-byte state per head
    cdef char *track
    cdef uint64_t counter
    cdef uint16_t *batch            # heads filled since the last publish
    cdef uint8_t *in_batch          # head -> already in the batch (a driver that posts a
    cdef int nbatch                 # head twice cannot overflow it)

    def __dealloc__(self):
        free(self.resubmit)
        free(self.batch)
        free(self.in_batch)

    @staticmethod
    def adopt(ring):
        """The compiled twin of a vscsi.virtio.DeviceRing, in its state now."""
        cdef SplitRing self = SplitRing.__new__(SplitRing)
        self.addrs = ring.addrs
        self.size = ring.size
        self.event_idx = ring.event_idx
        self.max_indirect = ring.max_indirect
        self._broken = ring.broken
        self.inflight = ring.inflight
        self.taken = ring.taken
        self.mask = self.size - 1
        self.avail_event_off = RING_OFF + 8 * self.size
        self.used_event_off = RING_OFF + 2 * self.size
        self.last_avail = ring.last_avail_idx
        self.shadow_avail = ring._shadow_avail
        self.used_published = ring.used_idx
        self.fill_idx = ring._fill_idx
        self.signalled_used = ring._signalled_used
        self.signalled_valid = ring._signalled_valid
        self.pushed = ring._pushed
        self.notify_on = ring._notify
        self._alloc_scratch()
        heads = list(ring._resubmit)
        self.resubmit = <uint16_t *>malloc(max(1, len(heads)) * sizeof(uint16_t))
        self.batch = <uint16_t *>malloc(self.size * sizeof(uint16_t))
        self.in_batch = <uint8_t *>calloc(self.size, 1)
        if self.resubmit == NULL or self.batch == NULL or self.in_batch == NULL:
            raise MemoryError()
        for h in heads:
            self.resubmit[self.nresubmit] = h
            self.nresubmit += 1
        self._track(ring.tracker)
        if self.tracked:
            self.track = <char *>self.track_buf.buf
            self.counter = ring.tracker.counter
            for h in ring.tracker._batch:
                if not self.in_batch[h]:
                    self.in_batch[h] = 1
                    self.batch[self.nbatch] = h
                    self.nbatch += 1
        self._map(ring._mem)
        return self

    cdef int _map(self, mem) except -1:
        a = self.addrs
        # The Python ring's own checks (and errors) first: each area inside one region.
        mem.view(a.desc, DESC_SIZE * a.size)
        mem.view(a.avail, 6 + 2 * a.size)
        mem.view(a.used, 6 + 8 * a.size)
        cdef MemoryTable mt = MemoryTable(mem)
        cdef int16_t region
        self.desc = mt.translate(a.desc, DESC_SIZE * a.size, &region)
        self.avail = mt.translate(a.avail, 6 + 2 * a.size, &region)
        self.used = mt.translate(a.used, 6 + 8 * a.size, &region)
        if self.desc == NULL or self.avail == NULL or self.used == NULL:
            raise GuestMemoryError("ring not inside guest memory")
        self.mt = mt
        return 0

    def remap(self, mem):
        self._map(mem)

    @property
    def last_avail_idx(self):
        return self.last_avail

    cdef uint64_t base(self) noexcept:
        return self.last_avail

    @property
    def used_idx(self):
        return self.used_published

    @property
    def resubmitting(self):
        return self.nresubmit

    # -- taking ----------------------------------------------------------------------------

    cdef int _avail_idx(self) except -1:
        """The driver's avail idx, checked not to have run away from us."""
        cdef uint16_t idx = vs_acquire16(self.avail + IDX_OFF)
        if <uint16_t>(idx - self.last_avail) > self.size:
            raise self._break(f"avail idx moved from {self.last_avail} to {idx}, more "
                              f"than {self.size}")
        self.shadow_avail = idx
        return idx

    cdef int has_available_c(self) except -1:
        if self._broken:
            raise RingBroken("ring is broken")
        if self.shadow_avail != self.last_avail or self.nresubmit:
            return 1
        return self._avail_idx() != self.last_avail

    cdef int take(self, CChain *c) except -1:
        cdef uint16_t head
        cdef uint16_t last
        if self._broken:
            raise RingBroken("ring is broken")
        if self.nresubmit:
            self.nresubmit -= 1
            head = self.resubmit[self.nresubmit]  # still marked in flight, old counter
        else:
            last = self.last_avail
            if self.shadow_avail == last and self._avail_idx() == last:
                return 0
            head = vs_le16(self.avail + RING_OFF + 2 * (last & self.mask))
            if head >= self.size:
                raise self._break(f"avail ring entry {last} names head {head} >= {self.size}")
            last += 1
            self.last_avail = last
            if self.tracked:
                self._track_take(head)
            if self.notify_on and self.event_idx:
                # Notifications on while taking outside a drain: keep avail_event at what
                # we consumed, or the driver's next kick would be suppressed.
                vs_release16(self.used + self.avail_event_off, last)
        self.inflight += 1
        self.taken += 1
        self._walk(head, c)
        return 1

    cdef void _walk(self, uint16_t head, CChain *c) noexcept:
        """Follow NEXT and INDIRECT from ``head`` into c's segments (DeviceRing._walk)."""
        cdef char *table = self.desc
        cdef uint32_t tsize = self.size
        cdef uint32_t budget = self.size
        cdef bint in_indirect = False
        cdef uint32_t i = head
        cdef uint64_t addr
        cdef uint32_t length
        cdef uint16_t flags, nxt
        cdef char *d
        cdef char *ptr
        cdef int16_t region
        cdef Seg *seg
        c.head = head
        c.nseg = c.nread = 0
        c.why = NULL
        c.segs = self.scratch
        while True:
            if budget == 0:
                c.why = b"loop, or chain longer than its table"
                return
            budget -= 1
            d = table + i * DESC_SIZE
            addr = vs_le64(d)
            length = vs_le32(d + 8)
            flags = vs_le16(d + 12)
            nxt = vs_le16(d + 14)
            if flags & F_INDIRECT:
                # The WRITE flag of the indirect descriptor itself is ignored (2.7.5.3.2).
                if in_indirect:
                    c.why = b"indirect descriptor inside an indirect table"
                    return
                if flags & F_NEXT:
                    c.why = b"descriptor has both INDIRECT and NEXT"
                    return
                if length == 0 or length % DESC_SIZE:
                    c.why = b"bad indirect table length"
                    return
                if length // DESC_SIZE > self.max_indirect:
                    c.why = b"indirect table longer than max_indirect"
                    return
                table = self.mt.translate(addr, length, &region)
                if table == NULL:
                    c.why = b"indirect table outside guest memory"
                    return
                tsize = budget = length // DESC_SIZE
                in_indirect = True
                i = 0
                continue
            if length:  # zero-length descriptors carry nothing: skipped
                ptr = self.mt.translate(addr, length, &region)
                if ptr == NULL:
                    c.why = b"buffer outside guest memory"
                    return
                if not flags & F_WRITE:
                    if c.nseg != c.nread:
                        c.why = b"readable descriptor after a writable one"
                        return
                    c.nread += 1
                seg = &c.segs[c.nseg]
                seg.ptr = ptr
                seg.len = length
                seg.region = region
                c.nseg += 1
            if not flags & F_NEXT:
                return
            if nxt >= tsize:
                c.why = b"next index outside its table"
                return
            i = nxt

    # -- filling and notifying ---------------------------------------------------------------

    cdef int fill_c(self, uint16_t head, uint32_t written) except -1:
        cdef char *elem = self.used + RING_OFF + 8 * (self.fill_idx & self.mask)
        vs_put_le32(elem, head)
        vs_put_le32(elem + 4, written)
        self.fill_idx += 1
        self.inflight -= 1
        self.pushed += 1
        if self.tracked:
            self._track_fill(head)
        return 0

    cdef void flush_c(self) noexcept:
        cdef uint16_t idx = self.fill_idx
        if idx != self.used_published:
            vs_release16(self.used + IDX_OFF, idx)   # the elements before the idx
            self.used_published = idx
            if self.tracked:
                self._track_published(idx)

    cdef bint needs_notify_c(self) noexcept:
        cdef long pushed
        cdef uint16_t old, new, event
        self.flush_c()
        if not self.pushed:
            return False
        pushed = self.pushed
        self.pushed = 0
        vs_mb()  # the used idx visible before we read the driver's wish
        if not self.event_idx:
            return not (vs_le16(self.avail) & 1)   # VIRTQ_AVAIL_F_NO_INTERRUPT
        old = self.signalled_used
        new = self.used_published
        self.signalled_used = new
        if not self.signalled_valid or pushed >= 0x10000:
            # After a resume we do not know what the driver last saw; 2**16 pushes would
            # alias in the 16-bit rule: signal to be safe.
            self.signalled_valid = True
            return True
        event = vs_acquire16(self.avail + self.used_event_off)
        return <uint16_t>(new - event - 1) < <uint16_t>(new - old)   # vring_need_event

    cdef void set_notify_c(self, bint enabled) noexcept:
        self.notify_on = enabled
        if self.event_idx:
            if enabled:
                vs_release16(self.used + self.avail_event_off, self.last_avail)
        else:
            vs_release16(self.used, 0 if enabled else 1)   # VIRTQ_USED_F_NO_NOTIFY
        if enabled:
            vs_mb()  # the store before the caller's re-check of the avail idx

    # -- in-flight tracking (InflightQueue, libvhost-user's layout) ---------------------------

    cdef void _track_take(self, uint16_t head) noexcept:
        cdef char *state = self.track + 16 + 16 * head
        vs_put_le16(state + 6, 0)
        vs_put_le64(state + 8, self.counter)
        vs_wmb()
        state[0] = 1
        self.counter += 1

    cdef void _track_fill(self, uint16_t head) noexcept:
        vs_put_le16(self.track + 16 + 16 * head + 6, vs_le16(self.track + 12))
        vs_wmb()
        vs_put_le16(self.track + 12, head)
        if not self.in_batch[head]:
            self.in_batch[head] = 1
            self.batch[self.nbatch] = head
            self.nbatch += 1

    cdef void _track_published(self, uint16_t used_idx) noexcept:
        cdef int k
        vs_wmb()
        for k in range(self.nbatch):
            self.track[16 + 16 * self.batch[k]] = 0
            self.in_batch[self.batch[k]] = 0
        self.nbatch = 0
        vs_wmb()
        vs_put_le16(self.track + 14, used_idx)


# --------------------------------------------------------------------------- packed rings

cdef enum:
    P_AVAIL = 1 << 7            # VIRTQ_DESC_F_AVAIL
    P_USED = 1 << 15            # VIRTQ_DESC_F_USED
    P_BOTH = P_AVAIL | P_USED
    EV_ENABLE = 0               # RING_EVENT_FLAGS_*
    EV_DISABLE = 1
    EV_DESC = 2
    WRAP_BIT = 15
    POS_MASK = 0x7FFF
    P_HEADER = 32               # packed in-flight region: header bytes, then 32 per state


cdef struct Entry:
    # One descriptor of a packed chain as taken from the ring (or from the in-flight
    # region, to run it again).
    uint64_t addr
    uint32_t len
    uint16_t flags


cdef class PackedRing(Ring):
    """The device side of a packed virtqueue (virtio/packed.py's PackedDeviceRing);
    chain heads are Buffer IDs."""

    cdef char *desc
    cdef char *driver               # the driver's event suppression area
    cdef char *device               # ours
    cdef int avail_pos
    cdef int avail_wrap
    cdef int used_pos
    cdef int used_wrap
    cdef uint16_t *chain_len        # Buffer ID -> ring slots of its chain; 0: not in flight
    cdef long advanced              # used slots written since the last notify decision
    cdef long pushed
    cdef bint signalled_valid
    cdef Entry *entries             # the chain being taken
    cdef list resubmit              # (buffer id, [(addr, len, flags)]) to run again
    # in-flight tracking (PackedInflightQueue): mirrors of what we wrote
    cdef char *track
    cdef uint64_t counter
    cdef uint16_t *head_of          # Buffer ID -> its head state (size: none)
    cdef uint16_t *nexts
    cdef uint16_t *lasts
    cdef uint16_t *nums
    cdef int t_free_head
    cdef int t_used_pos
    cdef int t_used_wrap
    cdef object completed_hook      # a test's crash point (TrackerHooks.completed)

    def __dealloc__(self):
        free(self.chain_len)
        free(self.entries)
        free(self.head_of)
        free(self.nexts)
        free(self.lasts)
        free(self.nums)

    @staticmethod
    def adopt(ring):
        """The compiled twin of a vscsi.virtio.PackedDeviceRing, in its state now."""
        cdef PackedRing self = PackedRing.__new__(PackedRing)
        cdef int i, n
        self.addrs = ring.addrs
        self.size = n = ring.size
        self.event_idx = ring.event_idx
        self.max_indirect = ring.max_indirect
        self._broken = ring.broken
        self.inflight = ring.inflight
        self.taken = ring.taken
        self.avail_pos, self.avail_wrap = ring._avail_pos, ring._avail_wrap
        self.used_pos, self.used_wrap = ring._used_pos, ring._used_wrap
        self.advanced = ring._advanced
        self.pushed = ring._pushed
        self.signalled_valid = ring._signalled_valid
        self.notify_on = ring._notify
        self.resubmit = list(ring._resubmit)
        self._alloc_scratch()
        self.chain_len = <uint16_t *>calloc(n, sizeof(uint16_t))
        self.entries = <Entry *>malloc(n * sizeof(Entry))
        self.head_of = <uint16_t *>malloc(n * sizeof(uint16_t))
        self.nexts = <uint16_t *>malloc(n * sizeof(uint16_t))
        self.lasts = <uint16_t *>malloc(n * sizeof(uint16_t))
        self.nums = <uint16_t *>malloc(n * sizeof(uint16_t))
        if (self.chain_len == NULL or self.entries == NULL or self.head_of == NULL
                or self.nexts == NULL or self.lasts == NULL or self.nums == NULL):
            raise MemoryError()
        for i in range(n):
            self.chain_len[i] = ring._chain_len[i]
        self._track(ring.tracker)
        if self.tracked:
            t = ring.tracker
            self.track = <char *>self.track_buf.buf
            self.counter = t.counter
            for i in range(n):
                self.head_of[i] = t._head_of[i]
                self.nexts[i] = t._next[i]
                self.lasts[i] = t._last[i]
                self.nums[i] = t._num[i]
            self.t_free_head, self.t_used_pos, self.t_used_wrap = (
                t._free_head, t._used_pos, t._used_wrap)
        self._map(ring._mem)
        return self

    cdef int _map(self, mem) except -1:
        a = self.addrs
        mem.view(a.desc, DESC_SIZE * a.size)
        mem.view(a.avail, 4)
        mem.view(a.used, 4)
        cdef MemoryTable mt = MemoryTable(mem)
        cdef int16_t region
        self.desc = mt.translate(a.desc, DESC_SIZE * a.size, &region)
        self.driver = mt.translate(a.avail, 4, &region)
        self.device = mt.translate(a.used, 4, &region)
        if self.desc == NULL or self.driver == NULL or self.device == NULL:
            raise GuestMemoryError("ring not inside guest memory")
        self.mt = mt
        return 0

    def remap(self, mem):
        self._map(mem)

    @property
    def tracker(self):
        """Hooks on the packed tracking steps, for crash tests (TrackerHooks), or None."""
        return TrackerHooks(self) if self.tracked else None

    @tracker.setter
    def tracker(self, value):
        Ring.tracker.__set__(self, value)

    @property
    def last_avail_idx(self):
        """The vhost-user state: avail position | wrap << 15, used likewise << 16."""
        return self.base()

    cdef uint64_t base(self) noexcept:
        cdef uint64_t avail = self.avail_pos | self.avail_wrap << WRAP_BIT
        cdef uint64_t used = self.used_pos | self.used_wrap << WRAP_BIT
        return avail | used << 16

    @property
    def used_idx(self):
        return self.used_pos | self.used_wrap << WRAP_BIT

    @property
    def resubmitting(self):
        return len(self.resubmit)

    # -- taking ----------------------------------------------------------------------------

    cdef inline uint16_t _flags_at(self, int pos) noexcept:
        return vs_acquire16(self.desc + pos * DESC_SIZE + 14)

    cdef int has_available_c(self) except -1:
        if self._broken:
            raise RingBroken("ring is broken")
        if self.resubmit:
            return 1
        cdef uint16_t want = P_AVAIL if self.avail_wrap else P_USED
        return (self._flags_at(self.avail_pos) & P_BOTH) == want

    cdef int take(self, CChain *c) except -1:
        cdef int pos, wrap, n, start
        cdef uint16_t want, flags, buffer_id
        cdef char *d
        if self._broken:
            raise RingBroken("ring is broken")
        if self.resubmit:
            buffer_id, chain = self.resubmit.pop()
            if self.chain_len[buffer_id]:
                raise self._break(f"buffer id {buffer_id} resubmitted twice")
            n = 0
            for addr, length, fl in chain:
                if n == self.size:
                    raise self._break(f"buffer id {buffer_id}: resubmitted chain too long")
                self.entries[n].addr = addr
                self.entries[n].len = length
                self.entries[n].flags = fl
                n += 1
            self.chain_len[buffer_id] = n
            self.inflight += 1
            self.taken += 1
            self._buffers(buffer_id, n, c)
            return 1
        pos, wrap = self.avail_pos, self.avail_wrap
        want = P_AVAIL if wrap else P_USED       # AVAIL/USED of this lap
        if (self._flags_at(pos) & P_BOTH) != want:
            return 0
        start = pos
        n = 0
        while True:
            d = self.desc + pos * DESC_SIZE
            flags = vs_le16(d + 14)
            if (flags & P_BOTH) != want:
                raise self._break(f"descriptor {pos} of a chain is not available in lap {wrap}")
            self.entries[n].addr = vs_le64(d)
            self.entries[n].len = vs_le32(d + 8)
            self.entries[n].flags = flags
            buffer_id = vs_le16(d + 12)
            n += 1
            pos += 1
            if pos == self.size:
                pos = 0
                wrap ^= 1
                want ^= P_BOTH
            if not flags & F_NEXT:
                break
            if n == self.size:
                raise self._break(f"chain at {start} is longer than the ring")
        if buffer_id >= self.size:
            raise self._break(f"buffer id {buffer_id} >= queue size {self.size}")
        if self.chain_len[buffer_id]:
            raise self._break(f"buffer id {buffer_id} made available while in flight")
        if self.tracked:
            self._track_take(buffer_id, n)
        self.chain_len[buffer_id] = n
        self.avail_pos, self.avail_wrap = pos, wrap
        self.inflight += 1
        self.taken += 1
        if self.notify_on and self.event_idx:
            # Notifications on while taking outside a drain: move the event along.
            vs_release16(self.device, pos | wrap << WRAP_BIT)
        self._buffers(buffer_id, n, c)
        return 1

    cdef void _buffers(self, uint16_t buffer_id, int n, CChain *c) noexcept:
        """The chain's segments (PackedDeviceRing._buffers, with _indirect)."""
        cdef Entry *e = self.entries
        cdef char *table = NULL
        cdef char *ptr
        cdef char *d
        cdef int16_t region
        cdef int k, count
        cdef uint64_t addr
        cdef uint32_t length
        cdef uint16_t flags
        cdef bint indirect = n == 1 and (e[0].flags & F_INDIRECT)
        cdef Seg *seg
        c.head = buffer_id
        c.nseg = c.nread = 0
        c.why = NULL
        c.segs = self.scratch
        if indirect:
            length = e[0].len
            if length == 0 or length % DESC_SIZE:
                c.why = b"bad indirect table length"
                return
            count = length // DESC_SIZE
            if <uint32_t>count > self.max_indirect:
                c.why = b"indirect table longer than max_indirect"
                return
            table = self.mt.translate(e[0].addr, length, &region)
            if table == NULL:
                c.why = b"indirect table outside guest memory"
                return
            # Table entries are used in order; only WRITE is meaningful, but a nested
            # table is refused -- checked for the whole table first, as _indirect does.
            for k in range(count):
                if vs_le16(table + k * DESC_SIZE + 14) & F_INDIRECT:
                    c.why = b"indirect descriptor inside an indirect table"
                    return
            n = count
        for k in range(n):
            if indirect:
                d = table + k * DESC_SIZE
                addr, length, flags = vs_le64(d), vs_le32(d + 8), vs_le16(d + 14)
            else:
                addr, length, flags = e[k].addr, e[k].len, e[k].flags
                if flags & F_INDIRECT:
                    c.why = b"indirect descriptor inside a chain"
                    return
            if not length:
                continue  # zero-length descriptors carry nothing
            ptr = self.mt.translate(addr, length, &region)
            if ptr == NULL:
                c.why = b"buffer outside guest memory"
                return
            if not flags & F_WRITE:
                if c.nseg != c.nread:
                    c.why = b"readable descriptor after a writable one"
                    return
                c.nread += 1
            seg = &c.segs[c.nseg]
            seg.ptr = ptr
            seg.len = length
            seg.region = region
            c.nseg += 1

    # -- returning buffers and notifying ------------------------------------------------------

    cdef int fill_c(self, uint16_t head, uint32_t written) except -1:
        """Return buffer ``head`` with ``written`` bytes; any order of IDs (push)."""
        cdef int n = self.chain_len[head]
        cdef char *d
        if not n:
            raise ValueError(f"buffer id {head} is not in flight")
        if self.tracked:
            self._track_completing(head)
        d = self.desc + self.used_pos * DESC_SIZE
        vs_put_le32(d + 8, written)
        vs_put_le16(d + 12, head)
        # len and id before the flags that hand the descriptor back
        vs_release16(d + 14, (P_BOTH if self.used_wrap else 0) | (F_WRITE if written else 0))
        if self.tracked:
            if self.completed_hook is not None:
                self.completed_hook(head)   # a test dies here, in place of the commit
            self._track_completed(head)
        self.chain_len[head] = 0
        self.used_pos += n
        if self.used_pos >= self.size:
            self.used_pos -= self.size
            self.used_wrap ^= 1
        self.inflight -= 1
        self.pushed += 1
        self.advanced += n
        return 0

    cdef void flush_c(self) noexcept:
        pass    # each used descriptor is the driver's once its flags are stored

    cdef bint needs_notify_c(self) noexcept:
        cdef long moved
        cdef uint16_t off_wrap, flags
        cdef int event
        if not self.pushed:
            return False
        moved = self.advanced
        self.pushed = self.advanced = 0
        vs_mb()  # the used flags visible before we read the driver's wish
        off_wrap = vs_acquire16(self.driver)
        flags = vs_acquire16(self.driver + 2)
        if not self.signalled_valid:
            # After a resume we do not know what the driver last saw: signal once.
            self.signalled_valid = True
            return flags != EV_DISABLE
        # _wants_event
        if flags == EV_DISABLE:
            return False
        if flags != EV_DESC or not self.event_idx or moved > self.size:
            return True
        event = off_wrap & POS_MASK
        if (off_wrap >> WRAP_BIT) != self.used_wrap:
            event -= self.size
        return (<uint16_t>(self.used_pos - <uint16_t>event - 1)
                < <uint16_t>(self.used_pos - <uint16_t>(self.used_pos - moved)))

    cdef void set_notify_c(self, bint enabled) noexcept:
        self.notify_on = enabled
        if not enabled:
            vs_release16(self.device + 2, EV_DISABLE)
            return
        if self.event_idx:
            vs_release16(self.device, self.avail_pos | self.avail_wrap << WRAP_BIT)
            vs_release16(self.device + 2, EV_DESC)
        else:
            vs_release16(self.device + 2, EV_ENABLE)
        vs_mb()  # the store before the caller's re-check of the ring

    # -- in-flight tracking (PackedInflightQueue's layout) -----------------------------------

    cdef inline char *_state(self, int index) noexcept:
        return self.track + P_HEADER + 32 * index

    cdef int _track_take(self, uint16_t buffer_id, int n) except -1:
        cdef int head, index, last, k
        cdef char *s
        head = index = last = self.t_free_head
        for k in range(n):
            if index >= self.size:
                raise RingBroken("packed in-flight region: no free state left")
            s = self._state(index)
            vs_put_le16(s + 16, buffer_id)
            vs_put_le16(s + 18, self.entries[k].flags)
            vs_put_le32(s + 20, self.entries[k].len)
            vs_put_le64(s + 24, self.entries[k].addr)
            last = index
            index = self.nexts[index]
        s = self._state(head)
        vs_put_le16(s + 4, last)
        vs_put_le16(s + 6, n)
        vs_put_le64(s + 8, self.counter)
        vs_wmb()
        s[0] = 1
        self.counter += 1
        vs_wmb()
        # One store commits the take (free_head and old_free_head).
        vs_put_le32(self.track + 12, <uint32_t>index | <uint32_t>index << 16)
        self.t_free_head = index
        self.head_of[buffer_id] = head
        self.lasts[head] = last
        self.nums[head] = n
        return 0

    cdef int _track_completing(self, uint16_t buffer_id) except -1:
        cdef int head = self.head_of[buffer_id]
        cdef int last, pos, wrap
        if head >= self.size:
            raise ValueError(f"buffer id {buffer_id} is not tracked")
        last = self.lasts[head]
        vs_put_le16(self._state(last) + 2, self.t_free_head)
        self.nexts[last] = self.t_free_head
        pos = self.t_used_pos + self.nums[head]
        wrap = self.t_used_wrap
        if pos >= self.size:
            pos -= self.size
            wrap ^= 1
        vs_wmb()
        vs_put_le16(self.track + 12, head)          # free_head
        vs_put_le16(self.track + 16, pos)           # used_idx
        self.track[20] = wrap                       # used_wrap_counter
        self.t_free_head, self.t_used_pos, self.t_used_wrap = head, pos, wrap
        vs_wmb()
        return 0

    cdef void _track_completed(self, uint16_t buffer_id) noexcept:
        cdef int head = self.head_of[buffer_id]
        self.head_of[buffer_id] = self.size
        vs_wmb()
        self._state(head)[0] = 0
        # _commit: old_used_idx goes last
        vs_put_le16(self.track + 14, self.t_free_head)
        self.track[21] = self.t_used_wrap
        vs_wmb()
        vs_put_le16(self.track + 18, self.t_used_pos)


cdef class TrackerHooks:
    """A compiled packed ring's tracking steps as the Python tracker names them, so a crash
    test cuts a completion short the same way on both: ``completing(id)`` runs the first
    step alone; assigning ``completed`` replaces the commit with a callable (which dies)."""

    cdef PackedRing ring

    def __cinit__(self, PackedRing ring):
        self.ring = ring

    def completing(self, int buffer_id):
        self.ring._track_completing(<uint16_t>buffer_id)

    @property
    def completed(self):
        return self.ring.completed_hook

    @completed.setter
    def completed(self, hook):
        self.ring.completed_hook = hook
