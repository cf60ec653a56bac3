"""`vscsi serve` as a user meets it: mistakes end in one line and a non-zero exit, the
socket is guarded, signals shut it down cleanly with the data synced."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.vhost_user.rig import TestGuest, write10
from vscsi.testing.serve import ServeProcess


def run_serve(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vscsi.serve", *args], capture_output=True,
                          text=True, timeout=timeout)


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("vscsi serve: "), proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return lines[-1]


def test_no_lun(tmp_path) -> None:  # type: ignore[no-untyped-def]
    proc = run_serve("--socket", str(tmp_path / "s"))
    assert proc.returncode == 2
    assert "--lun" in one_line_error(proc)


@pytest.mark.parametrize("spec", ["0:0", "0:0=tape:1M", "300:0=ram:1M", "0:0=ram:lots"])
def test_bad_lun_spec(tmp_path, spec: str) -> None:  # type: ignore[no-untyped-def]
    proc = run_serve("--socket", str(tmp_path / "s"), "--lun", spec)
    assert proc.returncode == 2
    one_line_error(proc)
    assert not (tmp_path / "s").exists()


def test_missing_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    proc = run_serve("--socket", str(tmp_path / "s"), "--lun", f"0:0=file:{tmp_path}/nope.img")
    assert proc.returncode != 0
    assert "nope.img" in one_line_error(proc)


@pytest.mark.parametrize("spec, words", [
    ("0:0=nbd:http://host/d0", "expected nbd://"),
    ("0:0=nbd:nbd+unix:///d0", "socket=PATH"),
    ("0:0=nbd:nbds://host/d0", "TLS"),
    ("0:0=nbds://host/d0", "TLS"),
    ("0:0=nbd+unix:///d0", "socket=PATH"),
])
def test_bad_nbd_uri(tmp_path, spec: str, words: str) -> None:  # type: ignore[no-untyped-def]
    proc = run_serve("--socket", str(tmp_path / "s"), "--lun", spec)
    assert proc.returncode == 2
    assert words in one_line_error(proc)


def test_unreachable_nbd_server(tmp_path) -> None:  # type: ignore[no-untyped-def]
    spec = f"0:0=nbd:nbd+unix:///d0?socket={tmp_path}/nobody.sock"
    proc = run_serve("--socket", str(tmp_path / "s"), "--lun", spec)
    assert proc.returncode == 2
    assert "cannot reach NBD server" in one_line_error(proc)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("args", [["--queues", "0"], ["--queues", "300"],
                                  ["--cpus", "x"], ["--cpus", "4096"]])
def test_bad_numbers(tmp_path, args: list[str]) -> None:  # type: ignore[no-untyped-def]
    proc = run_serve("--socket", str(tmp_path / "s"), "--lun", "0:0=ram:1M", *args)
    assert proc.returncode == 2
    one_line_error(proc)


def test_socket_in_use_and_not_a_socket(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = str(tmp_path / "live.sock")
    live = socket.socket(socket.AF_UNIX)
    live.bind(path)
    live.listen(1)
    try:
        proc = run_serve("--socket", path, "--lun", "0:0=ram:1M")
        assert proc.returncode == 2
        assert "in use" in one_line_error(proc)
        assert os.path.exists(path)  # left alone
    finally:
        live.close()
    regular = tmp_path / "file"
    regular.write_text("x")
    proc = run_serve("--socket", str(regular), "--lun", "0:0=ram:1M")
    assert proc.returncode == 2
    assert "not a socket" in one_line_error(proc)


def test_stale_socket_is_replaced_and_removed_at_exit(tmp_path) -> None:  # type: ignore[no-untyped-def]
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / "vs.sock"))
    stale.close()  # the file stays, nobody listens
    serve = ServeProcess(["0:0=ram:1M"], directory=str(tmp_path), queues=1).start()
    try:
        deadline = time.monotonic() + 10
        while True:  # the stale file is replaced by a live socket with mode 0600
            probe = socket.socket(socket.AF_UNIX)
            try:
                probe.connect(serve.socket)
                break
            except (ConnectionRefusedError, FileNotFoundError):
                # still the stale file, or between its removal and the new bind
                assert time.monotonic() < deadline
                time.sleep(0.05)
            finally:
                probe.close()
        assert os.stat(serve.socket).st_mode & 0o777 == 0o600
        assert serve.stop(signal.SIGINT) == 0
        assert not os.path.exists(serve.socket)
        assert "stopped" in serve.output()
    finally:
        serve.kill()


def test_sigterm_finishes_and_syncs_file_luns(tmp_path) -> None:  # type: ignore[no-untyped-def]
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    serve = ServeProcess([f"0:0=file:{disk}"], directory=str(tmp_path), queues=2).start()
    try:
        g = TestGuest.connect(serve.socket)
        g.negotiate()
        g.start_queue(2)
        g.start_queue(3)
        for q in (2, 3):
            for i in range(8):
                g.submit(q, 0, 0, write10((q - 2) * 8 + i, 1), data_out=bytes([q, i]) * 256)
            g.kick(q)
        for q in (2, 3):
            assert all(r.status == 0 for r in g.wait(q, 8))
        # SIGTERM while the front-end is still attached
        assert serve.stop(signal.SIGTERM) == 0, serve.output()
        g.close()
        data = disk.read_bytes()
        for q in (2, 3):
            for i in range(8):
                block = (q - 2) * 8 + i
                assert data[block * 512 : block * 512 + 512] == bytes([q, i]) * 256
        stats = serve.read_stats()
        assert stats["per_queue"] == [8, 8]
        assert "q0=8 q1=8" in serve.output()
        assert not os.path.exists(serve.socket)
    finally:
        serve.kill()


def test_cli_dispatch_has_serve() -> None:
    from vscsi import cli

    assert cli.SUBCOMMANDS["serve"][0] == "vscsi.serve"
    import argparse

    from vscsi import serve

    parser = argparse.ArgumentParser()
    serve.configure(parser)
    args = parser.parse_args(["--socket", "/x", "--lun", "0:0=ram:1M", "--lun", "1:0=null:1G",
                              "--cpus", "0", "--queues", "3"])
    assert args.lun == ["0:0=ram:1M", "1:0=null:1G"] and args.queues == 3


def test_cpus_none_leaves_the_workers_unpinned() -> None:
    import argparse

    from vscsi import serve

    parser = argparse.ArgumentParser()
    serve.configure(parser)
    usable = serve.default_cpus()
    args = parser.parse_args(["--socket", "/x", "--lun", "0:0=null:1G", "--queues", "2",
                              "--cpus", "none"])
    assert serve._check_args(args) == (2, usable, False)
    args = parser.parse_args(["--socket", "/x", "--lun", "0:0=null:1G", "--queues", "2",
                              "--cpus", str(usable[0])])
    assert serve._check_args(args) == (2, [usable[0]], True)
