"""The RPC methods of `vscsi serve` (vscsi.management) on their own: a real device and a
real BackendServer with no front-end attached (its ring restart then just runs the
change), called directly -- what each method changes in the device, what it answers,
and the one-line error a caller gets for what cannot be done. (The RPC transport is
tests/rpc; a live guest under these changes, tests/test_guest_rpc.py.)"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from vscsi.device import ScsiConfig, VirtioScsiDevice
from vscsi.device.wire import VIRTIO_SCSI_T_PARAM_CHANGE, VIRTIO_SCSI_T_TRANSPORT_RESET
from vscsi.management import Management, Port
from vscsi.rpc import MethodError
from vscsi.scsi import LunSpecError, build_targets, parse_lun_spec
from vscsi.scsi.filters import FilterSpecError
from vscsi.vhost_user import BackendServer

MiB = 1 << 20


@pytest.fixture
def mgmt(tmp_path: Path) -> Iterator[Management]:
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(2 * MiB))
    specs = [parse_lun_spec(f"0:0=file:{disk}"), parse_lun_spec("0:1=ram:1M,serial=R")]
    targets = build_targets(specs)
    device = VirtioScsiDevice(targets, ScsiConfig(num_queues=2))
    server = BackendServer(device, str(tmp_path / "s.sock"))
    m = Management([Port(device, server)], specs)
    yield m
    server.shutdown()
    device.close()
    for target in device.targets.values():
        target.close()


def events(m: Management) -> list[int]:
    return [event.event for event in m.device.events.events]


def test_lun_list_describes_every_lun(mgmt: Management) -> None:
    luns = mgmt.lun_list()
    assert [(x["target"], x["lun"], x["kind"], x["size"]) for x in luns] == [
        (0, 0, "file", 2 * MiB), (0, 1, "ram", MiB)]
    assert luns[1]["serial"] == "R" and luns[1]["block_size"] == 512


def test_lun_add_then_remove(mgmt: Management) -> None:
    added = mgmt.lun_add("3:7=null:64M,block-size=4096")
    assert added == {"target": 3, "lun": 7, "spec": "3:7=null:64M,block-size=4096",
                     "size": 64 * MiB, "event": True}
    assert 7 in mgmt.device.targets[3].luns
    assert mgmt.device.stats.lun(3, 7) is not None      # counted from the start
    with pytest.raises(MethodError, match="already exists"):
        mgmt.lun_add("3:7=ram:1M")
    assert mgmt.lun_remove(3, 7) == {"target": 3, "lun": 7, "removed": True}
    assert 3 not in mgmt.device.targets                 # its last LUN: the target goes
    assert events(mgmt) == [VIRTIO_SCSI_T_TRANSPORT_RESET] * 2
    with pytest.raises(MethodError, match="no LUN 3:7"):
        mgmt.lun_remove(3, 7)


def test_a_bad_spec_adds_nothing(mgmt: Management, tmp_path: Path) -> None:
    with pytest.raises(LunSpecError):
        mgmt.lun_add("0:2=tape:1M")
    with pytest.raises(LunSpecError):
        mgmt.lun_add(f"0:2=file:{tmp_path}/missing.img")
    assert sorted(mgmt.device.targets[0].luns) == [0, 1]


def test_resize_grows_files_and_ram_and_tells_the_guest(mgmt: Management) -> None:
    grown = mgmt.lun_resize(0, 0, "4M")
    assert grown["size"] == 4 * MiB and grown["old_size"] == 2 * MiB and grown["event"]
    unit = mgmt.device.targets[0].luns[0]
    assert os.fstat(unit.backend.fd).st_size == 4 * MiB and unit.num_blocks == 8192
    assert unit.unit_attention == (0x2A, 0x09)            # CAPACITY DATA HAS CHANGED
    ram = mgmt.device.targets[0].luns[1]
    ram.backend.view[:4] = b"keep"
    assert mgmt.lun_resize(0, 1, 2 * MiB)["size"] == 2 * MiB
    assert bytes(ram.backend.view[:4]) == b"keep" and ram.backend.size == 2 * MiB
    assert events(mgmt) == [VIRTIO_SCSI_T_PARAM_CHANGE] * 2
    assert mgmt.lun_resize(0, 1, 2 * MiB)["event"] is False       # no change, no event


def test_resize_refuses_what_would_lose_data_or_cannot_be(mgmt: Management) -> None:
    with pytest.raises(MethodError, match="shrink=true"):
        mgmt.lun_resize(0, 0, "1M")
    with pytest.raises(MethodError, match="multiple of the block size"):
        mgmt.lun_resize(0, 0, 1000)
    with pytest.raises(MethodError, match="no LUN 5:5"):
        mgmt.lun_resize(5, 5, "1M")
    assert mgmt.lun_resize(0, 0, "1M", shrink=True)["size"] == MiB


def test_filters_come_and_go_by_id(mgmt: Management) -> None:
    first = mgmt.filter_add(0, 1, "delay:read=1ms")
    second = mgmt.filter_add(0, 1, "error:sense=medium,op=write")
    assert first["id"] != second["id"]
    assert [f["id"] for f in mgmt.filter_list(0, 1)] == [first["id"], second["id"]]
    assert mgmt.filter_remove(0, 1, first["id"])["removed"]
    assert [f["id"] for f in mgmt.filter_list(0, 1)] == [second["id"]]
    with pytest.raises(MethodError, match=f"no filter {first['id']}"):
        mgmt.filter_remove(0, 1, first["id"])
    with pytest.raises(FilterSpecError):
        mgmt.filter_add(0, 1, "teleport:now")


def test_stats_and_steering_cover_every_queue_and_lun(mgmt: Management) -> None:
    stats = mgmt.stats()
    assert [q["queue"] for q in stats["queues"]] == [0, 1]
    assert [(x["target"], x["lun"]) for x in stats["luns"]] == [(0, 0), (0, 1)]
    assert all(q["requests"] == 0 and q["commands"] == 0 for q in stats["queues"])
    assert stats["steering"] == {"targets": [], "interrupts": [0, 0]}


def test_shutdown_and_reopen_logs(mgmt: Management) -> None:
    assert mgmt.reopen_logs() == {"reopened": False}      # logging to stderr
    assert mgmt.shutdown() == {"stopping": True}
    assert mgmt.server._stop


# -- two VMs (two ports) over the same units -------------------------------------------------

@pytest.fixture
def shared(tmp_path: Path) -> Iterator[Management]:
    specs = [parse_lun_spec("0:0=ram:1M")]
    targets = build_targets(specs)
    ports = []
    for n in range(2):
        device = VirtioScsiDevice(dict(targets), ScsiConfig(num_queues=1), nexus=n)
        server = BackendServer(device, str(tmp_path / f"{n}.sock"))
        ports.append(Port(device, server, f"iqn.test:vm{n}"))
    m = Management(ports, specs, pr_dir=str(tmp_path))
    for t, target in targets.items():
        for lun, unit in target.luns.items():
            m.share(unit, t, lun)
    yield m
    for port in ports:
        port.server.shutdown()
        port.device.close()
    for target in targets.values():
        target.close()


def test_lun_changes_reach_every_vm(shared: Management) -> None:
    shared.lun_add("1:0=ram:2M")
    units = [port.device.targets[1].luns[0] for port in shared.ports]
    assert units[0] is units[1] and units[0].nexuses == 2       # one unit, two nexuses
    assert units[0].pr_store is not None
    assert all(port.device.events.events for port in shared.ports)
    shared.lun_resize(1, 0, "4M")
    assert [e.event for e in shared.ports[1].device.events.events][-1] == \
        VIRTIO_SCSI_T_PARAM_CHANGE
    assert units[0].state.unit_attentions(1) == [(0x2A, 0x09)]
    shared.lun_remove(1, 0)
    assert all(1 not in port.device.targets for port in shared.ports)


def test_connections_and_per_vm_stats(shared: Management) -> None:
    assert shared.connections() == [
        {"vm": n, "socket": shared.ports[n].server.socket_path, "initiator": f"iqn.test:vm{n}",
         "connected": False, "sessions": 0} for n in range(2)]
    assert [q["queue"] for q in shared.stats(vm=1)["queues"]] == [0]
    with pytest.raises(MethodError, match="no vm 2"):
        shared.stats(vm=2)


def test_pr_show_and_pr_clear(shared: Management) -> None:
    unit = shared.device.targets[0].luns[0]
    with unit.state.locked():
        record = unit.state.load()
        record.keys = {0: 0xA, 1: 0xB}
        record.type, record.holder, record.generation = 5, 1, 2
        unit.state.store(record)
    shown = shared.pr_show(0, 0)
    assert shown["registrations"] == [
        {"vm": 0, "initiator": "iqn.test:vm0", "key": "0xa"},
        {"vm": 1, "initiator": "iqn.test:vm1", "key": "0xb"}]
    assert shown["holder"] == {"vm": 1, "initiator": "iqn.test:vm1"}
    assert shown["type"] == "Write Exclusive, registrants only" and shown["generation"] == 2
    assert shared.lun_list()[0]["reservation"] == {k: v for k, v in shown.items()
                                                   if k not in ("target", "lun")}
    cleared = shared.pr_clear(0, 0)
    assert cleared["cleared"]["holder"]["vm"] == 1
    after = shared.pr_show(0, 0)
    assert after["registrations"] == [] and after["type"] is None and after["generation"] == 3
    # each VM that was registered learns it on its next command
    assert unit.state.unit_attentions(0) == unit.state.unit_attentions(1) == [(0x2A, 0x03)]
    with pytest.raises(MethodError, match="no LUN 4:4"):
        shared.pr_show(4, 4)
