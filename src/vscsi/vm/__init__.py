"""Guest image and QEMU launcher: build a small Linux guest from Debian packages, boot
it against a vhost-user-scsi backend (or QEMU's own virtio-scsi), run a script inside.

    image = build_guest()                       # cached under $VSCSI_CACHE or ~/.cache/vscsi
    result = run_guest(image, "sg_inq /dev/sda",
                       GuestOptions(vhost_user_socket="/tmp/vscsi.sock"))
    result.status, result.output
"""

from .image import GuestImage, ImageError, build_guest, cache_root
from .options import (
    GuestConfigError,
    GuestError,
    GuestOptions,
    GuestResult,
    GuestTimeout,
    PhaseResult,
)
from .qemu_argv import build_qemu_argv
from .runner import Guest, run_guest

__all__ = [
    "Guest",
    "GuestConfigError",
    "GuestError",
    "GuestImage",
    "GuestOptions",
    "GuestResult",
    "GuestTimeout",
    "ImageError",
    "PhaseResult",
    "build_guest",
    "build_qemu_argv",
    "cache_root",
    "run_guest",
]
