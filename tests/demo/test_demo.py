"""The README's demo, run for real: vscsi serve + a Linux guest under QEMU + fio."""

import pytest

from vscsi.demo import main, parse_interrupts

INTERRUPTS = """\
           CPU0       CPU1
 24:          0          0   PCI-MSI 65536-edge      virtio0-config
 25:          0          0   PCI-MSI 65537-edge      virtio0-control
 27:        395          0   PCI-MSI 65539-edge      virtio0-request
 28:          0       3900   PCI-MSI 65540-edge      virtio0-request
NMI:          0          0   Non-maskable interrupts
"""


def test_parse_interrupts_keeps_request_queues_apart():
    assert parse_interrupts(INTERRUPTS) == [
        ("virtio0-control", [0, 0]),
        ("virtio0-request", [395, 0]),
        ("virtio0-request", [0, 3900]),
    ]
    assert parse_interrupts("no table here") == []


@pytest.mark.guest
def test_demo_runs_and_every_queue_carries_io(capsys):
    assert main(["--runtime", "5"]) == 0
    out = capsys.readouterr().out
    assert "errors 0.00%" in out
    assert "sda: VSCSI" in out and "sdb: VSCSI" in out
