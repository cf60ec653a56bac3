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


cdef enum:
    WRITTEN_INLINE = 4  # writable segments a chain in flight keeps inline (more: allocated)


cdef struct GpaSeg:
    uint64_t gpa
    uint32_t len


cdef struct Written:
    # Where a chain in flight may be written: its writable segments, guest-physical. Kept
    # from take to fill for the dirty log, whether a log is on or not (one may start while
    # the chain is in flight).
    int n
    GpaSeg *segs            # inline, or allocated for more than WRITTEN_INLINE
    GpaSeg near[WRITTEN_INLINE]


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
    # live migration's dirty log (virtio/device.py DeviceRing.set_log)
    cdef Written *written_at        # head -> where its chain may be written
    cdef uint64_t used_gpa          # where this kind writes used entries (split: the used
                                    # area; packed: the descriptor ring)
    cdef Py_buffer log_buf          # the log's bits, while logging
    cdef uint8_t *log_bits
    cdef uint64_t log_size
    cdef bint log_data
    cdef bint log_used

    def __dealloc__(self):
        cdef int h
        free(self.scratch)
        if self.written_at != NULL:
            for h in range(self.size):
                self.forget(h)
            free(self.written_at)
        if self.tracked:
            PyBuffer_Release(&self.track_buf)
        if self.log_bits != NULL:
            PyBuffer_Release(&self.log_buf)

    cdef int _alloc_scratch(self) except -1:
        # A chain visits at most `size` descriptors of the queue's table and at most
        # max_indirect of one indirect table (the walks' budgets): room for the worst.
        self.cap = self.size + <int>self.max_indirect + 1
        self.scratch = <Seg *>malloc(self.cap * sizeof(Seg))
        self.written_at = <Written *>calloc(self.size, sizeof(Written))
        if self.scratch == NULL or self.written_at == NULL:
            raise MemoryError()
        return 0

    # -- the dirty log ----------------------------------------------------------------------

    def set_log(self, log, *, bint data=False, bint used=False):
        """Log what we write for live migration (DeviceRing.set_log): ``log`` is a
        vscsi.memory.dirtylog.DirtyLog (its ``buffer``), or None."""
        if self.log_bits != NULL:
            self.log_bits = NULL
            PyBuffer_Release(&self.log_buf)
        self.log_data = data
        self.log_used = used
        if log is not None and (data or used):
            PyObject_GetBuffer(log.buffer, &self.log_buf, PyBUF_WRITABLE)
            self.log_bits = <uint8_t *>self.log_buf.buf
            self.log_size = <uint64_t>self.log_buf.len

    @property
    def logging(self):
        """What set_log asked for: (data, used)."""
        return bool(self.log_data), bool(self.log_used)

    cdef void mark(self, uint64_t gpa, uint64_t length) noexcept nogil:
        """Log a write of ``length`` bytes at ``gpa`` (memory/dirtylog.py DirtyLog.mark)."""
        cdef uint64_t page, last
        if length == 0:
            return
        page = gpa >> 12
        last = (gpa + (length - 1)) >> 12
        if last >= self.log_size * 8:
            last = self.log_size * 8 - 1
        while page <= last:
            vs_log_page(self.log_bits, page)
            page += 1

    cdef int remember(self, CChain *c) except -1:
        """Keep where the chain just taken may be written, until its fill."""
        cdef Written *w = &self.written_at[c.head]
        cdef int k, n = c.nseg - c.nread
        cdef Seg *seg
        cdef Region *r
        self.forget(c.head)
        if n > WRITTEN_INLINE:
            w.segs = <GpaSeg *>malloc(n * sizeof(GpaSeg))
            if w.segs == NULL:
                raise MemoryError()
        else:
            w.segs = w.near
        for k in range(n):
            seg = &c.segs[c.nread + k]
            r = &self.mt.regions[seg.region]
            w.segs[k].gpa = r.guest + <uint64_t>(seg.ptr - r.host)
            w.segs[k].len = seg.len
        w.n = n
        return 0

    cdef void forget(self, uint16_t head) noexcept:
        cdef Written *w = &self.written_at[head]
        if w.segs != NULL and w.segs != w.near:
            free(w.segs)
        w.segs = NULL
        w.n = 0

    cdef void filled(self, uint16_t head, uint32_t written) noexcept:
        """A fill of ``head``: log its first ``written`` writable bytes (when logging
        data) and forget where it may be written."""
        cdef Written *w = &self.written_at[head]
        cdef int k
        cdef uint32_t n
        if self.log_bits != NULL and self.log_data:
            k = 0
            while written and k < w.n:
                n = w.segs[k].len if w.segs[k].len < written else written
                self.mark(w.segs[k].gpa, n)
                written -= n
                k += 1
        self.forget(head)

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
