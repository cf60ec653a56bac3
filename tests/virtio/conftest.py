"""Every ring test runs twice: on the Python rings (vscsi.virtio, the reference) and on the
compiled data plane's (vscsi.dataplane), which adopt a Python ring's state and must then
behave exactly alike. Where the extension is not built, the compiled half is skipped."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

from vscsi.dataplane import compiled
from vscsi.virtio import DeviceRing, PackedDeviceRing


def compiled_split(*args: object, **kw: object) -> object:
    assert compiled is not None
    return compiled.SplitRing.adopt(DeviceRing(*args, **kw))


def compiled_packed(*args: object, **kw: object) -> object:
    assert compiled is not None
    return compiled.PackedRing.adopt(PackedDeviceRing(*args, **kw))


@pytest.fixture(scope="module", autouse=True, params=["python", "compiled"])
def ring_plane(request: pytest.FixtureRequest) -> Iterator[str]:
    """Which device rings the module's tests build (module scope: hypothesis tests
    take no function-scoped fixture)."""
    if request.param == "python":
        yield "python"
        return
    if compiled is None:
        pytest.skip("the compiled data plane is not built")
    with pytest.MonkeyPatch.context() as mp:
        for name in (request.module.__name__, "tests.virtio.rig", "tests.virtio.packed_rig"):
            module = sys.modules.get(name)
            if module is None:
                continue
            if hasattr(module, "DeviceRing"):
                mp.setattr(module, "DeviceRing", compiled_split)
            if hasattr(module, "PackedDeviceRing"):
                mp.setattr(module, "PackedDeviceRing", compiled_packed)
        yield "compiled"
