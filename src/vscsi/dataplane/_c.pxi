# The C the data plane stands on: fixed-width loads and stores of guest memory in the
# virtio byte order (little endian), the CDB's big-endian fields, memory ordering, the
# clock, and the system calls of the worker loop. Guest memory is the other side's: every
# multi-byte field is read once, with memcpy (any alignment), into a local that is then
# checked; the indices the other side publishes are read with acquire, ours published with
# release, so the ring entries they cover are ordered on any CPU (the Python path needs a
# lock for that on weakly ordered CPUs, ring.py).

from libc.stdint cimport (
    int16_t,
    int32_t,
    int64_t,
    uint8_t,
    uint16_t,
    uint32_t,
    uint64_t,
)
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcpy, memset

cdef extern from *:
    """
    #include <endian.h>
    #include <errno.h>
    #define _GNU_SOURCE 1
    #include <poll.h>
    #include <stdint.h>
    #include <string.h>
    #include <sys/uio.h>
    #include <time.h>
    #include <unistd.h>

    static inline uint16_t vs_acquire16(const void *p) {
        uint16_t v; __atomic_load((const uint16_t *)p, &v, __ATOMIC_ACQUIRE);
        return le16toh(v);
    }
    static inline void vs_release16(void *p, uint16_t v) {
        uint16_t le = htole16(v); __atomic_store((uint16_t *)p, &le, __ATOMIC_RELEASE);
    }
    static inline uint16_t vs_le16(const void *p) { uint16_t v; memcpy(&v, p, 2); return le16toh(v); }
    static inline uint32_t vs_le32(const void *p) { uint32_t v; memcpy(&v, p, 4); return le32toh(v); }
    static inline uint64_t vs_le64(const void *p) { uint64_t v; memcpy(&v, p, 8); return le64toh(v); }
    static inline void vs_put_le16(void *p, uint16_t v) { v = htole16(v); memcpy(p, &v, 2); }
    static inline void vs_put_le32(void *p, uint32_t v) { v = htole32(v); memcpy(p, &v, 4); }
    static inline void vs_put_le64(void *p, uint64_t v) { v = htole64(v); memcpy(p, &v, 8); }
    static inline uint16_t vs_be16(const void *p) { uint16_t v; memcpy(&v, p, 2); return be16toh(v); }
    static inline uint32_t vs_be32(const void *p) { uint32_t v; memcpy(&v, p, 4); return be32toh(v); }
    static inline uint64_t vs_be64(const void *p) { uint64_t v; memcpy(&v, p, 8); return be64toh(v); }
    /* A full fence: a store (notifications on, used idx) before a load of the other
       side's wish (avail idx, used_event). */
    static inline void vs_mb(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
    /* The order of two stores of ours (a used element before the index that publishes
       it; the len and id of a packed used descriptor before its flags). */
    static inline void vs_wmb(void) { __atomic_thread_fence(__ATOMIC_RELEASE); }
    static inline int64_t vs_now_ns(void) {
        struct timespec ts; clock_gettime(CLOCK_MONOTONIC, &ts);
        return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
    }
    static inline int vs_errno(void) { return errno; }
    /* The dirty log: page p's bit, set atomically (other workers, and the front-end
       clearing the log, touch the same bytes). */
    static inline void vs_log_page(uint8_t *bits, uint64_t page) {
        __atomic_fetch_or(bits + (page >> 3), (uint8_t)(1u << (page & 7)), __ATOMIC_RELAXED);
    }
    /* Bit length of a non-negative value, as Python's int.bit_length(). */
    static inline int vs_bit_length(uint64_t v) { return v ? 64 - __builtin_clzll(v) : 0; }
    """
    uint16_t vs_acquire16(const void *p) nogil
    void vs_release16(void *p, uint16_t v) nogil
    uint16_t vs_le16(const void *p) nogil
    uint32_t vs_le32(const void *p) nogil
    uint64_t vs_le64(const void *p) nogil
    void vs_put_le16(void *p, uint16_t v) nogil
    void vs_put_le32(void *p, uint32_t v) nogil
    void vs_put_le64(void *p, uint64_t v) nogil
    uint16_t vs_be16(const void *p) nogil
    uint32_t vs_be32(const void *p) nogil
    uint64_t vs_be64(const void *p) nogil
    void vs_mb() nogil
    void vs_wmb() nogil
    int64_t vs_now_ns() nogil
    int vs_errno() nogil
    int vs_bit_length(uint64_t v) nogil
    void vs_log_page(uint8_t *bits, uint64_t page) nogil

    int EAGAIN, EINTR, EINVAL
    ctypedef long ssize_t

    struct iovec:
        void *iov_base
        size_t iov_len
    ssize_t preadv(int fd, const iovec *iov, int iovcnt, long offset) nogil
    ssize_t pwritev(int fd, const iovec *iov, int iovcnt, long offset) nogil
    ssize_t read(int fd, void *buf, size_t count) nogil
    ssize_t write(int fd, const void *buf, size_t count) nogil

    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout) nogil
    short POLLIN
    struct timespec:
        long tv_sec
        long tv_nsec
    ctypedef struct sigset_t:
        pass
    int ppoll(pollfd *fds, unsigned long nfds, const timespec *tmo, const sigset_t *sigmask) nogil


# io_uring (liburing, linked statically when the build found it: setup.py). Without it
# vs_uring_init fails with ENOSYS and every io_uring LUN goes to the Python path.
cdef extern from *:
    """
    #ifdef VSCSI_URING
    #include <liburing.h>
    #include <sys/eventfd.h>
    typedef struct { struct io_uring ring; int efd; unsigned queued; } vs_uring;
    static int vs_uring_init(vs_uring *u, unsigned entries) {
        int r = io_uring_queue_init(entries, &u->ring, 0);
        if (r < 0) return r;
        u->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        if (u->efd < 0) { r = -errno; io_uring_queue_exit(&u->ring); return r; }
        r = io_uring_register_eventfd(&u->ring, u->efd);
        if (r < 0) { close(u->efd); io_uring_queue_exit(&u->ring); return r; }
        u->queued = 0;
        return 0;
    }
    static void vs_uring_exit(vs_uring *u) { io_uring_queue_exit(&u->ring); close(u->efd); }
    /* Queue one readv/writev; 0, or -EBUSY when the submission queue is full. */
    static int vs_uring_rw(vs_uring *u, int write, int fd, const struct iovec *iov,
                           int n, uint64_t offset, void *data) {
        struct io_uring_sqe *sqe = io_uring_get_sqe(&u->ring);
        if (!sqe) {
            io_uring_submit(&u->ring);
            u->queued = 0;
            sqe = io_uring_get_sqe(&u->ring);
            if (!sqe) return -EBUSY;
        }
        if (write) io_uring_prep_writev(sqe, fd, iov, n, offset);
        else io_uring_prep_readv(sqe, fd, iov, n, offset);
        io_uring_sqe_set_data(sqe, data);
        u->queued++;
        return 0;
    }
    static int vs_uring_submit(vs_uring *u) {
        if (!u->queued) return 0;
        u->queued = 0;
        return io_uring_submit(&u->ring);
    }
    /* The next completion (its data and result), or 0 when none is ready. */
    static int vs_uring_reap(vs_uring *u, void **data, int *res) {
        struct io_uring_cqe *cqe;
        if (io_uring_peek_cqe(&u->ring, &cqe) != 0) return 0;
        *data = io_uring_cqe_get_data(cqe);
        *res = cqe->res;
        io_uring_cqe_seen(&u->ring, cqe);
        return 1;
    }
    #else
    typedef struct { int efd; unsigned queued; } vs_uring;
    static int vs_uring_init(vs_uring *u, unsigned entries) { u->efd = -1; return -ENOSYS; }
    static void vs_uring_exit(vs_uring *u) { }
    static int vs_uring_rw(vs_uring *u, int write, int fd, const struct iovec *iov,
                           int n, uint64_t offset, void *data) { return -ENOSYS; }
    static int vs_uring_submit(vs_uring *u) { return 0; }
    static int vs_uring_reap(vs_uring *u, void **data, int *res) { return 0; }
    #endif
    """
    ctypedef struct vs_uring:
        int efd
        unsigned queued
    int vs_uring_init(vs_uring *u, unsigned entries) nogil
    void vs_uring_exit(vs_uring *u) nogil
    int vs_uring_rw(vs_uring *u, int write, int fd, const iovec *iov, int n,
                    uint64_t offset, void *data) nogil
    int vs_uring_submit(vs_uring *u) nogil
    int vs_uring_reap(vs_uring *u, void **data, int *res) nogil
