# When to signal, compiled: vhost_user/pacing.py's Coalescer (the reference) in C. The
# loop asks it once per pass and once per sleep; as a Python object those calls cost a
# coalescing worker ~3 us per request at the guest's small batches, more than what they
# decide.

cdef class CompiledCoalescer:
    """pacing.Coalescer, compiled, with its interface (the worker's Python code calls it
    too: the sleep's deadline, the flush when a queue stops). The same decisions for the
    same calls; tests/dataplane/test_pacing_differential.py drives both alike."""

    cdef readonly long count
    cdef readonly double delay
    cdef readonly long held             # completions waiting for an interrupt
    cdef readonly double since          # when the first of them was held

    def __cinit__(self, long count=1, double delay=0.0):
        if count < 1 or delay < 0:
            raise ValueError("coalescing needs count >= 1 and delay >= 0")
        self.count = count
        self.delay = delay

    @property
    def active(self):
        return self.active_c()

    cdef inline bint active_c(self) noexcept:
        return self.count > 1 and self.delay > 0

    cpdef bint completed(self, long n, double now) except -1:
        if not self.active_c():
            return n > 0
        if n <= 0:
            return False
        if not self.held:
            self.since = now
        self.held += n
        if self.held >= self.count or now >= self.since + self.delay:
            self.held = 0
            return True
        return False

    cpdef bint due(self, double now) except -1:
        if self.held and now >= self.since + self.delay:
            self.held = 0
            return True
        return False

    cdef inline double deadline_c(self) noexcept:
        """When the held completions are due; -1: nothing held."""
        return self.since + self.delay if self.held else -1.0

    def deadline(self):
        cdef double due = self.deadline_c()
        return None if due < 0 else due

    cpdef bint flush(self) except -1:
        cdef long held = self.held
        self.held = 0
        return held > 0
