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
  device_add / device_del for hot-plug), then ``wait()``.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import logging
import os
import re
import secrets
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .cpio import CpioWriter
from .image import GuestImage
from .init import MARKER_RE, render_config
from .pinning import NAME_THREADS, pin_vcpus

log = logging.getLogger("vscsi.vm")

QEMU = "qemu-system-x86_64"

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


class GuestError(Exception):
    """The guest did not deliver an exit status (QEMU failed, the kernel panicked, the
    init reported an error). The message ends with the tail of the console."""

    def __init__(self, message: str, *, console: str = "", seconds: float = 0.0,
                 qemu_stderr: str = "", workdir: Path | None = None,
                 qemu_crashed_early: bool = False, qemu_hung_in_reset: bool = False) -> None:
        tail = "\n".join(console.splitlines()[-30:])
        full = message
        if qemu_stderr.strip():
            full += "\nQEMU said:\n" + "\n".join(qemu_stderr.strip().splitlines()[-15:])
        full += "\n--- guest console (last lines) ---\n" + (tail or "(nothing)")
        if workdir is not None:
            full += f"\n--- files kept in {workdir} ---"
        super().__init__(full)
        self.summary = message
        self.console = console
        self.seconds = seconds
        self.qemu_stderr = qemu_stderr
        self.workdir = workdir
        # QEMU itself died (signal, assertion) before the script began: see run_guest
        self.qemu_crashed_early = qemu_crashed_early
        # QEMU spun in the machine reset of a reboot, printing nothing: see run_guest
        self.qemu_hung_in_reset = qemu_hung_in_reset


class GuestTimeout(GuestError):
    """The run took longer than its timeout; QEMU was killed."""


class GuestConfigError(ValueError):
    """A bad argument (missing socket, missing disk file...): one line for the user."""


@dataclass(frozen=True)
class PhaseResult:
    phase: int          # 1, or 2 after the reboot
    output: str         # what the script printed (console text between the markers)
    status: int         # its exit status


@dataclass(frozen=True)
class GuestResult:
    output: str         # all phases' script output, in order
    status: int         # 0 if every phase exited 0, else the first non-zero status
    seconds: float      # wall time from QEMU start to the last exit marker
    phases: tuple[PhaseResult, ...] = ()
    console: str = field(default="", repr=False)   # the whole serial console
    powered_off: bool = True   # False: QEMU had to be killed after the script ended
    boot_seconds: float = 0.0  # QEMU start -> first begin marker (boot + module load + settle)
    attempts: int = 1          # 2: QEMU crashed during boot and run_guest booted again


@dataclass(frozen=True)
class GuestOptions:
    """How to boot the guest and run its script; every field has a working default.

    The devices:

    * vhost_user_socket: attach a vhost-user-scsi-pci device with `queues` request
      queues to the backend listening there;
    * vhost_user_options: extra vhost-user-scsi-pci properties, e.g.
      {"virtqueue_size": 256, "event_idx": False};
    * reconnect_ms: let QEMU reconnect to a restarted backend (chardev reconnect-ms);
    * qemu_direct: open qemu_disks with O_DIRECT (cache.direct=on, aio=io_uring).
    * qemu_disks: files served by QEMU's own virtio-scsi-pci (`qemu_queues` request
      queues, default `queues`), one target each (scsi-id i, LUN 0);
    * qemu_null_disks: sizes (bytes) of disks QEMU's own HBA serves from its null-co
      driver (reads return zeroes, no storage cost), one target each after qemu_disks;
    * iothreads: one QEMU iothread per queue of that HBA (iothread-vq-mapping);
    * vhost_user_blk_sockets: one vhost-user-blk-pci device (`queues` queues) per
      socket, in PCI slots 6, 7, ... in that order (e.g. qemu-storage-daemon exports;
      the guest sees them as /dev/vd*, and needs the virtio_blk module).

    The machine: vcpus, memory, accel ("tcg", the default or $VSCSI_ACCEL, or "kvm"),
    kernel_args (appended to the kernel command line, e.g. "loglevel=7"),
    extra_qemu_args (appended to QEMU's command line), pin_vcpus (host CPUs: vCPU n's
    thread is pinned to pin_vcpus[n % len], see vm/pinning.py), qmp (open a QMP socket,
    see Guest.qmp()).

    The run:

    * after_reboot: a second script; the guest runs the first, resets the machine (a
      real reboot: firmware, new kernel, the device reset and set up again) and runs
      this one;
    * files: {guest path: bytes | str | host Path} added to the per-run archive (e.g. a
      fio job file), directories created as needed;
    * env: variables exported to the script;
    * settle_timeout: how long /init waits for the disks to appear (s);
    * scan_targets: the SCSI targets the guest scans at boot, or None for all 256 (what a
      normal guest does, and a test of how the device answers for absent targets).
      "auto": with only qemu_disks, just their targets (saves seconds under TCG); with a
      vhost-user device, all;
    * timeout: seconds from QEMU's start until the run is killed (GuestTimeout);
    * crash_retries: how often run_guest starts over after QEMU crashed during boot or
      hung in a reboot's reset (see run_guest);
    * console_log: keep the serial console in this file;
    * stream: a text stream that receives the script's output as it arrives;
    * workdir: where the run's files go (default: a temp directory, removed after a
      successful run, kept after a failure).
    """

    vhost_user_socket: str | os.PathLike[str] | None = None
    vhost_user_options: Mapping[str, object] = field(default_factory=dict)
    reconnect_ms: int | None = None
    queues: int = 2
    qemu_disks: Sequence[str | os.PathLike[str]] = ()
    qemu_direct: bool = False  # qemu_disks with cache.direct=on and aio=io_uring
    qemu_queues: int | None = None
    qemu_null_disks: Sequence[int] = ()
    iothreads: bool = False
    vhost_user_blk_sockets: Sequence[str | os.PathLike[str]] = ()
    vcpus: int = 2
    memory: str = "512M"
    accel: str | None = None
    kernel_args: str | Sequence[str] = ()
    extra_qemu_args: Sequence[str] = ()
    pin_vcpus: Sequence[int] | None = None  # vCPU n on host CPU pin_vcpus[n % len]
    qmp: bool = False
    after_reboot: str | None = None
    files: Mapping[str, bytes | str | Path] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    settle_timeout: int = 120
    scan_targets: Sequence[int] | str | None = "auto"
    timeout: float = 300
    crash_retries: int = 1
    console_log: str | os.PathLike[str] | None = None
    stream: IO[str] | None = field(default=None, repr=False)
    workdir: str | os.PathLike[str] | None = None


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
        self.argv = build_qemu_argv(
            dataclasses.replace(options, accel=self.accel, qemu_disks=disks),
            kernel=Path(image.kernel), initrd=initrd, cmdline=cmdline,
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


def parse_console(
    text: str, nonce: str, *, reboot: bool = False
) -> tuple[list[PhaseResult], str | None]:
    """The phases completed in a console text, and the error /init reported, if any.
    A phase's output is the text between its begin marker's line and its exit marker,
    less the newline /init prints before the exit marker."""
    phases: list[PhaseResult] = []
    starts: dict[int, int] = {}
    error = None
    for m in MARKER_RE.finditer(text):
        if m.group("nonce") != nonce:
            continue
        event, args = m.group("event"), (m.group("args") or "").split(":")
        if event == "begin":
            phase = int(args[0])
            if phase in starts and not reboot:
                error = "the guest started the script twice (it rebooted by itself)"
            nl = text.find("\n", m.end())
            starts[phase] = len(text) if nl < 0 else nl + 1
        elif event == "exit" and len(args) == 2:
            phase, status = int(args[0]), int(args[1])
            out = text[starts.get(phase, m.start()):m.start()]
            if out.endswith("\n"):
                out = out[:-1]
            phases.append(PhaseResult(phase, out, status))
        elif event == "error":
            error = ":".join(args)
    return phases, error


class OutputFilter:
    """Turns a growing console text into the script's output as it arrives: complete
    lines between markers, so that everything fed out equals GuestResult.output. The
    last line before an exit marker is held back, because its final newline is the
    one /init adds."""

    def __init__(self, nonce: str) -> None:
        self.nonce = nonce
        self._done = 0                 # console offset consumed
        self._inside = False           # between a begin and an exit marker
        self._held: str | None = None  # the line held back

    def feed(self, console: str) -> str:
        end = console.rfind("\n", self._done) + 1
        if end <= self._done:
            return ""
        out = []
        for line in console[self._done:end].splitlines(keepends=True):
            m = MARKER_RE.search(line)
            if m and m.group("nonce") == self.nonce:
                if m.group("event") == "exit" and self._held is not None:
                    out.append(self._held[:-1])
                self._held = None
                self._inside = m.group("event") == "begin"
                continue
            if self._inside:
                if self._held is not None:
                    out.append(self._held)
                self._held = line
        self._done = end
        return "".join(out)


@functools.cache
def qemu_version() -> tuple[int, int]:
    """(major, minor) of the installed QEMU; (0, 0) if it cannot be told."""
    try:
        out = subprocess.run([QEMU, "--version"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return (0, 0)
    m = re.search(r"version (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _check_options(image: GuestImage, options: GuestOptions) -> str:
    """Raise GuestConfigError for options that cannot work; return the accelerator."""
    if options.vcpus < 1:
        raise GuestConfigError(f"vcpus must be at least 1, not {options.vcpus}")
    if options.queues < 1 or (options.qemu_queues is not None and options.qemu_queues < 1):
        raise GuestConfigError("queues must be at least 1")
    if options.vhost_user_socket:
        _check_socket(Path(options.vhost_user_socket))
    if len(options.vhost_user_blk_sockets) > len(VHOST_USER_BLK_SLOTS):
        raise GuestConfigError(f"at most {len(VHOST_USER_BLK_SLOTS)} vhost-user-blk devices")
    for sock in options.vhost_user_blk_sockets:
        _check_socket(Path(sock))
    for d in options.qemu_disks:
        if not Path(d).exists():
            raise GuestConfigError(f"disk file {d} does not exist")
    for p in (image.kernel, image.initramfs):
        if not Path(p).is_file():
            raise GuestConfigError(f"guest image file {p} is missing: run `vscsi vm build`")
    if shutil.which(QEMU) is None:
        raise GuestConfigError(f"{QEMU} not found: run scripts/setup-host.sh")
    accel = (options.accel or os.environ.get("VSCSI_ACCEL") or "tcg").lower()
    if accel not in ("tcg", "kvm"):
        raise GuestConfigError(f"accelerator must be tcg or kvm, not {accel!r}")
    if accel == "kvm" and not os.access("/dev/kvm", os.R_OK | os.W_OK):
        raise GuestConfigError("VSCSI_ACCEL=kvm but /dev/kvm is not usable")
    return accel


def _scan_targets(options: GuestOptions) -> tuple[int, ...] | None:
    """The targets /init scans, None for all: see GuestOptions.scan_targets."""
    scan = options.scan_targets
    if scan == "auto":
        qemu_targets = len(options.qemu_disks) + len(options.qemu_null_disks)
        only_qemu_disks = qemu_targets and not options.vhost_user_socket
        return tuple(range(qemu_targets)) if only_qemu_disks else None
    if isinstance(scan, str):
        raise GuestConfigError(f"scan_targets must be 'auto', None or target numbers, "
                               f"not {scan!r}")
    return None if scan is None else tuple(scan)


def _check_socket(path: Path) -> None:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise GuestConfigError(
            f"vhost-user socket {path} does not exist (is `vscsi serve` running?)"
        ) from None
    if not stat.S_ISSOCK(st.st_mode):
        raise GuestConfigError(f"{path} is not a socket")


def build_qemu_argv(options: GuestOptions, *, kernel: Path, initrd: Path, cmdline: str,
                    console: Path, qmp: Path | None = None) -> list[str]:
    """The QEMU command line. Devices get fixed PCI slots so the guest probes (and
    names) them in the same order every time: the vhost-user HBA first (slot 4), then
    QEMU's own virtio-scsi (slot 5), then vhost-user-blk devices (slots 6 to 0xf); slots
    from 0x10 up are free for tests' hot-plug."""
    argv = [QEMU, *_machine_args(options, kernel, initrd, cmdline, console)]
    if qmp is not None:
        argv += ["-qmp", f"unix:{qmp},server=on,wait=off"]
    if options.vhost_user_socket is not None:
        argv += _vhost_user_args(options)
    if options.qemu_disks or options.qemu_null_disks:
        argv += _qemu_hba_args(options)
    for i, sock in enumerate(options.vhost_user_blk_sockets):
        argv += _vhost_user_blk_args(i, sock, options.queues)
    argv += list(options.extra_qemu_args)
    return argv


def _machine_args(options: GuestOptions, kernel: Path, initrd: Path, cmdline: str,
                  console: Path) -> list[str]:
    """Machine, memory, CPUs, kernel and serial console."""
    memory = options.memory
    argv = [
        "-nodefaults", "-no-user-config", "-display", "none",
        # guest RAM a vhost-user backend can map: a shared memfd
        "-object", f"memory-backend-memfd,id=mem,size={memory},share=on",
        "-machine", "q35,memory-backend=mem",
        "-m", memory,
        "-smp", str(options.vcpus),
        "-kernel", str(kernel), "-initrd", str(initrd), "-append", cmdline,
        "-chardev", f"file,id=con,path={console}", "-serial", "chardev:con",
    ]
    if options.accel == "kvm":
        argv += ["-accel", "kvm", "-cpu", "host"]
    else:
        # one host thread per vCPU; "max" gives the guest every feature TCG emulates
        argv += ["-accel", "tcg,thread=multi", "-cpu", "max"]
    if options.after_reboot is None:
        argv.append("-no-reboot")
    if options.pin_vcpus:
        argv += NAME_THREADS
    return argv


def _vhost_user_args(options: GuestOptions) -> list[str]:
    """The vhost-user-scsi-pci device in slot 4 and the socket chardev it talks over."""
    chardev = f"socket,id=vus,path={options.vhost_user_socket}"
    reconnect_ms = options.reconnect_ms
    if reconnect_ms:
        if qemu_version() >= (9, 2):
            chardev += f",reconnect-ms={int(reconnect_ms)}"
        else:  # older QEMU (bookworm's 7.2) counts whole seconds
            chardev += f",reconnect={max(1, -(-int(reconnect_ms) // 1000))}"
    dev: dict[str, object] = {
        "driver": "vhost-user-scsi-pci", "id": "vus0", "chardev": "vus",
        "num_queues": options.queues, "bus": "pcie.0", "addr": "0x4",
    }
    dev.update(options.vhost_user_options)
    return ["-chardev", chardev, "-device", json.dumps(dev)]


# vhost-user-blk devices, in this order: the guest's /dev/vda.. follow the probe order
VHOST_USER_BLK_SLOTS = tuple(range(0x6, 0x10))


def _vhost_user_blk_args(index: int, sock: str | os.PathLike[str], queues: int) -> list[str]:
    """vhost-user-blk-pci number `index` (slot VHOST_USER_BLK_SLOTS[index]) on `sock`."""
    dev = {"driver": "vhost-user-blk-pci", "id": f"vub{index}", "chardev": f"vub{index}",
           "num-queues": queues, "bus": "pcie.0", "addr": hex(VHOST_USER_BLK_SLOTS[index])}
    return ["-chardev", f"socket,id=vub{index},path={sock}", "-device", json.dumps(dev)]


def _qemu_hba_args(options: GuestOptions) -> list[str]:
    """QEMU's own virtio-scsi-pci in slot 5, one disk per target: the raw files, then the
    null-co disks."""
    queues = options.qemu_queues or options.queues
    argv: list[str] = []
    hba: dict[str, object] = {
        "driver": "virtio-scsi-pci", "id": "qscsi", "num_queues": queues,
        "bus": "pcie.0", "addr": "0x5",
    }
    if options.iothreads:
        for i in range(queues):
            argv += ["-object", f"iothread,id=io{i}"]
        # without "vqs", QEMU spreads the request queues over the listed iothreads
        hba["iothread-vq-mapping"] = [{"iothread": f"io{i}"} for i in range(queues)]
    argv += ["-device", json.dumps(hba)]
    for i, disk in enumerate(options.qemu_disks):
        argv += [
            "-blockdev", json.dumps({
                "driver": "file", "node-name": f"qf{i}", "filename": str(disk),
                "discard": "unmap",
                # O_DIRECT (QEMU's cache=none) through io_uring, or the page cache
                **({"aio": "io_uring", "cache": {"direct": True}} if options.qemu_direct
                   else {"aio": "threads"}),
            }),
            "-blockdev", json.dumps({"driver": "raw", "node-name": f"qd{i}", "file": f"qf{i}"}),
            *_scsi_hd(i),
        ]
    for i, size in enumerate(options.qemu_null_disks, start=len(options.qemu_disks)):
        argv += [
            # read-zeroes: what a real disk's reads cost the guest (and what vscsi's null:
            # backend does), not whatever stale bytes the buffers held
            "-blockdev", json.dumps({"driver": "null-co", "node-name": f"qd{i}",
                                     "size": int(size), "read-zeroes": True}),
            *_scsi_hd(i),
        ]
    return argv


def _scsi_hd(target: int) -> list[str]:
    return ["-device", json.dumps({
        "driver": "scsi-hd", "id": f"qdisk{target}", "drive": f"qd{target}",
        "bus": "qscsi.0", "channel": 0, "scsi-id": target, "lun": 0,
    })]
