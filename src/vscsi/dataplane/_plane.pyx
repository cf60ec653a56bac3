# cython: language_level=3
"""vscsi's compiled data plane: the request queues' common case without the interpreter.

The rooms, in request order (each an include, read top to bottom):

* _c.pxi        the C underneath: guest-memory loads and stores, ordering, io_uring
* _memory.pxi   guest memory: region table, address translation
* _ring.pxi     what both ring kinds share: a chain as segments, the Python interface
* _split.pxi    the device side of a split virtqueue (+ in-flight tracking)
* _packed.pxi   the device side of a packed virtqueue (+ in-flight tracking)
* _scsi.pxi     one request: virtio-scsi headers, the LUN, READ / WRITE, counters
* _pacing.pxi   when to signal: the interrupt coalescer
* _served.pxi   a worker's rings: drain, pace, signal, the io_uring, the TMFs' view
* _loop.pxi     the worker's loop

The Python path (vscsi.virtio, vscsi.device, vscsi.scsi) is the reference; everything
here says the same thing in C, and tests/dataplane holds the two to it.
"""

import os

include "_c.pxi"
include "_memory.pxi"
include "_ring.pxi"
include "_split.pxi"
include "_packed.pxi"
include "_scsi.pxi"
include "_pacing.pxi"
include "_served.pxi"
include "_loop.pxi"
