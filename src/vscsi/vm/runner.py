"""Boot the guest under QEMU, run a script inside, return its output and exit status.

The script travels as a second, uncompressed cpio archive appended to the image's
initramfs (the kernel unpacks concatenated archives in order), so a run needs no disk
image and no root. The guest's serial console goes to a file that is read as it grows;
/init frames the script's output with markers carrying a per-run nonce (see
:mod:`vscsi.vm.init`), which is how the exit status comes back.

What to boot and how is one :class:`GuestOptions`. Two ways to use it:

* :func:`run_guest` -- boot, run, wait, return a :class:`GuestResult`;
* :class:`Guest` -- the same, step by step, for tests that act on the running guest:
  ``wait_for()`` output the script prints, talk to QEMU over QMP (``qmp()``, e.g.
  device_add / device_del for hot-plug), live-migrate it to a second QEMU on this
  machine (``incoming()``, ``migrate()``), then ``wait()``.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from .console import OutputFilter, parse_console
from .cpio import CpioWriter
from .image import GuestImage
from .init import MARKER_RE, render_config
from .options import (
    GuestConfigError,
    GuestError,
    GuestOptions,
    GuestResult,
    GuestTimeout,
    PhaseResult,
)
from .pinning import pin_vcpus
from .qemu_argv import _check_options, _scan_targets, build_qemu_argv

log = logging.getLogger("vscsi.vm")


# console=ttyS0: the only console; quiet: kernel messages at warning and above only
# (each character on the emulated UART costs a VM exit); panic=-1 with -no-reboot: a
# kernel panic ends QEMU at once instead of hanging until the timeout. The rest trims
# boot time: no legacy keyboard/mouse probing, one UART, no timer and KASLR checks.
BASE_CMDLINE = (
    "console=ttyS0 quiet panic=-1 rdinit=/init "
    "8250.nr_uarts=1 i8042.noaux i8042.nokbd i8042.nopnp no_timer_check "
    "nokaslr mitigations=off random.trust_cpu=on "
    # the crypto self-tests alone take a second or more of emulated CPU
    "cryptomgr.notests"
)

# After the last exit marker, /init syncs and powers off. If QEMU has not gone by then
# (a shutdown stuck on a dead backend), the result is returned anyway and QEMU killed.
POWEROFF_GRACE = 20.0
# After the guest reboots, the next boot prints its first marker within ~5-25 s here.
# Multi-threaded TCG has been seen (rarely) to spin forever in the machine reset with
# nothing more on the console; past this silence, the run counts as hung in the reset.
RESET_STALL = 75.0
POLL = 0.05


def run_guest(image: GuestImage, script: str,
              options: GuestOptions | None = None) -> GuestResult:
    """Boot `image`, run `script` (busybox sh) as root, return its output and status.

    Raises GuestTimeout after `options.timeout` seconds, GuestError if the guest never
    reports a status, GuestConfigError for bad options.

    QEMU 10's multi-threaded TCG very rarely aborts during boot (an assertion in
    iotlb_to_section, seen about once in 30 boots here, with nothing from the guest).
    Such a crash, before the script has started, is retried once with a fresh QEMU
    (`crash_retries`); the result's `attempts` says so. So is a QEMU that spins in a
    reboot's machine reset with nothing on the console for RESET_STALL seconds (seen
    rarely, TCG again): the run then starts over, first script included, so a script
    used with `after_reboot` should be safe to run twice. Anything else is reported.
    """
    options = options or GuestOptions()
    attempt = 1
    while True:
        try:
            with Guest(image, script, options) as guest:
                result = guest.wait()
            return dataclasses.replace(result, attempts=attempt)
        except GuestError as exc:
            retry = exc.qemu_crashed_early or exc.qemu_hung_in_reset
            if not retry or attempt > options.crash_retries:
                raise
            log.warning("QEMU crashed before the script started, or hung in a reboot's "
                        "reset; running again from the start: %s", exc.summary)
            attempt += 1


class Guest:
    """One QEMU process running the guest. Use as a context manager (start on enter,
    kill on exit) or call start() / wait() / close() yourself. For tests that act on the
    running guest: wait_for() output the script prints, talk to QEMU over QMP (qmp()),
    then wait()."""

    def __init__(self, image: GuestImage, script: str,
                 options: GuestOptions | None = None) -> None:
        options = options or GuestOptions()
        self.accel = _check_options(image, options)
        self.image = image
        self.script = script
        self.pin_cpus = list(options.pin_vcpus or ())
        self.vcpus = options.vcpus
        self.pinning: Any = None      # the thread that pins the vCPU threads (pin_vcpus)
        self.after_reboot = options.after_reboot
        self.timeout = options.timeout
        self.stream = options.stream
        self.vhost_user_socket = (Path(options.vhost_user_socket)
                                  if options.vhost_user_socket else None)
        disks = [Path(d) for d in options.qemu_disks]

        workdir, console_log = options.workdir, options.console_log
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="vscsi-vm-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.console_path = Path(console_log) if console_log else self.workdir / "console.log"
        self.qmp_path = self.workdir / "qmp.sock" if options.qmp else None
        self.nonce = secrets.token_hex(8)
        self._phases_expected = 2 if self.after_reboot is not None else 1

        self.scan_targets = _scan_targets(options)
        initrd = self.workdir / "initrd.img"
        try:
            extra = self._run_archive(options.files, options.env, options.settle_timeout)
        except BaseException:
            if self._own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)
            raise
        with open(initrd, "wb") as f:
            f.write(Path(image.initramfs).read_bytes())
            f.write(extra)

        kernel_args = options.kernel_args
        extra_kargs = [kernel_args] if isinstance(kernel_args, str) else list(kernel_args)
        cmdline = " ".join([BASE_CMDLINE, *extra_kargs])
        self._machine = (dataclasses.replace(options, accel=self.accel, qemu_disks=disks),
                         Path(image.kernel), initrd, cmdline)
        self.argv = build_qemu_argv(
            self._machine[0], kernel=Path(image.kernel), initrd=initrd, cmdline=cmdline,
            console=self.console_path, qmp=self.qmp_path,
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self._stderr_path = self.workdir / "qemu.stderr"
        self._stderr: IO[bytes] | None = None
        self._t0 = 0.0
        self._console = ""
        self._raw = b""
        self._console_fd: IO[bytes] | None = None
        self._qmp: Any = None
        self._filter = OutputFilter(self.nonce)
        self._boot_seconds = 0.0
        self._result: GuestResult | None = None

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> Guest:
        if self.proc is not None:
            return self
        self.console_path.write_bytes(b"")
        self._stderr = open(self._stderr_path, "wb")  # noqa: SIM115 - closed in close()
        self._t0 = time.monotonic()
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=self._stderr, stderr=self._stderr,
            start_new_session=True,  # a Ctrl-C in the terminal is ours to handle, not QEMU's
        )
        self._console_fd = open(self.console_path, "rb")  # noqa: SIM115
        if self.pin_cpus:
            self.pinning = pin_vcpus(self.proc.pid, self.vcpus, self.pin_cpus)
        return self

    def __enter__(self) -> Guest:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close(failed=exc[0] is not None)

    def close(self, failed: bool = False) -> None:
        """Kill QEMU if still running; remove the temp workdir, unless `failed` (the
        context manager passes whether an exception is leaving the block)."""
        if self._qmp is not None:
            try:
                self._qmp.close()
            except Exception:  # noqa: BLE001 - QEMU may already be gone
                pass
            self._qmp = None
        self.kill()
        if self._console_fd is not None:
            self._console_fd.close()
            self._console_fd = None
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        if self._own_workdir:
            if not failed:
                shutil.rmtree(self.workdir, ignore_errors=True)
            else:
                # keep the console and QEMU's messages for a post-mortem, not the 4 MB initrd
                (self.workdir / "initrd.img").unlink(missing_ok=True)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()

    # -- observing -----------------------------------------------------------------------

    @property
    def console(self) -> str:
        """The serial console so far (CRLF turned into LF)."""
        self._pump()
        return self._console

    def elapsed(self) -> float:
        return time.monotonic() - self._t0 if self._t0 else 0.0

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float = 120) -> re.Match[str]:
        """Wait until the console matches `pattern` (a regex); return the match. For a
        script that prints "READY" and then waits for the host to act."""
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            self._pump()
            m = rx.search(self._console)
            if m:
                return m
            if self.proc is not None and self.proc.poll() is not None:
                self._pump()
                m = rx.search(self._console)
                if m:
                    return m
                raise self._error(f"QEMU exited ({self.proc.returncode}) before the "
                                  f"console showed {rx.pattern!r}")
            if time.monotonic() > deadline:
                raise self._error(f"{rx.pattern!r} did not appear on the console within "
                                  f"{timeout:.0f}s", timeout=True, kill=False)
            time.sleep(POLL)

    def qmp(self) -> Any:
        """A connected qemu.qmp.legacy.QEMUMonitorProtocol (sync): ``.cmd("device_del",
        id="vus0")`` returns the result or raises. Needs GuestOptions(qmp=True)."""
        if self.qmp_path is None:
            raise GuestConfigError("QMP was not enabled: pass GuestOptions(qmp=True)")
        if self._qmp is None:
            from qemu.qmp.legacy import QEMUMonitorProtocol

            deadline = time.monotonic() + 30
            while not self.qmp_path.exists():
                if time.monotonic() > deadline or (self.proc and self.proc.poll() is not None):
                    raise self._error("QMP socket did not appear", kill=False)
                time.sleep(POLL)
            mon = QEMUMonitorProtocol(str(self.qmp_path))
            mon.connect(negotiate=True)
            self._qmp = mon
        return self._qmp

    # -- live migration ------------------------------------------------------------------

    def incoming(self, *, vhost_user_socket: str | os.PathLike[str] | None = None,
                 uri: str | None = None, paused: bool = False) -> Guest:
        """A second QEMU for this guest to move into: the same machine, devices, kernel
        and initramfs, with its own console, QMP socket and working directory, waiting
        for the migration stream (``-incoming defer``). ``vhost_user_socket``: the
        back-end the moved guest's disks attach to there (default: the same one).
        Start it with :meth:`migrate`; from then on it is the guest (wait_for, wait).
        ``paused``: it stays paused once the guest has arrived, until QMP ``cont`` (a
        test can then compare the two QEMUs' memory, :meth:`ram`)."""
        options, kernel, initrd, cmdline = self._machine
        if not options.qmp:
            raise GuestConfigError("migration needs QMP: pass GuestOptions(qmp=True)")
        dest = Guest.__new__(Guest)
        dest.__dict__.update(self.__dict__)
        dest.workdir = Path(tempfile.mkdtemp(prefix="vscsi-vm-in-"))
        dest._own_workdir = True
        dest.console_path = dest.workdir / "console.log"
        dest.qmp_path = dest.workdir / "qmp.sock"
        dest._stderr_path = dest.workdir / "qemu.stderr"
        if vhost_user_socket is not None:
            options = dataclasses.replace(options, vhost_user_socket=vhost_user_socket)
            dest.vhost_user_socket = Path(vhost_user_socket)
        # its own copy of the initramfs: this guest's directory goes when it is closed,
        # and the destination may be migrated on again
        shutil.copyfile(initrd, dest.workdir / "initrd.img")
        initrd = dest.workdir / "initrd.img"
        dest._machine = (options, kernel, initrd, cmdline)
        dest.argv = [*build_qemu_argv(options, kernel=kernel, initrd=initrd, cmdline=cmdline,
                                      console=dest.console_path, qmp=dest.qmp_path),
                     "-incoming", "defer", *(["-S"] if paused else [])]
        dest.migration_uri = uri or f"unix:{dest.workdir / 'migration.sock'}"
        dest.proc = None
        dest._stderr = None
        dest._console_fd = None
        dest._qmp = None
        dest._result = None
        dest._console, dest._raw = "", b""
        dest.pinning = None
        return dest

    def migrate(self, dest: Guest, *, timeout: float = 300,
                parameters: Mapping[str, object] | None = None) -> dict[str, Any]:
        """Live-migrate this guest into ``dest`` (from :meth:`incoming`), started here.
        Returns QMP's last ``query-migrate`` answer: status ``completed`` (``dest`` runs
        the guest now, its console continuing this one's; this QEMU is left paused, to
        be closed), or ``failed``/``cancelled`` (this QEMU runs on). ``parameters`` go
        to ``migrate-set-parameters`` first (e.g. ``max-bandwidth``)."""
        dest.start()
        dest.qmp().cmd("migrate-incoming", uri=dest.migration_uri)
        src = self.qmp()
        if parameters:
            src.cmd("migrate-set-parameters", **parameters)
        src.cmd("migrate", uri=dest.migration_uri)
        info = self.migration_status(timeout=timeout)
        if info.get("status") == "completed":
            self._pump()
            dest._pump()
            dest._raw = self._raw + dest._raw
            dest._console = dest._raw.decode("utf-8", "replace").replace("\r\n", "\n")
            dest._boot_seconds = self._boot_seconds
            dest._t0 = self._t0
        return info

    def ram(self) -> Path:
        """Where this QEMU's guest RAM can be read (its shared memfd, through /proc)."""
        assert self.proc is not None
        best: tuple[int, Path] | None = None
        for entry in Path(f"/proc/{self.proc.pid}/fd").iterdir():
            try:
                if not os.readlink(entry).startswith("/memfd:memory-backend-memfd"):
                    continue
                size = os.stat(entry).st_size
            except OSError:
                continue
            if best is None or size > best[0]:
                best = (size, entry)
        if best is None:
            raise self._error("no guest RAM memfd among QEMU's files", kill=False)
        return best[1]

    def migration_status(self, *, timeout: float = 300,
                         until: tuple[str, ...] = ("completed", "failed", "cancelled")
                         ) -> dict[str, Any]:
        """Poll ``query-migrate`` on this QEMU until its status is one of ``until``."""
        deadline = time.monotonic() + timeout
        while True:
            info: dict[str, Any] = self.qmp().cmd("query-migrate")
            if info.get("status") in until:
                return info
            if time.monotonic() > deadline:
                raise self._error(f"migration still {info.get('status')!r} after "
                                  f"{timeout:.0f}s", timeout=True, kill=False)
            time.sleep(0.1)

    # -- waiting -------------------------------------------------------------------------

    def wait(self, timeout: float | None = None) -> GuestResult:
        """Wait for the script(s) to finish and QEMU to power off; return the result.
        `timeout` counts from QEMU's start (default: the Guest's timeout)."""
        if self._result is not None:
            return self._result
        if self.proc is None:
            self.start()
        assert self.proc is not None
        limit = self.timeout if timeout is None else timeout
        done_at: float | None = None
        self._pump()
        phases, error = self._parse()  # wait_for() may have read everything already
        grew_at = time.monotonic()
        reboot_marker = f"@@vscsi:{self.nonce}:reboot:"
        second_begin = f"@@vscsi:{self.nonce}:begin:2@@"
        while True:
            if self._pump():  # parse again only when the console grew
                phases, error = self._parse()
                grew_at = time.monotonic()
            elif (time.monotonic() - grew_at > RESET_STALL and reboot_marker in self._console
                  and second_begin not in self._console):
                raise self._error(f"QEMU hung in the reboot's reset (no console output for "
                                  f"{RESET_STALL:.0f}s)", hung_in_reset=True)
            if error is not None:
                raise self._error(f"guest init reported: {error}")
            if done_at is None and len(phases) == self._phases_expected:
                done_at = time.monotonic()
            exited = self.proc.poll() is not None
            if exited:
                self._pump()
                phases, error = self._parse()
                if error is not None:
                    raise self._error(f"guest init reported: {error}")
                if len(phases) == self._phases_expected:
                    return self._finish(phases, done_at, powered_off=True)
                raise self._error(self._exit_reason(phases))
            if done_at is not None and time.monotonic() - done_at > POWEROFF_GRACE:
                return self._finish(phases, done_at, powered_off=False)
            if self.elapsed() > limit:
                raise self._error(
                    f"guest timed out after {limit:.0f}s ({self._progress(phases)})",
                    timeout=True,
                )
            time.sleep(POLL)

    # -- internals -----------------------------------------------------------------------

    def _run_archive(self, files: Mapping[str, bytes | str | Path], env: Mapping[str, str],
                     settle_timeout: int) -> bytes:
        buf = io.BytesIO()
        w = CpioWriter(buf)
        dirs = {"vscsi"}
        entries: dict[str, tuple[bytes, int]] = {
            "vscsi/config": (render_config(self.nonce, reboot=self.after_reboot is not None,
                                           settle_timeout=settle_timeout, env=dict(env),
                                           scan_targets=self.scan_targets).encode(), 0o644),
            "vscsi/script1": (self.script.encode(), 0o755),
        }
        if self.after_reboot is not None:
            entries["vscsi/script2"] = (self.after_reboot.encode(), 0o755)
        for path, content in files.items():
            rel = path.strip("/")
            if not rel or rel.startswith("vscsi/") or ".." in rel.split("/"):
                raise GuestConfigError(f"bad guest file path {path!r}")
            if isinstance(content, Path):
                data = content.read_bytes()
                mode = 0o755 if os.access(content, os.X_OK) else 0o644
            else:
                data = content.encode() if isinstance(content, str) else bytes(content)
                mode = 0o644
            entries[rel] = (data, mode)
        for rel in entries:
            parts = rel.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                dirs.add("/".join(parts[:i]))
        # directories already in the base archive are created again harmlessly
        for d in sorted(dirs):
            w.directory(d, 0o1777 if d == "tmp" else 0o755)
        for rel, (data, mode) in sorted(entries.items()):
            w.file(rel, data, mode)
        w.finish()
        return buf.getvalue()

    def _pump(self) -> bool:
        """Read what the console file gained since last time; True if it grew."""
        if self._console_fd is None:
            return False
        chunk = self._console_fd.read()
        if not chunk:
            return False
        self._raw += chunk
        if not self._boot_seconds and f"@@vscsi:{self.nonce}:begin:1@@".encode() in self._raw:
            self._boot_seconds = self.elapsed()
        # decode the whole buffer each time: a multi-byte character split across two
        # reads then comes out right instead of as two replacement characters
        self._console = self._raw.decode("utf-8", "replace").replace("\r\n", "\n")
        if self.stream is not None:
            out = self._filter.feed(self._console)
            if out:
                self.stream.write(out)
                self.stream.flush()
        return True

    def _parse(self) -> tuple[list[PhaseResult], str | None]:
        return parse_console(self._console, self.nonce, reboot=self.after_reboot is not None)

    def _finish(self, phases: list[PhaseResult], done_at: float | None,
                powered_off: bool) -> GuestResult:
        seconds = (done_at - self._t0) if done_at is not None else self.elapsed()
        if not powered_off:
            self.kill()
        status = next((p.status for p in phases if p.status != 0), 0)
        self._result = GuestResult(
            output="".join(p.output for p in phases),
            status=status,
            seconds=seconds,
            phases=tuple(phases),
            console=self._console,
            powered_off=powered_off,
            boot_seconds=self._boot_seconds,
        )
        return self._result

    def _progress(self, phases: list[PhaseResult]) -> str:
        text = self._console
        begins = [m for m in MARKER_RE.finditer(text)
                  if m.group("nonce") == self.nonce and m.group("event") == "begin"]
        if not text.strip():
            return "no console output at all: the kernel did not start"
        if not begins:
            return "the script never started: stuck booting or waiting for the disks"
        return f"the script of phase {begins[-1].group('args')} did not finish"

    def _exit_reason(self, phases: list[PhaseResult]) -> str:
        assert self.proc is not None
        rc = self.proc.returncode
        if "Kernel panic" in self._console:
            what = "the guest kernel panicked"
        elif rc < 0:
            what = f"QEMU was killed by signal {-rc}"
        elif rc != 0:
            what = f"QEMU exited with status {rc}"
        else:
            what = "QEMU exited"
        return f"{what} before the script finished ({self._progress(phases)})"

    def _error(self, message: str, *, timeout: bool = False, kill: bool = True,
               hung_in_reset: bool = False) -> GuestError:
        if kill:
            self.kill()
        self._pump()
        try:
            stderr = self._stderr_path.read_text(errors="replace")
        except OSError:
            stderr = ""
        cls = GuestTimeout if timeout else GuestError
        began = f"@@vscsi:{self.nonce}:begin:" in self._console
        crashed = (not timeout and self.proc is not None and self.proc.poll() is not None
                   and (self.proc.returncode < 0 or "Assertion" in stderr))
        return cls(message, console=self._console, seconds=self.elapsed(),
                   qemu_stderr=stderr, workdir=self.workdir,
                   qemu_crashed_early=crashed and not began,
                   qemu_hung_in_reset=hung_in_reset)
