# The device side of a split virtqueue, compiled (virtio/device.py's DeviceRing is the
# reference), with libvhost-user's in-flight tracking (virtio/inflight.py InflightQueue).

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
        self.used_gpa = ring.addrs.used
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
        self.set_log(ring._log, data=ring._log_data, used=ring._log_used)
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
        if c.why == NULL:
            self.remember(c)
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
        cdef uint32_t off = RING_OFF + 8 * (self.fill_idx & self.mask)
        vs_put_le32(self.used + off, head)
        vs_put_le32(self.used + off + 4, written)
        self.filled(head, written)
        if self.log_bits != NULL and self.log_used:
            self.mark(self.used_gpa + off, 8)
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
            if self.log_bits != NULL and self.log_used:
                self.mark(self.used_gpa + IDX_OFF, 2)
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
