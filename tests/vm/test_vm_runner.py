"""The runner without booting: QEMU command lines, console parsing, streaming, the
per-run archive and argument checks."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from vscsi.vm import Guest, GuestConfigError, GuestImage, GuestOptions, build_qemu_argv
from vscsi.vm.console import OutputFilter, parse_console
from vscsi.vm.cpio import read_archive

NONCE = "0badc0de12345678"


def argv(**options) -> list[str]:
    return build_qemu_argv(GuestOptions(**options), kernel=Path("/k"), initrd=Path("/i"),
                           cmdline="console=ttyS0", console=Path("/c"))


def after(args: list[str], flag: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == flag]


def devices(args: list[str]) -> list[dict]:
    return [json.loads(d) for d in after(args, "-device") if d.startswith("{")]


def test_shared_memory_and_basics() -> None:
    a = argv(memory="1G", vcpus=4)
    assert "memory-backend-memfd,id=mem,size=1G,share=on" in after(a, "-object")
    assert "q35,memory-backend=mem" in after(a, "-machine")
    assert after(a, "-m") == ["1G"] and after(a, "-smp") == ["4"]
    assert "-no-reboot" in a and "-nodefaults" in a
    assert after(a, "-accel") == ["tcg,thread=multi"] and after(a, "-cpu") == ["max"]
    assert after(argv(accel="kvm"), "-accel") == ["kvm"]
    assert "-no-reboot" not in argv(after_reboot="true")


def test_vhost_user_device() -> None:
    a = argv(vhost_user_socket=Path("/run/v.sock"), queues=4, reconnect_ms=500,
             vhost_user_options={"virtqueue_size": 256})
    # reconnect-ms on QEMU >= 9.2, whole seconds (reconnect=1) before
    assert after(a, "-chardev")[-1] in ("socket,id=vus,path=/run/v.sock,reconnect-ms=500",
                                        "socket,id=vus,path=/run/v.sock,reconnect=1")
    (dev,) = devices(a)
    assert dev["driver"] == "vhost-user-scsi-pci" and dev["chardev"] == "vus"
    assert dev["num_queues"] == 4 and dev["virtqueue_size"] == 256


def test_qemu_disks_one_target_each() -> None:
    a = argv(qemu_disks=[Path("/d0"), Path("/d1")], qemu_queues=2)
    hba, *disks = devices(a)
    assert hba["driver"] == "virtio-scsi-pci" and hba["num_queues"] == 2
    assert "iothread-vq-mapping" not in hba
    assert [(d["driver"], d["bus"], d["channel"], d["scsi-id"], d["lun"]) for d in disks] == [
        ("scsi-hd", "qscsi.0", 0, 0, 0), ("scsi-hd", "qscsi.0", 0, 1, 0)]
    files = [json.loads(b) for b in after(a, "-blockdev") if '"file"' in b and "filename" in b]
    assert [f["filename"] for f in files] == ["/d0", "/d1"]


def test_iothread_per_queue() -> None:
    a = argv(qemu_disks=[Path("/d0")], qemu_queues=3, iothreads=True)
    assert [o for o in after(a, "-object") if o.startswith("iothread")] == [
        "iothread,id=io0", "iothread,id=io1", "iothread,id=io2"]
    hba = devices(a)[0]
    assert hba["iothread-vq-mapping"] == [{"iothread": f"io{i}"} for i in range(3)]


def test_null_disks_follow_the_files() -> None:
    a = argv(qemu_disks=[Path("/d0")], qemu_null_disks=[1 << 20, 2 << 20])
    blockdevs = [json.loads(b) for b in after(a, "-blockdev")]
    nulls = [b for b in blockdevs if b["driver"] == "null-co"]
    assert [(b["node-name"], b["size"], b["read-zeroes"]) for b in nulls] == [
        ("qd1", 1 << 20, True), ("qd2", 2 << 20, True)]
    disks = devices(a)[1:]
    assert [(d["drive"], d["scsi-id"]) for d in disks] == [("qd0", 0), ("qd1", 1), ("qd2", 2)]
    # null disks alone still make the HBA
    assert devices(argv(qemu_null_disks=[4096]))[0]["driver"] == "virtio-scsi-pci"


def test_vhost_user_blk_one_device_per_socket() -> None:
    a = argv(vhost_user_blk_sockets=[Path("/b0"), Path("/b1")], queues=2)
    assert [c for c in after(a, "-chardev") if c.startswith("socket")] == [
        "socket,id=vub0,path=/b0", "socket,id=vub1,path=/b1"]
    assert [(d["driver"], d["chardev"], d["num-queues"], d["addr"]) for d in devices(a)] == [
        ("vhost-user-blk-pci", "vub0", 2, "0x6"), ("vhost-user-blk-pci", "vub1", 2, "0x7")]


def test_vhost_user_blk_sockets_checked(fake_image, tmp_path) -> None:
    with pytest.raises(GuestConfigError, match="does not exist"):
        Guest(fake_image, "true", GuestOptions(vhost_user_blk_sockets=[tmp_path / "no.sock"]))
    with pytest.raises(GuestConfigError, match="at most 10"):
        Guest(fake_image, "true",
              GuestOptions(vhost_user_blk_sockets=[tmp_path / f"{i}" for i in range(11)]))


def test_both_hbas_in_fixed_slots() -> None:
    a = argv(vhost_user_socket=Path("/s"), qemu_disks=[Path("/d0")], extra_qemu_args=["-S"])
    vus, hba = devices(a)[:2]
    assert (vus["addr"], hba["addr"]) == ("0x4", "0x5")
    assert a[-1] == "-S"


def console(*parts: str) -> str:
    return "".join(parts)


def test_parse_console_statuses_and_output() -> None:
    text = console(
        "[ 0.1] boot noise\nvscsi-init: x\n",
        f"@@vscsi:{NONCE}:begin:1@@\n", "hello\nworld\n",
        f"\n@@vscsi:{NONCE}:exit:1:42@@\n", "[ 3.0] reboot: Power down\n",
    )
    phases, error = parse_console(text, NONCE)
    assert error is None
    assert [(p.phase, p.output, p.status) for p in phases] == [(1, "hello\nworld\n", 42)]


def test_parse_console_without_final_newline_and_foreign_markers() -> None:
    text = console(
        f"@@vscsi:{NONCE}:begin:1@@\n",
        "@@vscsi:1111111111111111:exit:1:9@@\n",   # printed by the script: not ours
        "partial", f"\n@@vscsi:{NONCE}:exit:1:0@@\n",
    )
    phases, _ = parse_console(text, NONCE)
    assert phases[0].status == 0
    assert phases[0].output == "@@vscsi:1111111111111111:exit:1:9@@\npartial"


def test_parse_console_reboot_phases_and_errors() -> None:
    text = console(
        f"@@vscsi:{NONCE}:begin:1@@\n", "one\n", f"\n@@vscsi:{NONCE}:exit:1:0@@\n",
        f"@@vscsi:{NONCE}:reboot:1@@\n", "[ 1.0] reboot: Restarting system\n",
        f"@@vscsi:{NONCE}:begin:2@@\n", "two\n", f"\n@@vscsi:{NONCE}:exit:2:3@@\n",
    )
    phases, error = parse_console(text, NONCE, reboot=True)
    assert error is None
    assert [(p.phase, p.output, p.status) for p in phases] == [(1, "one\n", 0), (2, "two\n", 3)]
    # the same begin twice without reboot mode: the guest reset by itself
    twice = f"@@vscsi:{NONCE}:begin:1@@\nx\n@@vscsi:{NONCE}:begin:1@@\n"
    assert "twice" in (parse_console(twice, NONCE)[1] or "")
    err = f"@@vscsi:{NONCE}:error:rtc-alarm-unusable@@\n"
    assert parse_console(err, NONCE, reboot=True)[1] == "rtc-alarm-unusable"


@pytest.mark.parametrize("chunk", [1, 3, 7, 1000])
def test_streamed_output_equals_result_output(chunk: int) -> None:
    text = console(
        "boot\n", f"@@vscsi:{NONCE}:begin:1@@\n", "a\n\nb", f"\n@@vscsi:{NONCE}:exit:1:0@@\n",
        f"@@vscsi:{NONCE}:begin:2@@\n", "c\n", f"\n@@vscsi:{NONCE}:exit:2:0@@\n", "off\n",
    )
    f = OutputFilter(NONCE)
    streamed = "".join(f.feed(text[:end]) for end in range(chunk, len(text) + chunk, chunk))
    phases, _ = parse_console(text, NONCE, reboot=True)
    assert streamed == "".join(p.output for p in phases) == "a\n\nbc\n"


@pytest.fixture
def fake_image(tmp_path) -> GuestImage:
    (tmp_path / "vmlinuz").write_bytes(b"k")
    (tmp_path / "initramfs.cpio.gz").write_bytes(b"BASE")
    return GuestImage(tmp_path / "vmlinuz", tmp_path / "initramfs.cpio.gz", "6.1.0-x")


def test_run_archive_follows_the_base(fake_image, tmp_path) -> None:
    extra = tmp_path / "job.fio"
    extra.write_text("[job]\nrw=read\n")
    g = Guest(fake_image, "echo hi\n", GuestOptions(
        after_reboot="echo again\n", files={"/etc/job.fio": extra, "data/blob": b"\x00\x01"},
        env={"X": "1"}, workdir=tmp_path / "w"))
    initrd = (tmp_path / "w" / "initrd.img").read_bytes()
    assert initrd[:4] == b"BASE"
    entries = {n: d for n, _, d in read_archive(initrd[4:])}
    assert entries["vscsi/script1"] == b"echo hi\n"
    assert entries["vscsi/script2"] == b"echo again\n"
    assert entries["etc/job.fio"] == b"[job]\nrw=read\n"
    assert entries["data/blob"] == b"\x00\x01"
    config = entries["vscsi/config"].decode()
    assert f"NONCE={g.nonce}" in config and "REBOOT=1" in config and "export X=1" in config
    assert "-no-reboot" not in g.argv
    g.close()


def test_argument_errors(fake_image, tmp_path) -> None:
    with pytest.raises(GuestConfigError, match="does not exist"):
        Guest(fake_image, "true", GuestOptions(vhost_user_socket=tmp_path / "nope.sock"))
    plain = tmp_path / "plain"
    plain.write_text("")
    with pytest.raises(GuestConfigError, match="not a socket"):
        Guest(fake_image, "true", GuestOptions(vhost_user_socket=plain))
    with pytest.raises(GuestConfigError, match="disk file"):
        Guest(fake_image, "true", GuestOptions(qemu_disks=[tmp_path / "missing.img"]))
    with pytest.raises(GuestConfigError, match="accelerator"):
        Guest(fake_image, "true", GuestOptions(accel="hvf"))
    with pytest.raises(GuestConfigError):
        Guest(fake_image, "true", GuestOptions(files={"../escape": b""}))
    with pytest.raises(GuestConfigError):
        Guest(fake_image, "true", GuestOptions(vcpus=0))


def test_socket_accepted(fake_image, tmp_path) -> None:
    path = tmp_path / "v.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        g = Guest(fake_image, "true", GuestOptions(vhost_user_socket=path, workdir=tmp_path / "w"))
        assert f"socket,id=vus,path={path}" in g.argv
        g.close()


def _config(tmp_path, **kw) -> str:
    g = Guest(kw.pop("image"), "true", GuestOptions(workdir=tmp_path / "w", **kw))
    initrd = (tmp_path / "w" / "initrd.img").read_bytes()
    g.close()
    return {n: d for n, _, d in read_archive(initrd[4:])}["vscsi/config"].decode()


def test_scan_targets_auto(fake_image, tmp_path) -> None:
    d0, d1 = tmp_path / "d0", tmp_path / "d1"
    d0.write_bytes(b""), d1.write_bytes(b"")
    # QEMU's disks only: scan just their targets
    assert "SCAN_TARGETS='0 1'" in _config(tmp_path, image=fake_image, qemu_disks=[d0, d1])
    assert "SCAN_TARGETS='0 1 2'" in _config(tmp_path, image=fake_image, qemu_disks=[d0, d1],
                                             qemu_null_disks=[4096])
    # a vhost-user backend: scan everything, as a normal guest would
    path = tmp_path / "v.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        cfg = _config(tmp_path, image=fake_image, qemu_disks=[d0], vhost_user_socket=path)
    assert "SCSI_SCAN" not in cfg
    assert "SCAN_TARGETS='5'" in _config(tmp_path, image=fake_image, scan_targets=[5])
    assert "SCSI_SCAN" not in _config(tmp_path, image=fake_image, qemu_disks=[d0],
                                      scan_targets=None)


class _FlakyGuest:
    """Stands in for Guest: the first `crashes` boots die like QEMU's rare TCG abort."""

    boots = 0
    crashes = 1
    early = True

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def wait(self):
        from vscsi.vm import GuestError, GuestResult

        type(self).boots += 1
        if type(self).boots <= type(self).crashes:
            raise GuestError("QEMU was killed by signal 6", qemu_crashed_early=self.early)
        return GuestResult(output="ok\n", status=0, seconds=1.0)


def test_early_qemu_crash_is_retried_once(monkeypatch, fake_image) -> None:
    from vscsi.vm import GuestError, runner

    monkeypatch.setattr(runner, "Guest", _FlakyGuest)
    _FlakyGuest.boots, _FlakyGuest.crashes, _FlakyGuest.early = 0, 1, True
    result = runner.run_guest(fake_image, "true")
    assert result.status == 0 and result.attempts == 2
    # twice in a row: reported
    _FlakyGuest.boots, _FlakyGuest.crashes = 0, 2
    with pytest.raises(GuestError):
        runner.run_guest(fake_image, "true")
    # a failure after the script began (or any other failure) is never retried
    _FlakyGuest.boots, _FlakyGuest.crashes, _FlakyGuest.early = 0, 1, False
    with pytest.raises(GuestError):
        runner.run_guest(fake_image, "true")
    assert _FlakyGuest.boots == 1


def test_qemu_disks_direct_or_page_cache() -> None:
    files = [b for b in (json.loads(x) for x in after(argv(qemu_disks=[Path("/d0")]),
                                                        "-blockdev")) if b["driver"] == "file"]
    assert files[0]["aio"] == "threads" and "cache" not in files[0]
    direct = [b for b in (json.loads(x) for x in after(
        argv(qemu_disks=[Path("/d0")], qemu_direct=True), "-blockdev")) if b["driver"] == "file"]
    assert direct[0]["aio"] == "io_uring" and direct[0]["cache"] == {"direct": True}
