# A worker process's rings served in C: the compiled twin of vhost_user/workers.py's
# _Served (one ring: drain, count, pace, signal) and of _Worker.run_python (the loop that
# waits for kicks), plus the worker's io_uring. The worker itself (rings joining and
# leaving, its control channel, broken rings) stays Python: it manages CompiledServed
# objects exactly as it manages _Served ones (the Served protocol), and calls back into
# this loop's rings only through that face.

import logging
import time

from vscsi.vhost_user import stats as st

log = logging.getLogger("vscsi.vhost_user.workers")

cdef enum:
    # a queue's row of counters (vhost_user/stats.py)
    ROW_REQUESTS = 0
    ROW_WAKEUPS = 1
    ROW_NOTIFIES = 2
    ROW_ERRORS = 3
    ROW_LAST_AVAIL = 4
    ROW_PYTHON = 9

if (st.REQUESTS, st.WAKEUPS, st.NOTIFIES, st.ERRORS, st.LAST_AVAIL, st.PYTHON) != (
        ROW_REQUESTS, ROW_WAKEUPS, ROW_NOTIFIES, ROW_ERRORS, ROW_LAST_AVAIL, ROW_PYTHON):
    raise ImportError("vscsi.dataplane is out of step with vscsi.vhost_user's counters")

cdef enum:
    URING_ENTRIES = 256


cdef class Uring:
    """The worker's io_uring: readv / writev of the io_uring LUNs' requests, completions
    read from the shared ring (its eventfd wakes the loop). One per worker process."""

    cdef vs_uring u
    cdef readonly bint ready
    cdef readonly long in_flight

    def __cinit__(self):
        self.ready = vs_uring_init(&self.u, URING_ENTRIES) == 0

    def __dealloc__(self):
        if self.ready:
            vs_uring_exit(&self.u)

    @property
    def fd(self):
        """The eventfd completions are signalled on (-1 without io_uring)."""
        return self.u.efd if self.ready else -1

    cdef int start(self, Req *r) noexcept:
        """Queue ``r``'s I/O (submitted with the pass); 0 or a negative errno."""
        cdef int rc = vs_uring_rw(&self.u, r.write, r.lun.fd, r.iov, r.niov, r.offset, r)
        if rc == 0:
            self.in_flight += 1
        return rc

    cdef void submit(self) noexcept:
        vs_uring_submit(&self.u)

    cdef int reap(self) except -1:
        """Answer every completed I/O (each in its ring's CompiledServed)."""
        cdef void *data
        cdef int res
        cdef char buf[8]
        if not self.ready:
            return 0
        read(self.u.efd, buf, 8)
        while vs_uring_reap(&self.u, &data, &res):
            self.in_flight -= 1
            (<CompiledServed>(<Req *>data).owner).io_done(<Req *>data, res)
        return 0


cdef class CompiledTask:
    """A request of the compiled plane in flight, with LaterTask's face for the TMFs
    that reach it (device/later.py InFlightSource): made only when a TMF asks."""

    cdef CompiledServed served
    cdef Req *req
    cdef readonly int head
    cdef readonly int target
    cdef readonly int lun
    cdef readonly object tag

    @property
    def imposed(self):
        return self.req.imposed

    @imposed.setter
    def imposed(self, int response):
        self.req.imposed = <uint8_t>response

    @property
    def finished(self):
        return not self.req.busy

    @property
    def pending(self):
        return self

    @property
    def on_abort(self):
        """None, as a Pending's that cannot be stopped: its I/O is under way."""
        return None

    def abort(self):
        """Nothing to stop early: the I/O owns the guest buffers until it ends, and the
        request then answers with ``imposed`` (a Pending's default abort)."""

    def when_finished(self, callback):
        if not self.req.busy:
            callback()
            return
        self.req.waited = True
        self.served.waiters.setdefault(self.head, []).append(callback)


cdef class CompiledServed:
    """One ring a worker serves, compiled: a compiled Ring, the request fast path
    (FastScsi) with the Python path's handler for the rest, its fds, counters and pacing
    (the Served protocol of vhost_user/workers.py)."""

    cdef readonly int index
    cdef readonly Ring ring
    cdef readonly object handle         # the Python path: device.handler_for(index, complete)
    cdef public object end_pass
    cdef public int kick_fd
    cdef public int call_fd
    cdef public object row
    cdef uint64_t *crow
    cdef Held row_hold
    cdef readonly CompiledCoalescer coalescer
    cdef bint coalescing                # coalescer.active (fixed for the served's life)
    cdef public long completed          # answered later since the last publish
    cdef public bint stopping
    cdef FastScsi fast
    cdef Uring uring
    cdef Req *reqs                      # by head: the io_uring requests in flight
    cdef readonly long later            # of them, how many
    cdef long python_later              # answered later by the Python path
    cdef bint python_counted            # the Python path counted since the last end_pass
    cdef readonly long fast_served      # requests the fast path answered (now or later)
    cdef readonly long handed_over      # requests the Python path took (also counted in
                                        # the queue's row: PYTHON)
    cdef dict waiters                   # head -> callbacks for when it finishes (TMFs)
    cdef object tables                  # head -> the MemoryTable its I/O runs in

    def __cinit__(self, int index, Ring ring, device, int kick_fd, int call_fd, row,
                  coalescer, Uring uring):
        self.index = index
        self.ring = ring
        self.handle = device.handler_for(index, self.complete)
        end_pass = getattr(device, "end_pass", None)
        self.end_pass = None if end_pass is None else end_pass(index)
        self.kick_fd = kick_fd
        self.call_fd = call_fd
        self.row = row
        self.row_hold = Held(row)
        self.crow = <uint64_t *>self.row_hold.ptr()
        self.coalescer = CompiledCoalescer(coalescer.count, coalescer.delay)
        self.coalescing = self.coalescer.active_c()
        self.uring = uring
        self.waiters = {}
        self.tables = {}
        self.fast = FastScsi(device, index - FIRST_REQUEST_QUEUE, ring.cap,
                             uring is not None and uring.ready)
        self.reqs = <Req *>calloc(ring.size, sizeof(Req))
        if self.reqs == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self.reqs)

    # -- the Served face --------------------------------------------------------------------

    def on_kick(self):
        """Unused: the compiled loop reads the kick eventfd itself."""

    def complete(self, int head, long written):
        """A request the Python path answered later: its used element now, published with
        the pass (a broken ring is not touched any more)."""
        self.python_later -= 1
        self.python_counted = True
        if not self.ring._broken:
            self.ring.fill(head, written)
            self.completed += 1

    def serve(self, double now, bint rearm):
        """Drain the ring once and signal the driver as the pacing says; a reason when the
        ring is broken. ``rearm=False``: leave the driver's kicks off (polling)."""
        return self.pass_(now, rearm)

    def publish(self, double now):
        """Publish what requests answered later filled since the last pass."""
        self.publish_c(now)

    cdef int publish_c(self, double now) except -1:
        cdef long completed
        if self.completed and not self.ring._broken:
            completed = self.completed
            self.completed = 0
            self.ring.flush_c()
            self.end_of_pass()
            self.pace(self.ring.needs_notify_c(), completed, now)
        return 0

    def signal(self):
        self.signal_c()

    cdef void signal_c(self) noexcept:
        cdef uint64_t one = 1
        if self.call_fd >= 0:
            self.crow[ROW_NOTIFIES] += 1
            write(self.call_fd, &one, 8)    # a full counter (EAGAIN) is signalled already

    def close(self):
        for fd in (self.kick_fd, self.call_fd):
            if fd >= 0:
                os.close(fd)
        self.kick_fd = self.call_fd = -1
        self.fast.release()

    # -- one pass -------------------------------------------------------------------------------

    cdef object pass_(self, double now, bint rearm):
        cdef long taken = self.ring.taken
        cdef long completed
        cdef bint notify = False
        self.crow[ROW_WAKEUPS] += 1
        while True:
            try:
                notify |= self.drain(rearm)
                break
            except RingBroken as exc:
                self.uring_submit()
                return f"ring broken: {exc}"
            except Exception:
                # A device bug: drain already failed that chain (0 bytes) and turned
                # notifications back on; log it and carry on with the rest.
                self.crow[ROW_ERRORS] += 1
                notify = True
                log.exception("queue %d: request handler failed", self.index)
        self.uring_submit()
        self.crow[ROW_LAST_AVAIL] = self.ring.base()
        taken = self.ring.taken - taken
        self.crow[ROW_REQUESTS] += taken
        completed = self.completed
        self.completed = 0
        self.end_of_pass()
        if notify:
            self.pace(True, completed + taken, now)
        return None

    cdef void uring_submit(self) noexcept:
        if self.uring is not None:
            self.uring.submit()

    cdef int end_of_pass(self) except -1:
        """What the Python path counted becomes visible (the device's end_pass): only when
        it counted something -- the fast path writes the shared counters itself."""
        if self.python_counted and self.end_pass is not None:
            self.python_counted = False
            self.end_pass()
        return 0

    cdef int pace(self, bint notify, long completions, double now) except -1:
        if notify:
            if not self.coalescing or self.coalescer.completed(completions or 1, now):
                self.signal_c()
        return 0

    cdef bint drain(self, bint rearm) except -1:
        """virtio/device.py drain(): notifications off, serve every chain, publish the used
        idx, notifications on, re-check; whether the driver must be signalled."""
        cdef Ring ring = self.ring
        while True:
            ring.set_notify_c(False)
            try:
                self.serve_available()
            finally:
                ring.flush_c()
            if not rearm:
                return ring.needs_notify_c()
            ring.set_notify_c(True)
            # A chain made available after our last take but before the driver could see
            # notifications re-enabled got no kick: take it now.
            if not ring.has_available_c():
                return ring.needs_notify_c()

    cdef int serve_available(self) except -1:
        """Take every available chain: the fast path serves it, or the Python path's
        handler; fill its used element (or leave it in flight)."""
        cdef Ring ring = self.ring
        cdef CChain c
        cdef int written
        cdef Req *r
        while ring.take(&c):
            if c.why != NULL:
                ring.fill_c(c.head, 0)
                continue
            r = &self.reqs[c.head]
            written = self.fast.serve(&c, r if not r.busy else NULL)
            if written >= 0:
                self.fast_served += 1
                ring.fill_c(c.head, <uint32_t>written)
            elif written == LATER:
                self.fast_served += 1
                self.start_later(r, c.head)
            else:
                self.handed_over += 1
                self.crow[ROW_PYTHON] += 1
                self.hand_over(&c)
        return 0

    cdef int hand_over(self, CChain *c) except -1:
        """The Python path serves this chain (what DeviceRing.serve_available does)."""
        self.python_counted = True
        try:
            written = self.handle(self.ring.chain_of(c))
        except BaseException:
            self.ring.fill_c(c.head, 0)
            self.ring.set_notify_c(True)
            raise
        if written is None:
            self.python_later += 1
        else:
            self.ring.fill_c(c.head, <uint32_t>written)
        return 0

    # -- requests answered later by the io_uring ---------------------------------------------

    cdef int start_later(self, Req *r, uint16_t head) except -1:
        cdef int rc
        r.busy = True
        r.waited = False
        r.owner = <void *>self
        r.head = head
        self.later += 1
        self.tables[head] = self.ring.mt    # its memory stays mapped until it ends
        rc = self.uring.start(r)
        if rc < 0:
            self.io_done(r, rc)
        return 0

    cdef int io_done(self, Req *r, int res) except -1:
        """``r``'s I/O ended with ``res`` (bytes, or a negative errno): answer it -- or,
        if it did not move every byte, hand it to the Python path, which does it again
        and says what happened (sense data is the Python path's alone)."""
        cdef Lun *e = r.lun
        cdef uint16_t head = r.head
        cdef int64_t ns = vs_now_ns() - r.started
        cdef MemoryTable mt = self.tables.pop(head)
        written = None
        r.busy = False
        self.later -= 1
        self.fast.started(e, -1)
        if r.imposed:
            self.fast.done(e, True, 0, 0, ns)
            self.fast.respond(r.resp.ptr, 0, r.imposed)
            written = self.fast.resp_len
        elif res >= 0 and <uint64_t>res == r.nbytes:
            self.fast.done(e, False, 0 if r.write else r.nbytes, r.nbytes if r.write else 0,
                           ns)
            self.fast.respond(r.resp.ptr, 0, 0)
            written = self.fast.resp_len + (0 if r.write else r.nbytes)
        else:
            self.fast_served -= 1
            self.handed_over += 1
            self.crow[ROW_PYTHON] += 1
            self.fast.undo(e.target, r.switched)
            self.python_counted = True
            try:
                written = self.handle(self.later_chain(r, mt))
            except Exception:
                log.exception("queue %d: request handler failed", self.index)
                written = 0
            if written is None:
                self.python_later += 1
        if r.iov != r.small:
            free(r.iov)
            r.iov = r.small
        if written is not None and not self.ring._broken:
            self.ring.fill_c(head, <uint32_t>written)
            self.completed += 1
        if r.waited:
            r.waited = False
            for callback in self.waiters.pop(head, ()):
                callback()
        return 0

    cdef object later_chain(self, Req *r, MemoryTable mt):
        """The Python path's Chain of a request answered later (Linux's layout: the
        headers and the data iovecs are the whole chain)."""
        cdef int k
        data = [mt.view_at(<char *>r.iov[k].iov_base, <uint32_t>r.iov[k].iov_len)
                for k in range(r.niov)]
        hdr = mt.view_at(r.hdr.ptr, r.hdr.len)
        resp = mt.view_at(r.resp.ptr, r.resp.len)
        if r.write:
            return Chain(r.head, [hdr, *data], [resp])
        return Chain(r.head, [hdr], [resp, *data])

    cdef list tasks(self, target, int lun, tag):
        """CompiledTask of each io_uring request in flight that matches."""
        cdef int head
        cdef Req *r
        cdef CompiledTask task
        out = []
        if not self.later:
            return out
        for head in range(self.ring.size):
            r = &self.reqs[head]
            if not r.busy:
                continue
            if target is not None and r.lun.target != target:
                continue
            if lun != 0xFFFF and r.lun.lun != lun:
                continue
            if tag is not None and r.tag != tag:
                continue
            task = CompiledTask.__new__(CompiledTask)
            task.served, task.req, task.head = self, r, head
            task.target, task.lun, task.tag = r.lun.target, r.lun.lun, r.tag
            out.append(task)
        return out


cdef class CompiledServing:
    """vhost_user's QueueServing, compiled: CompiledServed rings and the loop that waits
    for their kicks in C. Built in the main process (``vscsi serve --dataplane
    compiled``); its per-process parts (the io_uring, the device's in-flight source) are
    made in each worker, after the fork."""

    name = "compiled"
    cdef Uring uring
    cdef int pid
    cdef list mine                  # this worker's CompiledServed rings

    def __cinit__(self):
        self.pid = -1

    cdef int ready_here(self, device) except -1:
        if self.pid == os.getpid():
            return 0
        self.pid = os.getpid()
        self.mine = []
        uring = Uring()
        self.uring = uring if uring.ready else None
        later = getattr(device, "later", None)
        if later is not None:
            later.attach(self)
        return 0

    # -- QueueServing ---------------------------------------------------------------------------

    def served(self, worker, int index, ring, int kick_fd, int call_fd, row, coalescer):
        self.ready_here(worker.device)
        if isinstance(ring, Ring):
            cring = ring
        elif ring.__class__.__name__ == "PackedDeviceRing":
            cring = PackedRing.adopt(ring)
        else:
            cring = SplitRing.adopt(ring)
        served = CompiledServed(index, cring, worker.device, kick_fd, call_fd, row,
                                coalescer, self.uring)
        self.mine.append(served)
        return served

    def watch(self, worker, served):
        pass        # the loop polls every served ring's kick fd itself

    def unwatch(self, worker, served):
        self.mine.remove(served)

    def run(self, worker):
        Loop(self, worker).run()

    # -- the io_uring, for a loop of someone else's (tests, a Python loop) ------------------------

    @property
    def io_fd(self):
        """The fd that turns readable when I/O completed (-1: no io_uring here)."""
        return self.uring.fd if self.uring is not None else -1

    def reap(self):
        """Answer every I/O that completed (each request in its ring)."""
        if self.uring is not None:
            self.uring.reap()

    # -- the device's in-flight source (device/later.py InFlightSource) --------------------------

    def matching(self, target, int lun, tag, slot):
        out = []
        for served in self.mine:
            if slot is None or (<CompiledServed>served).fast.slot == slot:
                out.extend((<CompiledServed>served).tasks(target, lun, tag))
        return out

    def count(self, slot):
        n = 0
        for served in self.mine:
            if slot is None or (<CompiledServed>served).fast.slot == slot:
                n += (<CompiledServed>served).later
        return n
