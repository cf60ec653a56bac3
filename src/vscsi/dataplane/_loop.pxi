# A worker's loop, compiled: vhost_user/worker.py's Worker.run_python (the reference) in
# C -- poll the kick eventfds, the io_uring's and the Python loop's epoll fd; serve, poll
# on, publish, signal.

from vscsi.vhost_user.worker import POLL_INTERVAL

cdef enum:
    MAX_RINGS = 256     # rings one worker serves (a device has at most 256 queues here)

cdef double POLL_INTERVAL_S = POLL_INTERVAL  # how often a ring without a kick fd is looked at


cdef extern from *:
    """
    /* Whether this is the interpreter's only thread: then nothing else needs the GIL
       while the loop sleeps, and it keeps it (no release and re-take per wake-up). */
    static int vs_only_thread(void) {
        PyThreadState *me = PyThreadState_Get();
        PyThreadState *t = PyInterpreterState_ThreadHead(me->interp);
        return t == me && PyThreadState_Next(t) == NULL;
    }
    static inline double vs_now_s(void) {
        struct timespec ts; clock_gettime(CLOCK_MONOTONIC, &ts);
        return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
    }
    """
    int vs_only_thread()
    double vs_now_s() nogil


cdef class Loop:
    """_Worker.run_python, compiled: sleep until a kick (or the Python loop's own fds or
    timers, or an io_uring completion), serve the kicked rings, poll on if the adaptive
    window says so, then publish what was answered later and signal held interrupts that
    fell due. Python runs only for what is Python's: the worker's control channel and the
    Python path's own I/O (through its event loop, whose epoll fd we watch), pacing when
    it is on (coalescing, polling, kickless rings), and the requests the fast path hands
    over. Time is CLOCK_MONOTONIC, time.monotonic()'s clock."""

    cdef CompiledServing serving
    cdef object worker
    cdef object loop
    cdef list timers                # the Python loop's timer heap (the same list always)
    cdef list before_wait           # and its call_before_wait callbacks
    cdef list served                # the rings, as of ``generation``
    cdef int nserved
    cdef object generation
    cdef bint timed                 # the worker's pacing needs a timeout (worker.timed)
    cdef bint any_kickless
    cdef char kicked[MAX_RINGS]     # by index in ``served``
    cdef char kickless[MAX_RINGS]
    cdef pollfd fds[MAX_RINGS + 2]
    cdef int ring_of[MAX_RINGS + 2] # a poll slot's ring (index in ``served``); -1: none
    cdef int nfds
    cdef int loop_slot              # poll slots of the Python loop and the io_uring
    cdef int uring_slot
    cdef bint polling
    cdef double python_due          # when the Python loop's next timer is due (-1: none)

    def __cinit__(self, CompiledServing serving, worker):
        self.serving = serving
        self.worker = worker
        self.loop = worker.loop
        self.timers, self.before_wait = self.loop.pending
        self.generation = None
        self.polling = worker.poll.max_window > 0

    cdef int rebuild(self) except -1:
        """The rings and the fds to wait on, after rings came or went. A kick already
        read for a ring that stays is kept: the rings change while the Python loop runs,
        between reading the kicks and serving them (a ring added by a control message
        that arrived with a kick for another ring), and an eventfd read is not read
        twice -- lost, the ring would sleep with a request in it."""
        cdef CompiledServed s
        cdef int i
        kicked = {(<CompiledServed>self.served[i]).index for i in range(self.nserved)
                  if self.kicked[i]}
        self.generation = self.worker.generation
        self.served = list(self.worker.served.values())[:MAX_RINGS]
        self.nserved = len(self.served)
        self.timed = self.worker.timed
        kickless = self.worker.kickless
        self.any_kickless = False
        self.nfds = 0
        for i in range(self.nserved):
            s = self.served[i]
            self.kicked[i] = s.index in kicked
            self.kickless[i] = s in kickless
            self.any_kickless |= self.kickless[i]
            if s.kick_fd >= 0 and not s.stopping:
                self.fds[self.nfds].fd = s.kick_fd
                self.fds[self.nfds].events = POLLIN
                self.ring_of[self.nfds] = i
                self.nfds += 1
        self.loop_slot = self.nfds
        self.fds[self.nfds].fd = self.loop.fileno()
        self.fds[self.nfds].events = POLLIN
        self.ring_of[self.nfds] = -1
        self.nfds += 1
        self.uring_slot = -1
        if self.serving.uring is not None:
            self.uring_slot = self.nfds
            self.fds[self.nfds].fd = self.serving.uring.fd
            self.fds[self.nfds].events = POLLIN
            self.ring_of[self.nfds] = -1
            self.nfds += 1
        return 0

    cdef bint in_flight(self) except -1:
        cdef CompiledServed s
        for s in self.served:
            if s.later or s.python_later:
                return True
        return bool(self.worker.device_in_flight())

    cdef double wait_s(self, double asleep_since) except -2.0:
        """How long to sleep: until a held interrupt falls due or a kickless ring's next
        look (the worker's timeout), or the Python loop's next timer (then
        ``python_due`` is set); -1: until something happens."""
        cdef double left = -1.0
        cdef double due
        self.python_due = -1.0
        if self.timed:
            left = self.timeout(asleep_since)
        if self.timers:
            deadline = self.loop.next_deadline()
            if deadline is not None:
                self.python_due = deadline
                due = deadline - vs_now_s()
                if due < 0:
                    due = 0
                if left < 0 or due < left:
                    left = due
        return left

    cdef double timeout(self, double now) noexcept:
        """Worker.timeout: until the next held interrupt is due, or the poll interval of
        a ring without a kick fd; -1: until something happens."""
        cdef double left = -1.0
        cdef double due
        cdef CompiledServed s
        cdef int i
        for i in range(self.nserved):
            s = <CompiledServed>self.served[i]
            due = s.coalescer.deadline_c()
            if due >= 0:
                due = due - now if due > now else 0.0
                if left < 0 or due < left:
                    left = due
            if self.kickless[i] and (left < 0 or POLL_INTERVAL_S < left):
                left = POLL_INTERVAL_S
        return left

    cdef int sleep(self, double seconds) noexcept nogil:
        """poll() the fds for up to ``seconds`` (-1: no limit), to the nanosecond."""
        cdef timespec ts
        if seconds < 0:
            return ppoll(self.fds, self.nfds, NULL, NULL)
        ts.tv_sec = <long>seconds
        ts.tv_nsec = <long>((seconds - ts.tv_sec) * 1e9)
        return ppoll(self.fds, self.nfds, &ts, NULL)

    cdef int wait(self, double seconds) except -2:
        cdef int n
        if vs_only_thread():
            n = self.sleep(seconds)     # nobody else needs the GIL meanwhile
        else:
            with nogil:
                n = self.sleep(seconds)
        return n

    cdef int run_python_loop(self) except -1:
        """The Python event loop's ready fds, due timers and handed-over callbacks."""
        self.loop.run_once(0)
        return 0

    cdef int refresh(self) except -1:
        """Rings may have come or gone (Python ran): look again."""
        if self.worker.generation != self.generation:
            self.rebuild()
        return 0

    def run(self):
        cdef CompiledServed s
        cdef int i, n
        cdef double now, asleep_since, window
        cdef char buf[8]
        cdef bint any_kick
        worker = self.worker
        poll_pacing = worker.poll
        asleep_since = vs_now_s()
        self.rebuild()
        while True:
            self.refresh()
            if worker.gone or not (self.nserved or self.in_flight()):
                break
            if self.before_wait:
                self.loop.run_before_wait()
            n = self.wait(self.wait_s(asleep_since))
            now = vs_now_s()
            any_kick = False
            if n > 0:
                for i in range(self.loop_slot):
                    if self.fds[i].revents:
                        read(self.fds[i].fd, buf, 8)
                        self.kicked[self.ring_of[i]] = 1
                        any_kick = True
                if self.uring_slot >= 0 and self.fds[self.uring_slot].revents:
                    self.serving.uring.reap()
            if ((n > 0 and self.fds[self.loop_slot].revents)
                    or (self.python_due >= 0 and now >= self.python_due)):
                self.run_python_loop()      # its fds, or its timer due
                if worker.gone:
                    break
                self.refresh()
            if any_kick and self.polling:
                poll_pacing.woke(now - asleep_since)
            window = poll_pacing.window if self.polling else 0.0
            for i in range(self.nserved):
                if self.kicked[i] or self.kickless[i]:
                    self.kicked[i] = 0
                    s = self.served[i]
                    if not s.stopping:
                        broken = s.pass_(now, window == 0.0)
                        if broken is not None:
                            worker._break(s.index, broken)
            self.refresh()
            if window and (any_kick or self.any_kickless):
                self.busy_poll(window)
                now = vs_now_s()
                for s in list(self.served):
                    if not s.stopping:
                        broken = s.pass_(now, True)     # re-arm kicks, then sleep
                        if broken is not None:
                            worker._break(s.index, broken)
                self.refresh()
            for i in range(self.nserved):
                s = self.served[i]
                if s.completed:
                    s.publish_c(now)
                if s.coalescing and s.coalescer.held and s.coalescer.due(now):
                    s.signal_c()
            asleep_since = vs_now_s()
        self.loop.close()

    cdef int busy_poll(self, double window) except -1:
        """_Worker._busy_poll: serve the rings with kicks off for as long as chains keep
        coming (or requests answered later keep ending) within ``window`` of each other."""
        cdef CompiledServed s
        cdef double now, deadline
        cdef bint hit
        cdef int i
        cdef pollfd one
        deadline = vs_now_s() + window
        while self.nserved:
            now = vs_now_s()
            hit = False
            if self.serving.uring is not None and self.serving.uring.in_flight:
                self.serving.uring.reap()
            one.fd = self.loop.fileno()
            one.events = POLLIN
            if poll(&one, 1, 0) > 0:
                self.run_python_loop()
                self.refresh()
            for i in range(self.nserved):
                s = self.served[i]
                if s.completed:
                    s.publish_c(now)
                    hit = True
            for i in range(self.nserved):
                s = self.served[i]
                if s.stopping:
                    continue
                try:
                    more = s.ring.has_available_c()
                except RingBroken as exc:
                    self.worker._break(s.index, f"ring broken: {exc}")
                    self.refresh()
                    break
                if more:
                    hit = True
                    broken = s.pass_(now, False)
                    if broken is not None:
                        self.worker._break(s.index, broken)
                        self.refresh()
                        break
            if hit:
                deadline = now + window
            elif now >= deadline:
                break
        return 0
