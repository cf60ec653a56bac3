"""The task table is shared with forked workers: the control worker (this process) sees
and aborts the task a request worker (a child) is running."""

from __future__ import annotations

import os
import threading

from vscsi.device import FIRST_REQUEST_QUEUE, ScsiConfig, VirtioScsiDevice
from vscsi.device.wire import (
    VIRTIO_SCSI_S_ABORTED,
    VIRTIO_SCSI_S_FUNCTION_COMPLETE,
    VIRTIO_SCSI_S_FUNCTION_SUCCEEDED,
    VIRTIO_SCSI_T_TMF_ABORT_TASK,
    VIRTIO_SCSI_T_TMF_QUERY_TASK,
)

from .helpers import BLOCK, OP_HOOK, FakeTarget, cmd_header, request, tmf


def control(device: VirtioScsiDevice, subtype: int, tag: int) -> int:
    chain, resp = tmf(subtype, 0, 0, tag)
    assert device.handle_control(chain) == 1
    return resp[0]


def test_abort_task_running_in_a_forked_worker() -> None:
    target = FakeTarget({0: bytearray(4 * BLOCK)})
    device = VirtioScsiDevice({0: target}, ScsiConfig(num_queues=2), tmf_timeout=10)
    started_r, started_w = os.pipe()
    release_r, release_w = os.pipe()
    result_r, result_w = os.pipe()

    def hook(_lun: int) -> None:
        os.write(started_w, b"s")
        os.read(release_r, 1)

    target.hook = hook
    pid = os.fork()
    if pid == 0:                                     # the request worker of queue 3
        code = 1
        try:
            req = request(cmd_header(0, 0, bytes([OP_HOOK]) + bytes(9), tag=42))
            device.handle_request(req.chain, FIRST_REQUEST_QUEUE + 1)
            os.write(result_w, bytes([req.resp_buf[11]]))
            code = 0
        finally:
            os._exit(code)
    try:
        assert os.read(started_r, 1) == b"s"
        assert control(device, VIRTIO_SCSI_T_TMF_QUERY_TASK, 42) == VIRTIO_SCSI_S_FUNCTION_SUCCEEDED
        assert control(device, VIRTIO_SCSI_T_TMF_QUERY_TASK, 43) == VIRTIO_SCSI_S_FUNCTION_COMPLETE
        out: list[int] = []
        abort = threading.Thread(
            target=lambda: out.append(control(device, VIRTIO_SCSI_T_TMF_ABORT_TASK, 42)))
        abort.start()
        abort.join(0.05)
        assert abort.is_alive()                      # waiting for the child's task
        os.write(release_w, b"r")
        assert os.read(result_r, 1)[0] == VIRTIO_SCSI_S_ABORTED
        abort.join(10)
        assert out == [VIRTIO_SCSI_S_FUNCTION_COMPLETE]
    finally:
        os.write(release_w, b"r")
        _, status = os.waitpid(pid, 0)
        for fd in (started_r, started_w, release_r, release_w, result_r, result_w):
            os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0
    assert target.calls == []                        # the parent's copy never ran it
