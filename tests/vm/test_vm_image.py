"""Image building: module resolution from modules.dep, and (with the real image) what
the initramfs holds."""

from __future__ import annotations

import gzip
import stat
from pathlib import Path

import pytest

from vscsi.vm import elf
from vscsi.vm.cpio import read_archive
from vscsi.vm.image import (
    ImageError,
    _modname,
    _strip_compression,
    parse_builtin,
    parse_modules_dep,
    resolve_modules,
)

DEP = """\
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_modern_dev.ko \
kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/scsi/scsi_common.ko:
kernel/drivers/scsi/scsi_mod.ko: kernel/drivers/scsi/scsi_common.ko
kernel/drivers/scsi/sd_mod.ko: kernel/drivers/scsi/scsi_mod.ko kernel/drivers/scsi/scsi_common.ko
kernel/drivers/scsi/virtio_scsi.ko.xz: kernel/drivers/scsi/scsi_mod.ko \
kernel/drivers/scsi/scsi_common.ko kernel/drivers/virtio/virtio.ko \
kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/scsi/raid_class.ko: kernel/drivers/scsi/scsi_mod.ko
"""


def names(paths: list[str]) -> list[str]:
    return [_modname(p) for p in paths]


def test_dependencies_first_in_root_order() -> None:
    deps = parse_modules_dep(DEP)
    order = names(resolve_modules(deps, set(), [("virtio_pci", True), ("sd_mod", True),
                                                ("virtio_scsi", True)]))
    assert order[-1] == "virtio_scsi"
    assert len(order) == len(set(order))
    for mod, before in [("virtio", "virtio_ring"), ("virtio_pci", "virtio"),
                        ("scsi_mod", "scsi_common"), ("sd_mod", "scsi_mod")]:
        assert order.index(before) < order.index(mod)
    assert order.index("sd_mod") < order.index("virtio_scsi")   # roots keep their order
    assert "raid_class" not in order                            # only what is asked for


def test_builtin_optional_and_missing() -> None:
    deps = parse_modules_dep(DEP)
    builtin = parse_builtin("kernel/drivers/block/virtio_blk.ko\nkernel/drivers/scsi/sg.ko\n")
    order = names(resolve_modules(deps, builtin, [("sg", True), ("nvram", False),
                                                  ("sd_mod", True)]))
    assert order == ["scsi_common", "scsi_mod", "sd_mod"]
    with pytest.raises(ImageError, match="nvram"):
        resolve_modules(deps, builtin, [("nvram", True)])


def test_cycle_is_an_error() -> None:
    deps = parse_modules_dep("a.ko: b.ko\nb.ko: a.ko\n")
    with pytest.raises(ImageError, match="cycle"):
        resolve_modules(deps, set(), [("a", True)])


def test_module_names() -> None:
    assert _modname("kernel/drivers/scsi/virtio_scsi.ko.xz") == "virtio_scsi"
    assert _modname("kernel/arch/x86/crypto/crc32c-intel.ko") == "crc32c_intel"
    assert _strip_compression("kernel/a/b.ko.zst") == "kernel/a/b.ko"
    assert _strip_compression("kernel/a/b.ko") == "kernel/a/b.ko"


def test_ldd_parses_the_loader_and_libraries() -> None:
    dd = Path("/usr/bin/dd")
    if not dd.exists():
        pytest.skip("no /usr/bin/dd")
    closure = elf.ldd([dd])[dd]
    assert any(so.startswith("libc.so") for so in closure)
    assert any(so.startswith("/") for so in closure)   # the dynamic loader


@pytest.mark.guest
def test_image_contents(guest_image) -> None:
    entries = {name: (mode, data) for name, mode, data in
               read_archive(gzip.decompress(guest_image.initramfs.read_bytes()))}
    assert stat.S_ISCHR(entries["dev/console"][0])
    assert entries["init"][0] & 0o111
    for tool in ("usr/bin/fio", "usr/bin/sg_inq", "usr/bin/sg_vpd", "usr/bin/sg_raw",
                 "usr/bin/sg_write_same", "usr/bin/dd", "usr/sbin/blkdiscard", "bin/busybox",
                 "usr/bin/vscsi-dev"):
        assert tool in entries, tool
    assert entries["bin/sh"][1] == b"busybox"
    mods = [_modname(m) for m in guest_image.modules]
    assert mods[-1] == "virtio_scsi"
    assert {"virtio_pci", "scsi_mod", "sd_mod", "sg"} <= set(mods)
    # every library fio needs is in the image (stubs count)
    fio_needs = elf.needed(Path("/usr/bin/fio"))
    present = {Path(n).name for n in entries}
    assert set(fio_needs) <= present
    # small: the heavy engine libraries were stubbed, not shipped
    if guest_image.stubbed:
        assert guest_image.initramfs.stat().st_size < 16 << 20
