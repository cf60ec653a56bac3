"""The libvirt domain of docs/deploy.md boots a real guest against `vscsi serve`.

The test takes the ```xml block of the page's libvirt section as it stands, fills in its
placeholders (the test guest's kernel, a per-run initramfs holding the fio script, its
command line, a console file, the serve socket; `type='qemu'`: no KVM here), defines and
starts the domain with `virsh` against a `vscsi serve` on a file LUN, and reads the
serial console until the script's exit marker. The guest runs fio randwrite with crc32c
verify on the vscsi disk; fio must end with no error, and serve must have seen the
requests on both queues (one fio job per vCPU), and the data must be in the file. The
domain (named per run) is destroyed and undefined whatever happens.

libvirtd: used if it answers; else, as root, started here (in the foreground, stopped at
the end). Where it is not installed or cannot start, the test skips with one line."""

from __future__ import annotations

import os
import pwd
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vscsi.testing.serve import ServeProcess

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "docs" / "deploy.md"
VIRTLOGD_SOCK = "/run/libvirt/virtlogd-sock"
VIRSH = ["virsh", "--quiet", "-c", "qemu:///system"]
MiB = 1 << 20
DISK_SIZE = 32 * MiB
TIMEOUT = 240.0      # domain start -> the script's exit marker (TCG)

# One fio job per vCPU (so per request queue), 1024 random 4 KiB writes each, then read
# back and checked (crc32c). The options before the first --name are every job's.
# fio's terse v3 output: one line per job, field 5 its error (0: none).
SCRIPT = r"""
D=/dev/$(ls /sys/class/scsi_disk/0:0:0:0/device/block 2>/dev/null)
[ -b "$D" ] || { echo "FIO-RESULT nodisk"; exit 10; }
echo "SIZE $(cat /sys/block/${D#/dev/}/size)"
fio --filename=$D --rw=randwrite --bs=4k --ioengine=libaio --iodepth=8 --direct=1 \
    --verify=crc32c --do_verify=1 --verify_fatal=1 --eta=never --output-format=terse \
    --name=c0 --offset=4M --size=4M --cpus_allowed=0 \
    --name=c1 --offset=8M --size=4M --cpus_allowed=1 >/tmp/o 2>&1
rc=$?
errs=$(awk -F';' 'NF > 5 {s += $5} END {print s + 0}' /tmp/o)
jobs=$(awk -F';' 'NF > 5' /tmp/o | wc -l)
[ $rc = 0 ] || tail -20 /tmp/o
echo "FIO-RESULT rc=$rc jobs=$jobs errors=$errs"
exit $rc
"""


def domain_xml_template() -> str:
    """The ```xml block of docs/deploy.md's libvirt section."""
    text = DEPLOY.read_text()
    section = text.split("\n## libvirt\n", 1)[1].split("\n## ", 1)[0]
    m = re.search(r"```xml\n(.*?)```", section, re.S)
    assert m, "docs/deploy.md: no ```xml block in the libvirt section"
    return m.group(1)


def fill(template: str, values: dict[str, str]) -> str:
    xml = template
    for key, value in values.items():
        xml = xml.replace(f"@{key}@", value.replace("&", "&amp;").replace("<", "&lt;")
                          .replace("'", "&apos;"))
    left = sorted(set(re.findall(r"@[A-Z]+@", xml)))
    assert not left, f"docs/deploy.md: placeholders the test does not know: {left}"
    return xml


def virsh(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([*VIRSH, *args], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"virsh {' '.join(args)}: {(r.stderr or r.stdout).strip()}")
    return r


def _answers() -> bool:
    try:
        return virsh("version", check=False, timeout=20).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def _last_error(text: str) -> str:
    """The daemon's last error message, the one that names a cause where there is one
    (libvirtd ends with a bare "Driver state initialization failed")."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line.split(" : ", 3)[-1] for line in lines if " error : " in line]
    specific = [e for e in errors if e != "Driver state initialization failed"]
    return (specific or errors or lines or ["no output"])[-1]


class _Daemon:
    """A libvirt daemon run here in the foreground, its output kept for the skip line.
    --timeout: should it outlive the test somehow, it ends once idle."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([name, "--timeout", "300"], stdin=subprocess.DEVNULL,
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def why(self) -> str:
        self.log.seek(0)
        return _last_error(self.log.read().decode(errors="replace"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def libvirtd() -> Iterator[None]:
    """libvirtd answering on qemu:///system, with virtlogd (it hands QEMU's output to
    it): the running ones, or, as root, ones started here and stopped at the end."""
    missing = [t for t in ("virsh", "libvirtd", "virtlogd", "qemu-system-x86_64")
               if shutil.which(t) is None]
    if missing:
        pytest.skip(f"libvirt: {', '.join(missing)} not installed (scripts/setup-host.sh)")
    need_logd = not Path(VIRTLOGD_SOCK).exists()
    need_libvirtd = not _answers()
    if (need_logd or need_libvirtd) and os.geteuid() != 0:
        pytest.skip("libvirt: libvirtd or virtlogd is not running, and only root can "
                    "start them")
    started: list[_Daemon] = []
    try:
        if need_logd:
            started.append(_Daemon("virtlogd"))
        if need_libvirtd:
            started.append(_Daemon("libvirtd"))
        deadline = time.monotonic() + 60
        while not (Path(VIRTLOGD_SOCK).exists() and _answers()):
            dead = [d for d in started if d.proc.poll() is not None]
            if dead or time.monotonic() > deadline:
                d = (dead or started)[0]
                pytest.skip(f"libvirt: {d.name} cannot start here: {d.why()}")
            time.sleep(0.2)
        yield
    finally:
        for d in reversed(started):
            d.stop()


def qemu_user() -> pwd.struct_passwd:
    """The user libvirt runs QEMU as: `user =` in qemu.conf, else Debian's default."""
    name = "libvirt-qemu"
    try:
        conf = Path("/etc/libvirt/qemu.conf").read_text()
    except OSError:
        conf = ""
    m = re.search(r'^\s*user\s*=\s*"([^"]+)"', conf, re.M)
    if m:
        name = m.group(1).lstrip("+")
    return pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)


@pytest.mark.guest
def test_docs_libvirt_domain_runs_fio_verify_on_vscsi(libvirtd, guest_image) -> None:  # type: ignore[no-untyped-def]
    from vscsi.vm import Guest, GuestOptions
    from vscsi.vm.console import parse_console
    from vscsi.vm.runner import BASE_CMDLINE

    # Everything QEMU opens lives here, readable by libvirt's QEMU user: /root and
    # mkdtemp's directories are 0700.
    work = Path(tempfile.mkdtemp(prefix="vscsi-libvirt-"))
    work.chmod(0o755)
    name = f"vscsi-test-{secrets.token_hex(4)}"
    defined = False
    serve = ServeProcess([f"0:0=file:{work / 'disk.img'}"], queues=2, directory=work)
    try:
        with open(work / "disk.img", "wb") as f:
            f.truncate(DISK_SIZE)
        serve.start()
        # the socket is 0600: hand it to the user libvirt runs QEMU as (docs/deploy.md)
        os.chown(serve.socket, qemu_user().pw_uid, -1)

        # the per-run initramfs exactly as a vscsi.vm run composes it (the image's
        # initramfs + the archive with /vscsi/config and the script), without starting QEMU
        run = Guest(guest_image, SCRIPT, GuestOptions(
            vhost_user_socket=serve.socket, vcpus=2, queues=2, scan_targets=(0,),
            workdir=work))
        kernel = work / "vmlinuz"
        shutil.copyfile(guest_image.kernel, kernel)
        initrd = work / "initrd.img"
        for f in (kernel, initrd):
            f.chmod(0o644)
        console = work / "console.log"
        xml, found = re.subn(r"<domain type='\w+'", "<domain type='qemu'", fill(
            domain_xml_template(), {
                "NAME": name, "KERNEL": str(kernel), "INITRD": str(initrd),
                "CMDLINE": BASE_CMDLINE, "CONSOLE": str(console), "SOCKET": serve.socket,
            }), count=1)
        assert found == 1, "docs/deploy.md: the domain XML has no <domain type='...'"
        (work / "domain.xml").write_text(xml)

        virsh("define", str(work / "domain.xml"))
        defined = True
        t0 = time.monotonic()
        virsh("start", name)

        text, phases, error, state = "", [], None, ""
        while True:
            try:
                text = console.read_bytes().decode("utf-8", "replace").replace("\r\n", "\n")
            except OSError:
                text = ""
            phases, error = parse_console(text, run.nonce)
            if phases or error:
                break
            state = virsh("domstate", name, check=False).stdout.strip()
            if state not in ("running", "paused", "in shutdown"):
                break
            if time.monotonic() - t0 > TIMEOUT:
                break
            time.sleep(0.25)
        seconds = time.monotonic() - t0
        tail = "\n".join(text.splitlines()[-40:])
        ctx = (f"after {seconds:.0f}s, domain {state!r}\n--- console ---\n{tail}\n"
               f"--- serve log ---\n{serve.output()[-2000:]}\n"
               f"--- qemu log ---\n{_qemu_log(name)}")
        assert error is None, f"guest init reported: {error}\n{ctx}"
        assert phases, f"the guest script did not finish\n{ctx}"
        output = phases[0].output
        result = [line for line in output.splitlines() if line.startswith("FIO-RESULT ")]
        assert result == ["FIO-RESULT rc=0 jobs=2 errors=0"], f"{output}\n{ctx}"
        assert f"SIZE {DISK_SIZE // 512}" in output, output
        assert phases[0].status == 0, output

        # the guest powers off (on_poweroff: destroy); serve then saw the session end
        stats = serve.wait_idle(1, timeout=30)
        assert stats is not None, f"serve never saw the session end\n{ctx}"
        # each job's 1024 writes (and its reads) on its vCPU's request queue
        per_queue = stats["per_queue"]
        assert len(per_queue) == 2 and min(per_queue) >= 1024, f"{per_queue}\n{ctx}"
        log = serve.output()
        assert serve.stop() == 0, log
        assert "Traceback" not in log, log
        with open(work / "disk.img", "rb") as f:
            f.seek(4 * MiB)
            assert f.read(8 * MiB).count(0) < 8 * MiB // 2, "fio's data is not in the file"
    finally:
        try:
            if defined:
                virsh("destroy", name, check=False)
                virsh("undefine", name, check=False)
                Path(f"/var/log/libvirt/qemu/{name}.log").unlink(missing_ok=True)
        finally:
            serve.stop()
            shutil.rmtree(work, ignore_errors=True)


def _qemu_log(name: str) -> str:
    try:
        return "\n".join(Path(f"/var/log/libvirt/qemu/{name}.log").read_text(
            errors="replace").splitlines()[-15:])
    except OSError:
        return "(none)"
