"""`vscsi serve` as a subprocess, driven by our own front-end and guest: real SCSI
requests over several request queues, per-queue counts, front-ends that come and go, and
hostile front-ends. One back-end serves the whole module, which is itself the test that
it survives every client before the next."""

from __future__ import annotations

import os
import select
import signal
import socket
import struct
import time
from collections.abc import Iterator

import pytest

from vscsi.dataplane import compiled
from vscsi.testing.serve import ServeProcess
from vscsi.vhost_user import codec
from vscsi.vhost_user.codec import HEADER, U64, MemoryTable, Request, VringFile
from vscsi.vhost_user.frontend import BackendGone, FrontendClient, RequestRefused

from .rig import (
    INQUIRY,
    READ_CAPACITY_10,
    TestGuest,
    raw_socket,
    read10,
    write10,
)

DESC = struct.Struct("<QIHH")
NEXT, WRITE, INDIRECT = 1, 2, 4
LUNS = ["0:0=ram:4M", "1:0=ram:4M,serial=SECOND"]


@pytest.fixture(scope="module", params=["compiled", "python"])
def server(request: pytest.FixtureRequest,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """One back-end per data plane: every hostile front-end meets both."""
    if request.param == "compiled" and compiled is None:
        pytest.skip("the compiled data plane is not built")
    tmp = str(tmp_path_factory.mktemp("serve"))
    # one worker process per queue (on a 2-CPU host the default is one for both), each
    # pinned to a CPU of ours (by default they are not pinned)
    cpus = ",".join(map(str, sorted(os.sched_getaffinity(0))))
    proc = ServeProcess(LUNS, directory=tmp, queues=2, extra=["--workers", "2", "--cpus", cpus,
                                                    "--dataplane", request.param]).start()
    try:
        yield proc
        assert proc.alive(), proc.output()
        assert proc.stop() == 0, proc.output()
        assert not os.path.exists(proc.socket)
    finally:
        proc.kill()


@pytest.fixture
def guest(server: ServeProcess) -> Iterator[TestGuest]:
    g = TestGuest.connect(server.socket)
    g.negotiate()
    yield g
    g.close()
    assert server.alive(), server.output()


def start_all(g: TestGuest) -> None:
    for i in range(4):
        g.start_queue(i)


def requests_of(server: ServeProcess) -> list[int]:
    return server.read_stats()["per_queue"]


def wait_session_end(server: ServeProcess, sessions: int) -> dict:
    return server.wait_stats(lambda s: s["sessions"] >= sessions and all(
        q["state"] != "running" for q in s["queues"].values()))


# --------------------------------------------------------------------------- real I/O


def test_scsi_requests_over_two_queues(server: ServeProcess, guest: TestGuest) -> None:
    start_all(guest)
    before = server.wait_stats(lambda s: True)["per_queue"]
    r = guest.command(2, 0, 0, INQUIRY, data_in=96)
    assert r.response == 0 and r.status == 0 and r.data[8:13] == b"VSCSI"
    r = guest.command(3, 1, 0, READ_CAPACITY_10, data_in=8)
    last_lba, block = struct.unpack(">II", r.data)
    assert (last_lba + 1) * block == 4 << 20
    # a batch per queue, kicked once: the worker must drain all of it in one wake-up
    for q, target in ((2, 0), (3, 1)):
        for i in range(20):
            guest.submit(q, target, 0, write10(i, 1), data_out=bytes([q * 16 + i]) * 512)
        guest.kick(q)
    for q in (2, 3):
        assert all(r.status == 0 and r.response == 0 for r in guest.wait(q, 20))
    # read each disk back through the *other* queue
    for q, target in ((3, 0), (2, 1)):
        src = 2 if target == 0 else 3
        r = guest.command(q, target, 0, read10(0, 20), data_in=20 * 512)
        assert r.status == 0
        assert r.data == b"".join(bytes([src * 16 + i]) * 512 for i in range(20))
    stats = server.wait_stats(lambda s: s["per_queue"] != before)
    assert stats["queues"]["2"]["state"] == "running"
    after = server.wait_stats(lambda s: sum(s["per_queue"]) - sum(before) == 44)["per_queue"]
    assert [a - b for a, b in zip(after, before, strict=True)] == [22, 22]
    # one worker process per request queue, each pinned to its own CPU
    q2, q3 = stats["queues"]["2"], stats["queues"]["3"]
    assert q2["pid"] != q3["pid"] and server.proc.pid not in (q2["pid"], q3["pid"])
    cpus = sorted(os.sched_getaffinity(0))
    assert q2["cpu"] == cpus[0] and q3["cpu"] == cpus[1 % len(cpus)]


def test_second_frontend_sees_the_data_and_resumes(server: ServeProcess) -> None:
    g = TestGuest.connect(server.socket)
    g.negotiate()
    g.start_queue(2)
    r = g.command(2, 0, 0, write10(100, 1), data_out=b"persist!" * 64)
    assert r.status == 0
    base = g.client.get_vring_base(2)
    assert base == 1
    sessions = server.read_stats()["sessions"]
    g.close()
    wait_session_end(server, sessions)
    # a new front-end (a guest reboot, a new QEMU): the same back-end, no restart
    g2 = TestGuest.connect(server.socket)
    try:
        g2.negotiate()
        g2.start_queue(3)
        r = g2.command(3, 0, 0, read10(100, 1), data_in=512)
        assert r.data == b"persist!" * 64
    finally:
        g2.close()


def test_stop_and_restart_a_ring_mid_session(guest: TestGuest) -> None:
    q = guest.start_queue(2)
    for _ in range(3):
        assert guest.command(2, 0, 0, INQUIRY, data_in=36).status == 0
    guest.client.set_vring_enable(2, False)
    assert guest.client.get_vring_base(2) == 3
    # restart from the same ring memory: NUM, BASE 3, ADDR, KICK, ENABLE
    from vscsi.vhost_user.frontend import attach_ring

    old = q.fds
    q.fds = attach_ring(guest.client, guest.mem, 2, q.ring.addrs, base=3)
    os.close(old.kick)
    os.close(old.call)
    assert guest.command(2, 0, 0, INQUIRY, data_in=36).status == 0


def test_new_call_fd_on_a_running_ring_is_signalled_once(guest: TestGuest) -> None:
    """QEMU swaps in the guest's irqfd while the ring runs and checks its old notifier at
    once: the back-end signals the new fd so a completion in between is never lost."""
    q = guest.start_queue(2)
    new_call = os.eventfd(0, os.EFD_NONBLOCK)
    guest.client.set_vring_call(2, new_call)
    assert select.select([new_call], [], [], 5)[0] == [new_call]
    os.close(q.fds.call)
    q.fds.call = new_call
    os.eventfd_read(new_call)
    assert guest.command(2, 0, 0, INQUIRY, data_in=36).status == 0


def test_reply_ack_on_everything(guest: TestGuest) -> None:
    assert guest.client.ack  # REPLY_ACK negotiated: each request above was acked
    with pytest.raises(RequestRefused):
        guest.client.set_vring_num(7, 64)
    assert guest.client.get_config(0, 4) == struct.pack("<I", 2)  # num_queues
    assert guest.client.get_config(30, 16) is None


# --------------------------------------------------------------------------- hostile


def expect_disconnect(sock: socket.socket) -> None:
    ready, _, _ = select.select([sock], [], [], 10)
    assert ready, "back-end did not react"
    try:
        assert sock.recv(4096) == b""
    except ConnectionResetError:
        pass


def test_garbage_header_disconnects(server: ServeProcess) -> None:
    s = raw_socket(server.socket)
    s.sendall(b"\xff" * 12)
    expect_disconnect(s)
    s.close()


def test_huge_size_disconnects(server: ServeProcess) -> None:
    s = raw_socket(server.socket)
    s.sendall(HEADER.pack(Request.SET_MEM_TABLE, 1, 1 << 31))
    expect_disconnect(s)
    s.close()


def test_unknown_request_gets_an_error_ack(server: ServeProcess) -> None:
    c = FrontendClient.connect(server.socket)
    try:
        c.send_raw(HEADER.pack(1234, 0x9, 3) + b"abc")
        reply = c.receive()
        assert reply.reply and reply.payload == U64(1)
    except codec.RemoteProtocolError as exc:  # our reader does not know code 1234 either
        assert "1234" in str(exc)
    finally:
        c.close()
    c = FrontendClient.connect(server.socket)
    try:
        data = HEADER.pack(1234, 0x9, 0)
        c.send_raw(data)
        raw = c.sock.recv(20)
        assert raw == HEADER.pack(1234, 5, 8) + struct.pack("=Q", 1)
        assert c.get_features()  # still in step
    finally:
        c.close()


def test_wrong_sizes(server: ServeProcess) -> None:
    c = FrontendClient.connect(server.socket)
    try:
        # SET_FEATURES with 4 bytes and NEED_REPLY: error ack, connection kept
        c.send_raw(HEADER.pack(Request.SET_FEATURES, 0x9, 4) + b"\0\0\0\0")
        assert c.sock.recv(20) == HEADER.pack(Request.SET_FEATURES, 5, 8) + struct.pack("=Q", 1)
        assert c.get_features()
        # GET_FEATURES with a payload: nothing sensible to answer -> disconnect
        c.send_raw(HEADER.pack(Request.GET_FEATURES, 0x1, 8) + bytes(8))
        expect_disconnect(c.sock)
    finally:
        c.close()
    c = FrontendClient.connect(server.socket)
    try:  # without NEED_REPLY a malformed request ends the session
        c.send_raw(HEADER.pack(Request.SET_VRING_NUM, 0x1, 3) + b"abc")
        expect_disconnect(c.sock)
    finally:
        c.close()


def test_mem_table_without_fds(server: ServeProcess) -> None:
    c = FrontendClient.connect(server.socket)
    try:
        c.set_owner()
        table = MemoryTable((codec.MemoryRegion(0, 1 << 20, 0x7F00_0000_0000, 0),))
        c.send_raw(HEADER.pack(Request.SET_MEM_TABLE, 0x9, len(table.pack())) + table.pack())
        assert c.sock.recv(20) == HEADER.pack(Request.SET_MEM_TABLE, 5, 8) + struct.pack("=Q", 1)
        assert c.get_queue_num() == 4
    finally:
        c.close()


def test_too_many_fds_disconnects(server: ServeProcess) -> None:
    c = FrontendClient.connect(server.socket)
    fds = [os.eventfd(0) for _ in range(12)]
    try:
        c.set_owner()
        c.send_raw(codec.encode(codec.make_request(Request.SET_VRING_CALL, VringFile(2), fds=[0]))
                   , fds)
        expect_disconnect(c.sock)
    finally:
        for fd in fds:
            os.close(fd)
        c.close()


def test_disconnect_mid_message(server: ServeProcess) -> None:
    s = raw_socket(server.socket)
    s.sendall(HEADER.pack(Request.SET_VRING_NUM, 1, 8) + b"\1\0")
    s.close()
    g = TestGuest.connect(server.socket)
    try:
        g.negotiate()
        g.start_queue(2)
        assert g.command(2, 0, 0, INQUIRY, data_in=36).status == 0
    finally:
        g.close()


def test_bad_ring_addresses_break_only_that_ring(guest: TestGuest) -> None:
    c = guest.client
    err = os.eventfd(0, os.EFD_NONBLOCK)
    kick = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        c.set_vring_err(3, err)
        c.set_vring_num(3, 64)
        c.set_vring_addr(codec.VringAddr(3, 0, 0x1000, 0x2000, 0x3000))  # nobody's memory
        c.set_vring_kick(3, kick)
        c.set_vring_enable(3, True)
        assert select.select([err], [], [], 5)[0] == [err]
        assert c.get_vring_base(3) == 0
    finally:
        os.close(err)
        os.close(kick)
    guest.start_queue(2)
    assert guest.command(2, 0, 0, INQUIRY, data_in=36).status == 0


def test_descriptor_loop_fails_that_request_only(guest: TestGuest) -> None:
    q = guest.start_queue(2)
    buf = guest.buffer(64)
    head = q.ring.add([(buf, 64)], [(buf, 64)], "loop")
    # make the chain's last descriptor point back at its head: a loop
    desc = guest.mem.view(q.ring.addrs.desc, 16 * q.ring.size)
    for i in range(q.ring.size):
        addr, length, flags, nxt = DESC.unpack_from(desc, 16 * i)
        if addr == buf and flags & WRITE:
            DESC.pack_into(desc, 16 * i, addr, length, flags | NEXT, head)
    guest.kick(2)
    done = q.ring.reclaim()
    deadline = time.monotonic() + 5
    while not done and time.monotonic() < deadline:
        time.sleep(0.01)
        done = q.ring.reclaim()
    assert done == [("loop", 0)]
    assert guest.command(2, 0, 0, INQUIRY, data_in=36).status == 0  # queue goes on


def test_oversized_indirect_table_fails_that_request(guest: TestGuest) -> None:
    q = guest.start_queue(2)
    table = guest.buffer(16 * 2048)  # 2048 descriptors > the 1024 we accept
    head = q.ring.add([(guest.buffer(16), 16)], [], "big")
    desc = guest.mem.view(q.ring.addrs.desc, 16 * q.ring.size)
    DESC.pack_into(desc, 16 * head, table, 16 * 2048, INDIRECT, 0)
    guest.kick(2)
    deadline = time.monotonic() + 5
    done: list = []
    while not done and time.monotonic() < deadline:
        time.sleep(0.01)
        done = q.ring.reclaim()
    assert done == [("big", 0)]
    assert guest.command(2, 0, 0, INQUIRY, data_in=36).status == 0


def test_avail_idx_jump_breaks_the_ring_and_others_go_on(server: ServeProcess,
                                                         guest: TestGuest) -> None:
    err = os.eventfd(0, os.EFD_NONBLOCK)
    guest.client.set_vring_err(2, err)
    q2 = guest.start_queue(2)
    guest.start_queue(3)
    avail = guest.mem.view(q2.ring.addrs.avail, 4)
    struct.pack_into("<H", avail, 2, 1000)  # idx jumps by more than the ring size
    os.eventfd_write(q2.fds.kick, 1)
    try:
        assert select.select([err], [], [], 5)[0] == [err]
    finally:
        os.close(err)
    server.wait_stats(lambda s: s["queues"]["2"]["state"] == "broken")
    assert guest.command(3, 1, 0, INQUIRY, data_in=36).status == 0
    assert guest.client.get_vring_base(2) == 0
    # once stopped, the front-end may set it up again
    struct.pack_into("<H", avail, 2, 0)
    guest.start_queue(2)
    assert guest.command(2, 0, 0, INQUIRY, data_in=36).status == 0


def test_requests_before_owner_and_bad_index(server: ServeProcess) -> None:
    c = FrontendClient.connect(server.socket)
    try:
        c.set_protocol_features(1 << codec.ProtocolFeature.REPLY_ACK)
        with pytest.raises(RequestRefused):
            c.set_vring_num(2, 64)  # before SET_OWNER
        c.set_owner()
        with pytest.raises(RequestRefused):
            c.set_vring_enable(200, True)
        c.ack = False
        c.set_vring_call(200, None)  # no ack asked: the back-end hangs up instead
        with pytest.raises(BackendGone):
            c.get_features()
    finally:
        c.close()


def test_sigusr1_rewrites_stats(server: ServeProcess) -> None:
    os.unlink(server.stats)
    server.proc.send_signal(signal.SIGUSR1)
    data = server.wait_stats(lambda s: True)
    assert len(data["per_queue"]) == 2
    assert "requests per queue" in server.output()


# --------------------------------------------------------------------------- memory changes


def test_memory_table_changes_while_workers_run(guest: TestGuest) -> None:
    """ADD_MEM_REG / REM_MEM_REG / SET_MEM_TABLE while queues run: the workers map the new
    table (fds over their control channels) before the back-end acks."""
    from vscsi.memory import GuestMemory
    from vscsi.vhost_user.codec import MemoryRegion

    from .rig import CMD_REQ, CMD_RESP, lun_field

    q = guest.start_queue(2)
    guest.start_queue(3)
    extra = GuestMemory.anonymous(1 << 20, guest_addr=0x4000_0000)
    try:
        e = extra.regions[0]
        region = MemoryRegion(e.guest_addr, e.size, e.user_addr, 0)
        guest.client.add_mem_reg(region, e.fd)
        # a READ whose data buffer lies in the new region
        req = guest.buffer(CMD_REQ.pack(lun_field(0, 0), 1, 0, 0, 0,
                                        bytes([0x12, 0, 0, 0, 36, 0]).ljust(32, b"\0")))
        resp = guest.buffer(CMD_RESP.size)
        q.ring.add([(req, CMD_REQ.size)], [(resp, CMD_RESP.size), (e.guest_addr + 512, 36)],
                   "far")
        guest.kick(2)
        deadline = time.monotonic() + 5
        done: list = []
        while not done and time.monotonic() < deadline:
            time.sleep(0.01)
            done = q.ring.reclaim()
        assert done and done[0][0] == "far" and done[0][1] > CMD_RESP.size
        assert bytes(extra.view(e.guest_addr + 512 + 8, 5)) == b"VSCSI"
        guest.client.rem_mem_reg(region)
        # the same buffer now lies outside guest memory: that request fails alone
        q.ring.add([(req, CMD_REQ.size)], [(resp, CMD_RESP.size), (e.guest_addr + 512, 36)],
                   "gone")
        guest.kick(2)
        deadline = time.monotonic() + 5
        done = []
        while not done and time.monotonic() < deadline:
            time.sleep(0.01)
            done = q.ring.reclaim()
        assert done == [("gone", 0)]
    finally:
        extra.close()
    guest.client.set_mem_table(guest.mem)  # the whole table again, same layout
    assert guest.command(2, 0, 0, INQUIRY, data_in=36).status == 0
    assert guest.command(3, 1, 0, INQUIRY, data_in=36).status == 0


def test_kick_without_fd_polls(guest: TestGuest) -> None:
    """SET_VRING_KICK with bit 8 (no fd): the worker polls the ring."""
    from vscsi.vhost_user.frontend import RingFds, user_addr_of
    from vscsi.virtio import DriverRing, ring_bytes, ring_layout

    from .rig import Queue

    addrs = ring_layout(16, guest.alloc.alloc(ring_bytes(16), 4096))
    ring = DriverRing(guest.mem, addrs, event_idx=True)
    c = guest.client
    fds = RingFds(os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK))
    guest.queues[2] = Queue(2, ring, fds)  # TestGuest.close() closes the fds
    c.set_vring_num(2, 16)
    c.set_vring_base(2, 0)
    c.set_vring_addr(codec.VringAddr(2, 0, user_addr_of(guest.mem, addrs.desc),
                                     user_addr_of(guest.mem, addrs.used),
                                     user_addr_of(guest.mem, addrs.avail)))
    c.set_vring_kick(2, None)  # bit 8: no fd; our kicks go to an eventfd nobody reads
    c.set_vring_call(2, fds.call)
    c.set_vring_enable(2, True)
    r = guest.command(2, 0, 0, INQUIRY, data_in=36)
    assert r.status == 0 and r.data[8:13] == b"VSCSI"
