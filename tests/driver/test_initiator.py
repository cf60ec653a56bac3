"""The initiator's per-slot request building: what lands in guest memory per submit."""

import pytest

from vscsi.device.wire import decode_lun
from vscsi.driver.initiator import CMD_REQ, Initiator, rw16_cdb
from vscsi.driver.steering import PerCpu
from vscsi.driver.targets import LocalTargetBook
from vscsi.memory import Allocator, GuestMemory
from vscsi.virtio import DeviceRing


def initiator():
    mem = GuestMemory.anonymous(1 << 20)
    alloc = Allocator(mem)
    book = LocalTargetBook(8, 1)
    return Initiator.local(mem, alloc, PerCpu(1, 1, book), 1, book=book, queue_size=8), mem


def test_each_submit_writes_its_own_lun_and_sequence_into_a_reused_slot():
    ini, mem = initiator()
    slot = ini.new_request(4096, owner=0)
    dev = DeviceRing(mem, ini.rings[0].addrs, event_idx=True)
    for target, lun in [(3, 300), (3, 5), (7, 300), (3, 300)]:
        ini.submit(slot, 0, target, lun, rw16_cdb(False, 0, 8), write=False, nbytes=4096)
        ini.publish()
        chain = dev.pop()
        header = bytes(chain.readable[0])
        lun_field, seq = CMD_REQ.unpack_from(header)[:2]
        assert decode_lun(lun_field) == (target, lun)
        dev.push(chain.head, 0)
        (c,) = ini.complete(0)
        assert (c.target, c.lun, c.seq) == (target, lun, seq)


def test_data_view_is_the_slot_buffer_and_refuses_more():
    ini, mem = initiator()
    slot = ini.new_request(512)
    ini.data_view(slot)[:] = b"x" * 512
    assert bytes(mem.view(slot.data_addr, 512)) == b"x" * 512
    assert len(ini.data_view(slot, 100)) == 100
    with pytest.raises(ValueError, match="513 bytes of a 512-byte data buffer"):
        ini.data_view(slot, 513)
