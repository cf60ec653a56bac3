"""Shared disks on the host (issue 20): one `vscsi serve` with two ``--socket``s, a real
vhost-user front-end on each (tests/vhost_user/rig.py: two VMs as far as the back-end can
tell), on both data planes. Persistent reservations decided across the two VMs' worker
processes the moment a PR OUT completes, the unit attentions the other VM gets, APTPL
across a restart, COMPARE AND WRITE raced from both, and the RPC's view and pr_clear.
(Real guests with sg_persist and sg_compare_and_write: tests/test_guest_shared.py.)"""

from __future__ import annotations

import json
import signal
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vhost_user.rig import TestGuest
from vscsi.dataplane import compiled
from vscsi.rpc import Client
from vscsi.testing.serve import ServeProcess

GOOD, CHECK, CONFLICT = 0x00, 0x02, 0x18
REQ = 2                                     # the first request queue's virtqueue

PLANES = ["python", pytest.param("compiled", marks=pytest.mark.skipif(
    compiled is None, reason="the compiled data plane is not built"))]


def read10(lba: int, blocks: int = 1) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


def write10(lba: int, blocks: int = 1) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0, lba, 0, blocks, 0)


def pr_in(sa: int, alloc: int = 512) -> bytes:
    return struct.pack(">BBxxxxxHB", 0x5E, sa, alloc, 0)


def pr_out(sa: int, type_: int = 0) -> bytes:
    return struct.pack(">BBBxxIB", 0x5F, sa, type_, 24, 0)


def pr_params(key: int = 0, sa_key: int = 0, *, aptpl: bool = False) -> bytes:
    return struct.pack(">QQIBxH", key, sa_key, 0, 1 if aptpl else 0, 0)


def caw(lba: int, blocks: int = 1) -> bytes:
    return struct.pack(">BBQxxxBBB", 0x89, 0, lba, blocks, 0, 0)


REGISTER, RESERVE, RELEASE, CLEAR, PREEMPT, PREEMPT_AND_ABORT = range(6)
WE_RO = 5


class Vm:
    """One front-end on one of the sockets: commands on its one request queue."""

    def __init__(self, path: str) -> None:
        self.g = TestGuest.connect(path)
        self.g.negotiate()
        self.g.start_queue(REQ)

    def cmd(self, cdb: bytes, *, out: bytes = b"", in_len: int = 0):  # type: ignore[no-untyped-def]
        return self.g.command(REQ, 0, 0, cdb, data_out=out, data_in=in_len)

    def status(self, cdb: bytes, *, out: bytes = b"", in_len: int = 0) -> int:
        return self.cmd(cdb, out=out, in_len=in_len).status

    def sense(self, cdb: bytes, **kw: object) -> tuple[int, int, int]:
        r = self.cmd(cdb, **kw)  # type: ignore[arg-type]
        assert r.status == CHECK, r
        return r.sense[2] & 0x0F, r.sense[12], r.sense[13]

    def keys(self) -> tuple[int, list[int]]:
        data = self.cmd(pr_in(0), in_len=512).data
        generation, length = struct.unpack_from(">II", data)
        return generation, [struct.unpack_from(">Q", data, 8 + i)[0]
                            for i in range(0, length, 8)]

    def reservation(self) -> tuple[int, int] | None:
        data = self.cmd(pr_in(1), in_len=512).data
        if struct.unpack_from(">I", data, 4)[0] == 0:
            return None
        key, = struct.unpack_from(">Q", data, 8)
        return key, data[21] & 0x0F

    def close(self) -> None:
        self.g.close()


@pytest.fixture
def two_vms(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple]:
    plane = getattr(request, "param", "python")
    disk = tmp_path / "shared.img"
    disk.write_bytes(bytes(1 << 20))
    second = str(tmp_path / "b.sock")
    serve = ServeProcess([f"0:0=file:{disk}"], directory=str(tmp_path), queues=1,
                         extra=["--socket", second, "--dataplane", plane,
                                "--pr-state", str(tmp_path)]).start()
    vms: list[Vm] = []
    try:
        vms = [Vm(serve.socket), Vm(second)]
        yield serve, vms[0], vms[1], disk
    finally:
        for vm in vms:
            vm.close()
        serve.kill()


@pytest.mark.parametrize("two_vms", PLANES, indirect=True)
def test_a_reservation_holds_across_the_two_vms(two_vms) -> None:  # type: ignore[no-untyped-def]
    serve, a, b, disk = two_vms
    block = b"\xAB" * 512
    assert a.status(write10(0), out=block) == GOOD and b.status(write10(1), out=block) == GOOD
    # A registers 0xA and reserves Write Exclusive - Registrants Only
    assert a.status(pr_out(REGISTER), out=pr_params(0, 0xA)) == GOOD
    assert a.status(pr_out(RESERVE, WE_RO), out=pr_params(0xA)) == GOOD
    # B, not registered: reads, and its writes conflict -- decided in B's own worker
    assert b.status(read10(0), in_len=512) == GOOD
    for _ in range(3):
        assert b.status(write10(2), out=block) == CONFLICT
    assert a.status(write10(3), out=block) == GOOD
    # B registers 0xB: now a registrant, it may write
    assert b.status(pr_out(REGISTER), out=pr_params(0, 0xB)) == GOOD
    assert b.status(write10(4), out=block) == GOOD
    assert a.keys() == b.keys() and sorted(a.keys()[1]) == [0xA, 0xB]
    assert a.reservation() == b.reservation() == (0xA, WE_RO)
    # A preempts and aborts B's key: B sees REGISTRATIONS PREEMPTED once, then conflicts
    assert a.status(pr_out(PREEMPT_AND_ABORT, WE_RO), out=pr_params(0xA, 0xB)) == GOOD
    assert b.sense(write10(5), out=block) == (0x06, 0x2A, 0x05)
    assert b.status(write10(5), out=block) == CONFLICT
    assert a.keys()[1] == [0xA] and b.keys() == a.keys()
    data = disk.read_bytes()
    assert data[2 * 512:3 * 512] == bytes(512) and data[5 * 512:6 * 512] == bytes(512)
    assert data[4 * 512:5 * 512] == block
    # the RPC sees the same, and an administrator can break it
    with Client(serve.socket + ".rpc") as rpc:
        shown = rpc.call("pr_show", target=0, lun=0)
        assert shown["registrations"] == [{"vm": 0, "initiator": shown["registrations"][0][
            "initiator"], "key": "0xa"}]
        assert shown["type"] == "Write Exclusive, registrants only"
        assert shown["holder"]["vm"] == 0
        assert [c["vm"] for c in rpc.call("connections")] == [0, 1]
        assert all(c["connected"] for c in rpc.call("connections"))
        rpc.call("pr_clear", target=0, lun=0)
    assert a.sense(read10(0), in_len=512) == (0x06, 0x2A, 0x03)     # RESERVATIONS PREEMPTED
    assert b.status(write10(5), out=block) == GOOD


@pytest.mark.parametrize("two_vms", PLANES, indirect=True)
def test_compare_and_write_raced_from_both_vms(two_vms) -> None:  # type: ignore[no-untyped-def]
    _serve, a, b, disk = two_vms
    current = bytes(512)
    for round_ in range(20):
        mine = {a: bytes([round_ * 2 + 1]) * 512, b: bytes([round_ * 2 + 2]) * 512}
        results: dict[Vm, object] = {}
        barrier = threading.Barrier(2)

        def race(vm: Vm, data: bytes, barrier: threading.Barrier = barrier,
                 results: dict[Vm, object] = results) -> None:
            barrier.wait()
            results[vm] = vm.cmd(caw(7), out=data)

        threads = [threading.Thread(target=race, args=(vm, current + mine[vm]))
                   for vm in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        won = [vm for vm, r in results.items() if r.status == GOOD]  # type: ignore[attr-defined]
        lost = [vm for vm, r in results.items() if r.status != GOOD]  # type: ignore[attr-defined]
        assert len(won) == 1 and len(lost) == 1, results
        r = results[lost[0]]
        assert r.status == CHECK and r.sense[2] & 0x0F == 0x0E        # MISCOMPARE
        assert (r.sense[12], r.sense[13]) == (0x1D, 0x00)
        assert r.sense[0] & 0x80 and struct.unpack_from(">I", r.sense, 3)[0] == 0  # byte 0
        current = mine[won[0]]
        assert disk.read_bytes()[7 * 512:8 * 512] == current


def test_aptpl_survives_a_restart_and_plain_registrations_do_not(tmp_path: Path) -> None:
    disk = tmp_path / "shared.img"
    disk.write_bytes(bytes(1 << 20))
    second = str(tmp_path / "b.sock")
    args = dict(directory=str(tmp_path), queues=1)
    extra = ["--socket", second, "--pr-state", str(tmp_path)]
    serve = ServeProcess([f"0:0=file:{disk}", f"0:1=file:{disk}"], extra=extra, **args).start()
    try:
        a, b = Vm(serve.socket), Vm(second)
        assert b.status(pr_out(REGISTER), out=pr_params(0, 0xB, aptpl=True)) == GOOD
        assert b.status(pr_out(RESERVE, 1), out=pr_params(0xB)) == GOOD
        # LUN 0:1 without APTPL
        assert a.g.command(REQ, 0, 1, pr_out(REGISTER), data_out=pr_params(0, 0xA)).status \
            == GOOD
        generation = b.keys()[0]
        a.close()
        b.close()
        assert serve.stop(signal.SIGTERM) == 0
        assert (tmp_path / "pr-0-0.json").exists() and not (tmp_path / "pr-0-1.json").exists()
        # restarted with the sockets the other way round: each VM gets its own back
        serve = ServeProcess([f"0:0=file:{disk}", f"0:1=file:{disk}"], socket_path=second,
                             extra=["--socket", str(tmp_path / "vs.sock"),
                                    "--pr-state", str(tmp_path)], **args).start()
        a, b = Vm(str(tmp_path / "vs.sock")), Vm(second)
        assert b.keys() == (generation, [0xB]) and b.reservation() == (0xB, 1)
        assert a.status(write10(0), out=bytes(512)) == CONFLICT
        assert b.status(write10(0), out=bytes(512)) == GOOD
        assert a.g.command(REQ, 0, 1, pr_in(0), data_in=64).data[4:8] == bytes(4)
        # REPORT CAPABILITIES: PTPL_C (persistence offered) and PTPL_A (active)
        caps = b.cmd(pr_in(2), in_len=8).data
        assert caps[2] & 0x01 and caps[3] & 0x01
        a.close()
        b.close()
    finally:
        serve.kill()


def test_aptpl_without_a_place_to_keep_it_is_refused(tmp_path: Path) -> None:
    with ServeProcess(["0:0=ram:1M"], directory=str(tmp_path), queues=1) as serve:
        vm = Vm(serve.socket)
        try:
            assert vm.sense(pr_out(REGISTER), out=pr_params(0, 1, aptpl=True)) == \
                (0x05, 0x26, 0x00)                  # INVALID FIELD IN PARAMETER LIST
            assert vm.cmd(pr_in(2), in_len=8).data[2] & 0x01 == 0      # PTPL_C 0
            assert vm.status(pr_out(REGISTER), out=pr_params(0, 1)) == GOOD
        finally:
            vm.close()


@pytest.mark.parametrize("args, words", [
    (["--socket", "SAME"], "given twice"),
    (["--pr-state", "/nonexistent/dir"], "not a directory"),
])
def test_bad_shared_arguments(tmp_path: Path, args: list[str], words: str) -> None:
    import subprocess
    import sys

    sock = str(tmp_path / "a.sock")
    args = [sock if a == "SAME" else a for a in args]
    r = subprocess.run([sys.executable, "-m", "vscsi.serve", "--socket", sock,
                        "--lun", "0:0=ram:1M", *args], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr


def test_a_vm_that_goes_away_does_not_disturb_the_other(tmp_path: Path) -> None:
    disk = tmp_path / "shared.img"
    disk.write_bytes(bytes(1 << 20))
    second = str(tmp_path / "b.sock")
    with ServeProcess([f"0:0=file:{disk}"], directory=str(tmp_path), queues=1,
                      extra=["--socket", second]) as serve:
        a, b = Vm(serve.socket), Vm(second)
        try:
            assert a.status(pr_out(REGISTER), out=pr_params(0, 0xA)) == GOOD
            for i in range(3):
                # A's QEMU dies with requests queued, then a new one connects
                a.g.submit(REQ, 0, 0, write10(100 + i), data_out=b"a" * 512)
                a.g.kick(REQ)
                a.g.client.sock.close()
                for k in range(20):
                    assert b.status(write10(k), out=bytes([i + 1]) * 512) == GOOD
                a.close()
                a = Vm(serve.socket)
                assert a.status(read10(0), in_len=512) == GOOD
                # the registration is the nexus's, not the connection's: it stays
                assert a.keys()[1] == [0xA]
            data = disk.read_bytes()
            assert all(data[k * 512:(k + 1) * 512] == b"\3" * 512 for k in range(20))
            assert "Traceback" not in serve.output()
        finally:
            a.close()
            b.close()
    # each VM's counters in its own stats file, the second one's at PATH.1
    # (A: its REGISTER, a read and a READ KEYS per connection, and the writes queued as its
    # connections dropped that a worker took first)
    assert 1 + 3 * 2 <= json.loads(Path(serve.stats).read_text())["per_queue"][0] <= 10
    assert json.loads(Path(serve.stats + ".1").read_text())["per_queue"] == [60]
    assert f"front-end #4 on {serve.socket} connected" in serve.output()
