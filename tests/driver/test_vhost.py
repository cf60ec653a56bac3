"""The driver's vhost-user front-end against a `vscsi serve` it did not start, and against
a backend that lacks what the driver needs."""

import contextlib
import os
import socket
import threading

import pytest

from vscsi.cli import main
from vscsi.driver.discovery import discover
from vscsi.driver.smp import SmpConfig, SmpMachine
from vscsi.driver.vhost import BackendUnsuitable, VhostScsiFrontend
from vscsi.testing.serve import ServeProcess
from vscsi.vhost_user import codec
from vscsi.vhost_user.codec import U64, MessageReader, Request, Role


@pytest.fixture(scope="module")
def serve():
    with ServeProcess(["0:0=ram:4M", "3:0=ram:2M", "3:5=ram:1M,block-size=4096"],
                      queues=3) as proc:
        yield proc


def test_negotiates_config_queues_and_ring_features(serve):
    fe = VhostScsiFrontend.connect(serve.socket)
    try:
        neg = fe.negotiated
        assert neg.num_queues == 3  # from GET_CONFIG
        assert neg.config is not None and neg.config.num_queues == 3
        assert neg.event_idx and neg.indirect
        assert neg.max_target == 255
    finally:
        fe.close()


def test_discovery_over_the_socket(serve):
    machine = SmpMachine(serve.socket, SmpConfig(vcpus=1, queues=1))
    try:
        units = machine.discover()
    finally:
        machine.close()
    assert [(u.target, u.lun, u.capacity, u.block_size) for u in units] == [
        (0, 0, 4 << 20, 512), (3, 0, 2 << 20, 512), (3, 5, 1 << 20, 4096)]
    assert units[0].vendor == "VSCSI"


def test_reconnects_after_a_session_and_reads_what_it_wrote(serve):
    data = bytes(range(256)) * 16
    from vscsi.driver.initiator import rw16_cdb

    m = SmpMachine(serve.socket, SmpConfig(vcpus=2, policy="pertarget"))
    try:
        ok, _ = m.execute(0, 0, rw16_cdb(True, 8, 8), 0, data_out=data)
        assert ok
    finally:
        m.close()
    m = SmpMachine(serve.socket, SmpConfig(vcpus=2, policy="single"))
    try:
        ok, back = m.execute(0, 0, rw16_cdb(False, 8, 8), len(data))
        assert ok and back == data
        assert discover(m.execute, [3])[1].lun == 5
    finally:
        m.close()


def test_a_burst_larger_than_the_ring_waits_for_space_and_completes(serve):
    """A task submits its whole burst before publishing; 16 slots on a 4-entry ring fill
    it with chains the device cannot see yet, so the ring-full wait must publish (and
    kick) them first, or it would wait forever."""
    from vscsi.bench.jobs import Job, JobSpec, JobTask
    from vscsi.bench.runner import prefill

    m = SmpMachine(serve.socket, SmpConfig(vcpus=1, queues=1, queue_size=4))
    try:
        job = Job(0, JobSpec("randrw", iodepth=16, size=1 << 20), 0, 0, 0, 4 << 20, 512, 7)
        prefill(m, [job], 7)
        out = m.run_tasks([JobTask(job, verify=True, requests=400)], [0])
    finally:
        m.close()
    assert out.results.completed == out.stats.completed == 400
    assert out.results.errors == out.results.verify_errors == 0
    assert out.stats.ring_full > 0


def test_more_queues_than_the_backend_offers_is_one_line(serve, capsys):
    status = main(["bench", "--socket", serve.socket, "--vcpus", "4", "--requests", "10"])
    err = capsys.readouterr().err
    assert status == 2
    assert err == (f"vscsi bench: backend at {serve.socket} offers 3 request queues, "
                   "4 were asked for\n")


# -- a backend without VERSION_1 --------------------------------------------------------------


@contextlib.contextmanager
def fake_backend(path, features):
    """Answers GET_FEATURES with ``features`` (and acks nothing else): enough for a
    front-end to decide whether it can go on."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    seen = []

    def serve_one():
        conn, _ = listener.accept()
        reader = MessageReader(Role.BACKEND)
        with conn:
            while True:
                data, fds, _, _ = socket.recv_fds(conn, 4096, 8)
                for fd in fds:
                    os.close(fd)
                if not data:
                    return
                reader.feed(data)
                while (msg := reader.next_message()) is not None:
                    seen.append(msg.request)
                    if msg.request is Request.GET_FEATURES:
                        conn.sendall(codec.encode(codec.make_reply(msg.request, U64(features))))

    thread = threading.Thread(target=serve_one, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        listener.close()
        thread.join(5)


def test_backend_without_version_1_is_refused_in_one_line(tmp_path, capsys):
    path = str(tmp_path / "old.sock")
    with fake_backend(path, (1 << codec.F_PROTOCOL_FEATURES) | (1 << 28)) as seen:
        status = main(["bench", "--socket", path, "--requests", "10"])
    err = capsys.readouterr().err
    assert status == 2
    assert err == f"vscsi bench: backend at {path} does not offer VERSION_1\n"
    assert seen == [Request.GET_FEATURES]  # asked, judged, and said nothing more


def test_no_backend_is_one_line(tmp_path, capsys):
    path = str(tmp_path / "nobody.sock")
    with pytest.raises(BackendUnsuitable, match="cannot connect"):
        VhostScsiFrontend.connect(path)
    assert main(["bench", "--socket", path]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"vscsi bench: cannot connect to a backend at {path}")
    assert err.count("\n") == 1
