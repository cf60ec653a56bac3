"""Files for tests and benches that need the real disk's behaviour."""

from __future__ import annotations

import os
from pathlib import Path


def takes_o_direct(path: str | os.PathLike[str]) -> bool:
    """Whether the existing file ``path`` opens with O_DIRECT (not on tmpfs before Linux
    6.6, nor on some network filesystems): a direct LUN can be served from it."""
    try:
        os.close(os.open(Path(path), os.O_RDWR | os.O_DIRECT))
    except OSError:
        return False
    return True
