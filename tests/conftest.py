"""What the whole suite shares: the guest image for the tests that boot a real Linux guest
-- one per session, from the shared cache ($VSCSI_CACHE or ~/.cache/vscsi), so the kernel
package is downloaded once for the test suite, the demo and the benchmarks alike."""

from __future__ import annotations

import pytest

from vscsi.vm import GuestImage, build_guest


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    return build_guest()
