"""The generated /init and per-run config: structure, shell syntax, and the pieces of
logic that can run on the host (the reboot state kept in the RTC alarm)."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from vscsi.vm.init import MARKER_RE, PHASE_BASE, ModuleLoad, render_config, render_init

MODULES = [
    ModuleLoad("/lib/modules/6.1.0-x/kernel/drivers/virtio/virtio_ring.ko"),
    ModuleLoad("/lib/modules/6.1.0-x/kernel/drivers/scsi/scsi_mod.ko", "scan=sync"),
    ModuleLoad("/lib/modules/6.1.0-x/kernel/drivers/scsi/virtio_scsi.ko"),
]

needs_busybox = pytest.mark.skipif(shutil.which("busybox") is None, reason="no busybox")


def test_modules_loaded_in_order_with_args() -> None:
    text = render_init("6.1.0-x", MODULES)
    lines = [ln for ln in text.splitlines() if ln.startswith("insmod ")]
    assert [ln.split()[1].rsplit("/", 1)[1] for ln in lines] == [
        "virtio_ring.ko", "scsi_mod.ko", "virtio_scsi.ko"]
    assert "scsi_mod.ko scan=sync ||" in lines[1]
    # module loading comes before the settle wait, which comes before the script
    assert text.index("insmod ") < text.index("\nsettle\n") < text.index("run_phase 1")


def test_init_essentials() -> None:
    text = render_init("6.1.0-x", MODULES)
    assert text.startswith("#!/bin/sh\n")
    assert "@" + "KVER@" not in text and "@MODULES@" not in text and "@PHASE" not in text
    for needle in ("mount -t devtmpfs", "mount -t proc", "mount -t sysfs", "poweroff -f",
                   "reboot -f", ". /vscsi/config", "/dev/disk/by-hctl"):
        assert needle in text


@needs_busybox
def test_init_is_valid_busybox_sh(tmp_path) -> None:
    script = tmp_path / "init"
    script.write_text(render_init("6.1.0-x", MODULES))
    proc = subprocess.run(["busybox", "sh", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_config() -> None:
    text = render_config("abc123", reboot=True, settle_timeout=30,
                         env={"DISK": "/dev/sdb", "QUOTED": "a b'c"})
    assert "NONCE=abc123\n" in text and "REBOOT=1\n" in text and "SETTLE_TIMEOUT=30\n" in text
    assert "export DISK=/dev/sdb\n" in text
    with pytest.raises(ValueError):
        render_config("abc", reboot=False, env={"BAD-NAME": "x"})


@needs_busybox
def test_config_quoting_survives_the_shell(tmp_path) -> None:
    cfg = tmp_path / "config"
    cfg.write_text(render_config("ab", reboot=False, env={"V": "a b'c $HOME"}))
    out = subprocess.run(["busybox", "sh", "-c", f'. {cfg}; printf %s "$V"'],
                         capture_output=True, text=True, check=True).stdout
    assert out == "a b'c $HOME"


def test_marker_regex() -> None:
    m = MARKER_RE.search("noise @@vscsi:0123abcd:exit:1:42@@ more")
    assert m and m.group("nonce") == "0123abcd" and m.group("event") == "exit"
    assert m.group("args") == "1:42"
    m = MARKER_RE.search("@@vscsi:ff:begin:2@@")
    assert m and m.group("args") == "2"
    # the literal text in /init (with $NONCE unexpanded) is not a marker
    assert MARKER_RE.search('echo "@@vscsi:$NONCE:begin:$1@@"') is None


def _state_get_function() -> str:
    text = render_init("6.1.0-x", MODULES)
    m = re.search(r"^state_get\(\) \{\n.*?^\}\n", text, re.S | re.M)
    assert m
    return m.group(0)


@needs_busybox
@pytest.mark.parametrize(
    ("alarm", "state"),
    [("00:00:00", 0), (f"13:56:{PHASE_BASE + 1}", 1), (f"01:02:{PHASE_BASE + 2}", 2),
     (f"23:59:{PHASE_BASE + 3}", 3), (f"23:59:{PHASE_BASE + 4}", 0), ("12:00:07", 0),
     ("12:00:08", 0), ("12:00:09", 0)],
)
def test_reboot_state_parsing(tmp_path, alarm: str, state: int) -> None:
    # the same text the kernel's /proc/driver/rtc shows; "08"/"09" would break $(( ))
    # if the leading zero were kept (octal)
    rtc = tmp_path / "rtc"
    rtc.write_text(f"rtc_time\t: 11:56:45\nrtc_date\t: 2026-11-25\nalrm_time\t: {alarm}\n"
                   "alrm_date\t: 2026-11-25\nalarm_IRQ\t: no\n")
    fn = _state_get_function().replace("/proc/driver/rtc", str(rtc))
    proc = subprocess.run(["busybox", "sh", "-c", fn + "state_get"], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(state)


@needs_busybox
def test_vscsi_dev_helper(tmp_path) -> None:
    from vscsi.vm.init import VSCSI_DEV

    helper = tmp_path / "vscsi-dev"
    helper.write_text(VSCSI_DEV)
    assert subprocess.run(["busybox", "sh", "-n", str(helper)]).returncode == 0
    usage = subprocess.run(["busybox", "sh", str(helper)], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage" in usage.stderr
    # no such device, no waiting: fails at once with a message
    proc = subprocess.run(["busybox", "sh", str(helper), "9:9:9:9"], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 1 and "9:9:9:9" in proc.stderr


def test_config_scan_targets() -> None:
    assert "SCSI_SCAN" not in render_config("ab", reboot=False)
    text = render_config("ab", reboot=False, scan_targets=[3, 0, 1, 1])
    assert "SCSI_SCAN=manual\n" in text and "SCAN_TARGETS='0 1 3'\n" in text
    with pytest.raises(ValueError):
        render_config("ab", reboot=False, scan_targets=[256])


def test_scsi_mod_takes_the_scan_mode_from_the_config() -> None:
    text = render_init("6.1.0-x", [ModuleLoad("/m/scsi_mod.ko", "scan=${SCSI_SCAN:-sync}")])
    assert "insmod /m/scsi_mod.ko scan=${SCSI_SCAN:-sync}" in text
    assert text.index(". /vscsi/config") < text.index("insmod")
    assert 'echo "0 $t -" >"$h/scan"' in text
