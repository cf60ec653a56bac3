# Guest memory as the compiled plane sees it: a table of (guest-physical start, size, host
# pointer) per region, built from a vscsi.memory.GuestMemory. translate() is
# GuestMemory.view without the view: a range that does not lie wholly inside one region
# gives NULL, the caller's ChainError. The table holds a buffer export of every region's
# view, so a mapping stays valid while a ring or a request in flight may touch it, even
# after the GuestMemory was closed (a new memory table arrived): the export goes with the
# last holder of this table.

from cpython.buffer cimport PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer


cdef struct Region:
    uint64_t guest
    uint64_t size
    char *host


cdef struct Seg:
    # One guest buffer of a chain: where it is in our address space, how long, and which
    # region it lies in (to build the Python path's memoryview of it).
    char *ptr
    uint32_t len
    int16_t region


cdef class MemoryTable:
    cdef Region *regions
    cdef Py_buffer *buffers
    cdef int n
    cdef list views         # each region's memoryview, for the Python path's chains

    def __cinit__(self, mem):
        rows = mem.region_views()
        self.n = 0
        self.regions = <Region *>calloc(max(1, len(rows)), sizeof(Region))
        self.buffers = <Py_buffer *>calloc(max(1, len(rows)), sizeof(Py_buffer))
        if self.regions == NULL or self.buffers == NULL:
            raise MemoryError()
        self.views = []
        for guest, size, view in rows:
            PyObject_GetBuffer(view, &self.buffers[self.n], PyBUF_WRITABLE)
            if self.buffers[self.n].len != size:
                PyBuffer_Release(&self.buffers[self.n])
                raise ValueError(f"region at {guest:#x}: view of {self.buffers[self.n].len} "
                                 f"bytes for {size}")
            self.regions[self.n].guest = guest
            self.regions[self.n].size = size
            self.regions[self.n].host = <char *>self.buffers[self.n].buf
            self.views.append(view)
            self.n += 1

    def __dealloc__(self):
        cdef int i
        if self.buffers != NULL:
            for i in range(self.n):
                PyBuffer_Release(&self.buffers[i])
            free(self.buffers)
        free(self.regions)

    cdef inline char *translate(self, uint64_t addr, uint64_t length,
                                int16_t *region) noexcept nogil:
        """The host address of guest-physical [addr, addr+length), or NULL when the range
        is not wholly inside one region (overflow-safe: no addr + length is formed)."""
        cdef int i
        cdef Region *r
        cdef uint64_t off
        for i in range(self.n):
            r = &self.regions[i]
            if addr >= r.guest:
                off = addr - r.guest
                if off <= r.size and length <= r.size - off:
                    region[0] = <int16_t>i
                    return r.host + off
        return NULL

    cdef object view_of(self, Seg *seg):
        """The Python path's memoryview of one segment (a slice of its region's view)."""
        cdef Py_ssize_t off = seg.ptr - self.regions[seg.region].host
        return self.views[seg.region][off:off + seg.len]

    cdef object view_at(self, char *ptr, uint32_t length):
        """The memoryview of ``length`` bytes at our address ``ptr`` inside one region."""
        cdef int i
        cdef Region *r
        for i in range(self.n):
            r = &self.regions[i]
            if r.host <= ptr and <uint64_t>(ptr - r.host) + length <= r.size:
                return self.views[i][ptr - r.host:ptr - r.host + length]
        raise ValueError("address outside guest memory")
