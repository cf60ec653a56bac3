# The device side of a packed virtqueue, compiled (virtio/packed.py's PackedDeviceRing is
# the reference), with vhost-user.rst's packed in-flight tracking (PackedInflightQueue).

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
        self.used_gpa = ring.addrs.desc
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
        self.set_log(ring._log, data=ring._log_data, used=ring._log_used)
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
            if c.why == NULL:
                self.remember(c)
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
        if c.why == NULL:
            self.remember(c)
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
        self.filled(head, written)
        if self.log_bits != NULL and self.log_used:
            self.mark(self.used_gpa + self.used_pos * DESC_SIZE, DESC_SIZE)
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
