"""Running `vscsi serve` as a service: Prometheus metrics that agree with the stats RPC,
readiness to systemd (a real datagram socket), log reopening on SIGHUP and over RPC,
the systemd unit of docs/deploy.md, and the command lines' errors."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.vhost_user.rig import read10, write10
from vscsi.serve import notify_systemd
from vscsi.testing.serve import ServeProcess

from .frontend import Guest, rpc, start_serve

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "docs" / "vscsi.service"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                return r.read().decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def sample(text: str, name: str, **labels: str) -> float:
    want = ",".join(f"{k}=\"{v}\"" for k, v in sorted(labels.items()))
    rx = re.compile(rf"^{re.escape(name)}\{{{re.escape(want)}\}} (\S+)$", re.MULTILINE)
    m = rx.search(text)
    assert m, f"no {name}{{{want}}} in:\n{text}"
    return float(m.group(1))


def test_metrics_agree_with_stats(tmp_path: Path) -> None:
    pytest.importorskip("prometheus_client")
    port = free_port()
    serve = start_serve(str(tmp_path), ["0:0=ram:4M", "2:3=ram:1M"],
                        ("--metrics", f"127.0.0.1:{port}"))
    try:
        guest = Guest(serve)
        try:
            for i in range(6):
                assert guest.command(2 + i % 2, 0, 0, write10(i, 2),
                                     data_out=b"m" * 1024).status == 0
            assert guest.command(3, 2, 3, read10(0, 8), data_in=4096).status == 0
            stats = rpc(serve, "stats")
            text = scrape(port)
        finally:
            guest.close()
        assert isinstance(stats, dict)
        luns = {(u["target"], u["lun"]): u for u in stats["luns"]}
        for (t, lun), row in luns.items():
            labels = {"vm": "0", "target": str(t), "lun": str(lun)}
            assert sample(text, "vscsi_lun_commands_total", **labels) == row["commands"]
            assert sample(text, "vscsi_lun_read_bytes_total", **labels) == row["bytes_read"]
            assert sample(text, "vscsi_lun_written_bytes_total", **labels) == \
                row["bytes_written"]
            assert sample(text, "vscsi_lun_latency_seconds_count", **labels) == row["commands"]
            assert sample(text, "vscsi_lun_latency_seconds_bucket", **labels, le="+Inf") == \
                row["commands"]
        assert luns[(0, 0)]["commands"] == 6 and luns[(0, 0)]["bytes_written"] == 6 * 1024
        assert luns[(2, 3)]["bytes_read"] == 4096
        for q in stats["queues"]:
            labels = {"vm": "0", "queue": str(q["queue"])}
            assert sample(text, "vscsi_queue_requests_total", **labels) == q["requests"]
            assert sample(text, "vscsi_queue_interrupts_total", **labels) == q["interrupts"]
            assert sample(text, "vscsi_queue_written_bytes_total", **labels) == \
                q["bytes_written"]
        assert sample(text, "vscsi_target_queue_requests_total", vm="0", target="0",
                      queue="0") == 3
        assert sample(text, "vscsi_target_queue_requests_total", vm="0", target="2",
                      queue="1") == 1
        assert sample(text, "vscsi_lun_size_bytes", target="2", lun="3") == 1 << 20
        assert serve.stop() == 0, serve.output()
    finally:
        serve.kill()


def test_metrics_of_every_vm(tmp_path: Path) -> None:
    """Two VMs on one serve (--socket twice): each VM's counters under its own vm label,
    equal to `stats vm=N`; the shared LUN's size once."""
    pytest.importorskip("prometheus_client")
    from tests.vhost_user.rig import TestGuest

    port = free_port()
    second = str(tmp_path / "b.sock")
    with ServeProcess(["0:0=ram:1M"], directory=str(tmp_path), queues=1,
                      extra=["--socket", second, "--metrics", f"127.0.0.1:{port}"]) as serve:
        guests = [TestGuest.connect(path) for path in (serve.socket, second)]
        try:
            for vm, g in enumerate(guests):
                g.negotiate()
                g.start_queue(2)
                for i in range(3 + 4 * vm):                  # VM 0: 3 writes, VM 1: 7
                    assert g.command(2, 0, 0, write10(i, 1), data_out=bytes([vm]) * 512
                                     ).status == 0
            text = scrape(port)
            for vm in (0, 1):
                stats = rpc(serve, "stats", vm=vm)
                assert isinstance(stats, dict)
                (lun,) = stats["luns"]
                assert lun["commands"] >= 3 + 4 * vm
                assert sample(text, "vscsi_lun_commands_total", vm=str(vm), target="0",
                              lun="0") == lun["commands"]
                assert sample(text, "vscsi_lun_written_bytes_total", vm=str(vm), target="0",
                              lun="0") == (3 + 4 * vm) * 512 == lun["bytes_written"]
                (q,) = stats["queues"]
                assert sample(text, "vscsi_queue_requests_total", vm=str(vm),
                              queue=str(q["queue"])) == q["requests"]
            assert text.count("vscsi_lun_size_bytes{") == 1
            assert sample(text, "vscsi_lun_size_bytes", target="0", lun="0") == 1 << 20
        finally:
            for g in guests:
                g.close()


def test_metrics_without_prometheus_client_is_one_line(tmp_path: Path) -> None:
    # a prometheus_client that cannot be imported, ahead of the real one on the path
    fake = tmp_path / "fake"
    (fake / "prometheus_client").mkdir(parents=True)
    (fake / "prometheus_client" / "__init__.py").write_text("raise ImportError('absent')\n")
    env = {**os.environ, "PYTHONPATH": f"{fake}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = subprocess.run([sys.executable, "-m", "vscsi.serve", "--socket", str(tmp_path / "s"),
                        "--lun", "0:0=ram:1M", "--metrics", "127.0.0.1:9"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "'metrics' extra" in r.stderr, r.stderr


@pytest.mark.parametrize("argv, message", [
    (["--metrics", "localhost"], "expected HOST:PORT"),
    (["--metrics", "127.0.0.1:99999"], "expected HOST:PORT"),
    (["--rpc", "/nonexistent-dir/x.rpc"], "--rpc /nonexistent-dir/x.rpc"),
])
def test_serve_option_errors_are_one_line(tmp_path: Path, argv: list[str], message: str) -> None:
    r = subprocess.run([sys.executable, "-m", "vscsi.serve", "--socket", str(tmp_path / "s"),
                        "--log-level", "warning", "--lun", "0:0=ram:1M", *argv],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().count("\n") == 0 and message in r.stderr, r.stderr


@pytest.mark.parametrize("args, message", [
    (["lun_remove", "0-1"], "bad LUN address '0-1'"),
    (["lun_remove"], "lun_remove takes TARGET:LUN"),
    (["lun_resize", "0:1"], "lun_resize takes TARGET:LUN SIZE"),
    (["lun_add"], "lun_add takes one LUN spec"),
    (["lun_list", "extra"], "takes no positional arguments"),
    (["filter_add", "1:0"], "filter_add takes TARGET:LUN SPEC"),
    (["filter_remove", "1:0", "x"], "filter_remove takes TARGET:LUN ID"),
    (["filter_list"], "filter_list takes TARGET:LUN"),
    (["pr_show", "0:0", "0:1"], "pr_show takes TARGET:LUN"),
])
def test_rpc_command_usage_errors(tmp_path: Path, args: list[str], message: str) -> None:
    r = subprocess.run([sys.executable, "-m", "vscsi.cli", "rpc", "--socket",
                        str(tmp_path / "none.rpc"), *args], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert r.stderr.strip().count("\n") == 0


def test_rpc_command_against_a_server(tmp_path: Path) -> None:
    serve = start_serve(str(tmp_path), ["0:0=ram:1M"])
    sock = serve.socket + ".rpc"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "vscsi.cli", "rpc", "--socket", sock,
                               *args], capture_output=True, text=True, timeout=60)

    try:
        r = cli("lun_add", "0:1=ram:2M,serial=CLI")
        assert r.returncode == 0 and '"spec": "0:1=ram:2M,serial=CLI"' in r.stdout, r.stderr
        r = cli("lun_resize", "0:1", "1M")
        assert r.returncode == 1 and r.stderr.startswith("vscsi rpc: lun_resize: size 1M")
        assert cli("lun_resize", "0:1", "1M", "shrink").returncode == 0
        r = cli("lun_list")
        assert '"size": 1048576' in r.stdout and r.stdout.count('"lun"') == 2
        r = cli("steering")
        assert r.returncode == 0 and "interrupts" in r.stdout
        # the vhost-user socket's path names the management socket next to it
        r = subprocess.run([sys.executable, "-m", "vscsi.cli", "rpc", "--socket",
                            serve.socket, "lun_list"], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0 and r.stdout.count('"lun"') == 2, r.stderr
        # filters: the address first, positionally, or the long NAME=VALUE form
        r = cli("filter_add", "0:1", "delay:read=1ms")
        assert r.returncode == 0 and '"id": 1' in r.stdout, r.stderr
        assert cli("filter_add", "target=0", "lun=1", "spec=hang:op=write").returncode == 0
        r = cli("filter_list", "0:1")
        assert "delay:read=1ms" in r.stdout and "hang:op=write" in r.stdout, r.stdout
        assert cli("filter_remove", "0:1", "1").returncode == 0
        assert "delay" not in cli("filter_list", "target=0", "lun=1").stdout
        assert cli("pr_show", "0:1").returncode == 0
        assert cli("lun_remove", "0:1").returncode == 0
        r = cli("lun_remove", "0:1")
        assert r.returncode == 1 and r.stderr == "vscsi rpc: lun_remove: no LUN 0:1\n"
        assert cli("shutdown").returncode == 0
        assert serve.proc.wait(15) == 0, serve.output()
        r = cli("lun_list")
        assert r.returncode == 1 and r.stderr.strip().count("\n") == 0, r.stderr
    finally:
        serve.kill()


# --------------------------------------------------------------------------- systemd


def _datagram_socket(address: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(address)
    s.settimeout(30)
    return s


def test_notify_systemd_path_and_abstract(tmp_path: Path) -> None:
    with _datagram_socket(str(tmp_path / "notify")) as s:
        assert notify_systemd("READY=1", str(tmp_path / "notify"))
        assert s.recv(4096) == b"READY=1"
    name = f"vscsi-test-{os.getpid()}"
    with _datagram_socket("\0" + name) as s:
        assert notify_systemd("STATUS=x", "@" + name)
        assert s.recv(4096) == b"STATUS=x"
    assert not notify_systemd("READY=1", str(tmp_path / "nobody"))  # a warning, no raise
    assert not notify_systemd("READY=1", "")


def test_serve_reports_ready_once_it_listens(tmp_path: Path) -> None:
    notify = str(tmp_path / "notify")
    with _datagram_socket(notify) as s:
        old = os.environ.get("NOTIFY_SOCKET")
        os.environ["NOTIFY_SOCKET"] = notify
        try:
            serve = ServeProcess(["0:0=ram:1M"], directory=str(tmp_path)).start()
        finally:
            if old is None:
                del os.environ["NOTIFY_SOCKET"]
            else:
                os.environ["NOTIFY_SOCKET"] = old
        try:
            message = s.recv(4096).decode()
            assert message.splitlines() == ["READY=1", f"MAINPID={serve.proc.pid}"]
            # ready means both sockets accept connections
            assert rpc(serve, "lun_list")
            socket.socket(socket.AF_UNIX).connect(serve.socket)
            serve.proc.send_signal(signal.SIGTERM)
            assert s.recv(4096) == b"STOPPING=1"
            assert serve.proc.wait(15) == 0
        finally:
            serve.kill()


def test_unit_file_verifies() -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    vscsi = shutil.which("vscsi")
    if vscsi is None:
        pytest.skip("the vscsi command is not installed")
    text = UNIT.read_text()
    assert "Type=notify" in text and "ExecStart=/usr/local/bin/vscsi serve" in text
    unit = Path("/tmp") / f"vscsi-verify-{os.getpid()}" / "vscsi.service"
    unit.parent.mkdir()
    try:
        unit.write_text(text.replace("/usr/local/bin/vscsi", vscsi))
        r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                           text=True, timeout=120)
        problems = [line for line in (r.stdout + r.stderr).splitlines()
                    if "vscsi.service" in line]
        assert r.returncode == 0 and not problems, r.stdout + r.stderr
    finally:
        shutil.rmtree(unit.parent)


def test_deploy_doc_shows_the_unit_as_shipped() -> None:
    doc = (ROOT / "docs" / "deploy.md").read_text()
    body = "\n".join(line for line in UNIT.read_text().splitlines()
                     if not line.startswith("#"))
    assert body in doc
    assert "<qemu:commandline>" in doc and "vhost-user-scsi-pci" in doc


# --------------------------------------------------------------------------- logs


def test_sighup_and_rpc_reopen_the_log_file(tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    serve = start_serve(str(tmp_path), ["0:0=ram:1M"], ("--log-file", str(log)))
    try:
        deadline = time.monotonic() + 10
        while "request queue worker" not in (log.read_text() if log.exists() else ""):
            assert time.monotonic() < deadline, serve.output()
            time.sleep(0.05)
        os.rename(log, tmp_path / "serve.log.1")  # what logrotate does
        serve.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while not log.exists():
            assert time.monotonic() < deadline, "SIGHUP did not reopen the log"
            time.sleep(0.05)
        rpc(serve, "lun_add", spec="0:1=ram:1M")
        assert "added LUN 0:1=ram:1M" in log.read_text()
        assert "added LUN" not in (tmp_path / "serve.log.1").read_text()
        os.rename(log, tmp_path / "serve.log.2")
        assert rpc(serve, "reopen_logs") == {"reopened": True}
        assert log.exists()
        assert serve.stop() == 0
        assert "stopped" in log.read_text()
        assert serve.output() == ""  # nothing on stderr
    finally:
        serve.kill()


def test_a_socket_path_too_long_for_the_default_rpc_path_still_serves(tmp_path: Path) -> None:
    # a vhost-user socket path of 106 bytes: it fits, its ".rpc" sibling does not
    directory = tmp_path / ("d" * (106 - len(str(tmp_path)) - 1 - len("/vs.sock")))
    directory.mkdir()
    serve = ServeProcess(["0:0=ram:1M"], directory=str(directory)).start()
    try:
        assert len(os.fsencode(serve.socket + ".rpc")) > 107
        deadline = time.monotonic() + 10
        while "no management socket" not in serve.output():
            assert serve.alive() and time.monotonic() < deadline, serve.output()
            time.sleep(0.05)
        assert not os.path.exists(serve.socket + ".rpc")
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(serve.socket)  # the vhost-user socket works
        assert serve.stop() == 0, serve.output()
    finally:
        serve.kill()
