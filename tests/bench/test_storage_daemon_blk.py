"""qemu-storage-daemon's vhost-user-blk exports as the guest benchmark starts them: a real
daemon, asked over the vhost-user protocol by our own front-end what it serves."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from vscsi.bench.storage_daemon import QSD, VhostUserBlkDaemon
from vscsi.vhost_user.codec import ProtocolFeature
from vscsi.vhost_user.frontend import FrontendClient

pytestmark = pytest.mark.skipif(QSD is None, reason="qemu-storage-daemon not installed")

PROTOCOL_FEATURES = 1 << 30


def ask(sock: Path) -> tuple[int, int]:
    """(queues, capacity in 512-byte sectors) of the export behind ``sock``."""
    with FrontendClient.connect(str(sock)) as fe:
        assert fe.get_features() & PROTOCOL_FEATURES
        offered = fe.get_protocol_features()
        wanted = (1 << ProtocolFeature.MQ) | (1 << ProtocolFeature.CONFIG)
        assert offered & wanted == wanted
        fe.set_protocol_features(wanted)
        queues = fe.get_queue_num()
        config = fe.get_config(0, 8)
        assert config is not None
        return queues, struct.unpack("<Q", config[:8])[0]


def test_one_export_per_disk_with_its_queues_and_size(tmp_path: Path) -> None:
    disk = tmp_path / "d0.img"
    disk.write_bytes(b"\0" * (3 << 20))
    with VhostUserBlkDaemon([disk, f"null:{5 << 20}"], tmp_path, queues=2) as qsd:
        assert [s.name for s in qsd.sockets] == ["blk0.sock", "blk1.sock"]
        assert ask(qsd.sockets[0]) == (2, (3 << 20) // 512)
        assert ask(qsd.sockets[1]) == (2, (5 << 20) // 512)
    assert qsd.proc is None


def test_bad_disk_is_reported_with_the_daemons_words(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="qemu-storage-daemon exited"):
        VhostUserBlkDaemon([tmp_path / "missing.img"], tmp_path, queues=1).start()
