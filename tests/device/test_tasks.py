"""The task table's protocol, driven directly (the device drives begin / end per request)."""

from __future__ import annotations

import pytest

from vscsi.device.tasks import ALL_LUNS, TaskTable
from vscsi.device.wire import VIRTIO_SCSI_S_ABORTED, VIRTIO_SCSI_S_RESET


def test_begin_running_end() -> None:
    tt = TaskTable(3)
    assert list(tt.running(5)) == []
    assert tt.begin(1, 5, 300, 2**64 - 1) == 0
    assert tt.begin(2, 5, 7, 9) == 0
    assert list(tt.running(5)) == [1, 2]
    assert list(tt.running(5, 300)) == [1]
    assert list(tt.running(5, 300, 2**64 - 1)) == [1]
    assert list(tt.running(5, 300, 9)) == []
    assert list(tt.running(4)) == []
    tt.cancel(1, VIRTIO_SCSI_S_ABORTED)
    assert tt.end(1) == VIRTIO_SCSI_S_ABORTED
    assert tt.end(2) == 0
    assert list(tt.running(5)) == []
    assert tt.wait_idle(5, timeout=0)
    # a new task in a slot starts without the previous task's cancel mark
    assert tt.begin(1, 5, 300, 1) == 0 and tt.end(1) == 0


def test_holds() -> None:
    tt = TaskTable(1)
    tt.hold(3, 2, VIRTIO_SCSI_S_ABORTED)
    assert tt.held(3) == VIRTIO_SCSI_S_ABORTED
    assert tt.begin(0, 3, 2, 0) == VIRTIO_SCSI_S_ABORTED
    assert list(tt.running(3)) == []                  # refused tasks do not linger
    assert tt.begin(0, 3, 1, 0) == 0                  # other LUN
    tt.end(0)
    assert tt.begin(0, 4, 2, 0) == 0                  # other target
    tt.end(0)
    tt.hold(3, ALL_LUNS, VIRTIO_SCSI_S_RESET)
    assert tt.begin(0, 3, 1, 0) == VIRTIO_SCSI_S_RESET
    tt.release(3)
    assert tt.held(3) == 0
    assert tt.begin(0, 3, 1, 0) == 0


def test_wait_idle_times_out() -> None:
    tt = TaskTable(1)
    tt.begin(0, 0, 0, 0)
    assert not tt.wait_idle(0, timeout=0.01)
    assert tt.wait_idle(1, timeout=0.01)              # other target: idle


def test_slot_bounds() -> None:
    tt = TaskTable(2)
    with pytest.raises(ValueError):
        tt.slot_offset(2)
    with pytest.raises(ValueError):
        tt.begin(-1, 0, 0, 0)
    with pytest.raises(ValueError):
        tt.begin(2, 0, 0, 0)
    with pytest.raises(ValueError):
        TaskTable(0)
