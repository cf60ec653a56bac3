"""ORDERED commands hold their place on an O_DIRECT LUN served through io_uring (the
compiled plane's, or the Python path's), with requests in flight and completing as the
disk completes them. Each round, SIMPLE writes of one pattern go out on queue 0, then --
without waiting -- ORDERED writes of a second pattern to the same blocks and SIMPLE reads
of them on queue 1 (or all on one queue). With the task attributes honoured, every
ORDERED write starts after the SIMPLE writes before it ended and every read after the
ORDERED writes ended: each read returns the second pattern, whatever order the disk
completes things in. (Without them the reads race the writes: seen here as stale data.)"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from vscsi.dataplane import compiled
from vscsi.device.ordering import ORDERED
from vscsi.testing.files import takes_o_direct
from vscsi.testing.serve import ServeProcess

from .rig import TestGuest, read10, write10

BLOCK = 4096
ROUNDS = 24


@pytest.mark.parametrize("plane", ["compiled", "python"])
@pytest.mark.parametrize("layout", ["two queues", "one queue"])
def test_ordered_writes_hold_their_place_on_an_o_direct_lun(tmp_path: Path, plane: str,
                                                            layout: str) -> None:
    if plane == "compiled" and compiled is None:
        pytest.skip("the compiled data plane is not built")
    disk = tmp_path / "d.img"
    with open(disk, "wb") as f:
        f.truncate(32 << 20)
    if not takes_o_direct(disk):
        pytest.skip(f"{tmp_path} does not take O_DIRECT")
    rng = random.Random(f"{plane} {layout}")
    with ServeProcess([f"0:0=file:{disk},direct,aio=io_uring"], directory=tmp_path,
                      extra=["--dataplane", plane]) as serve:
        guest = TestGuest.connect(serve.socket, queue_size=128)
        try:
            guest.negotiate()
            for index in (2, 3):
                guest.start_queue(index)
            first, second = (2, 3) if layout == "two queues" else (2, 2)
            for r in range(ROUNDS):
                lbas = [8 * n for n in rng.sample(range(4096), 8)]
                old, new = bytes([2 * r + 1]) * BLOCK, bytes([2 * r + 2]) * BLOCK
                for lba in lbas:
                    guest.submit(first, 0, 0, write10(lba, 8), data_out=old)
                guest.kick(first)
                for lba in lbas:
                    guest.submit(second, 0, 0, write10(lba, 8), data_out=new,
                                 task_attr=ORDERED)
                for lba in lbas:
                    guest.submit(second, 0, 0, read10(lba, 8), data_in=BLOCK)
                guest.kick(second)
                counts = {first: len(lbas), second: 2 * len(lbas)} if first != second \
                    else {first: 3 * len(lbas)}
                answers = [a for q, n in counts.items() for a in guest.wait(q, n)]
                assert all(a.response == 0 and a.status == 0 for a in answers), answers
                reads = [a.data for a in answers if a.data]
                assert len(reads) == len(lbas)
                assert all(data == new for data in reads), \
                    f"round {r}: a read returned {set(d[:1] for d in reads)}, not {new[:1]}"
        finally:
            guest.close()
    assert "Traceback" not in serve.output()
