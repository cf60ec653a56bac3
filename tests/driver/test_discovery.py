import struct

from vscsi.driver.discovery import decode_report_luns, discover


def report(luns_bytes):
    return struct.pack(">I4x", len(luns_bytes) * 8) + b"".join(luns_bytes)


def test_decode_single_level_and_flat_space():
    data = report([bytes([0, 5, 0, 0, 0, 0, 0, 0]), bytes([0x41, 0x2C, 0, 0, 0, 0, 0, 0])])
    assert decode_report_luns(data) == [5, 300]


def test_decode_truncated_and_empty():
    assert decode_report_luns(b"") == []
    data = report([bytes([0, 1, 0, 0, 0, 0, 0, 0]), bytes([0, 2, 0, 0, 0, 0, 0, 0])])
    assert decode_report_luns(data[:16]) == [1]  # the list says 2, only 1 arrived


def test_discover_skips_missing_targets_and_unconnected_luns():
    def execute(target, lun, cdb, n):
        if target == 1:
            return False, b""  # BAD_TARGET
        if cdb[0] == 0xA0:
            return True, report([bytes([0, 0, 0, 0, 0, 0, 0, 0]), bytes([0, 7, 0, 0, 0, 0, 0, 0])])
        if cdb[0] == 0x12:
            qual = 0x7F if lun == 7 else 0x00
            return True, bytes([qual, 0, 6, 2, 91, 0, 0, 2]) + b"VSCSI   " + b"disk".ljust(16)
        if cdb[0] == 0x9E:
            return True, struct.pack(">QI", 2047, 4096) + bytes(20)
        if cdb[0] == 0x1A:
            return True, bytes([3, 0, 0x80, 0])    # WP
        raise AssertionError(cdb)

    units = discover(execute, [0, 1])
    assert [(u.target, u.lun, u.blocks, u.block_size, u.vendor, u.write_protected)
            for u in units] == [(0, 0, 2048, 4096, "VSCSI", True)]
    assert units[0].capacity == 2048 * 4096
