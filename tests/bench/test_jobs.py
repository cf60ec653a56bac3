import pytest
from hypothesis import given
from hypothesis import strategies as st

from vscsi.bench.jobs import SECTOR, Job, JobSpec, make_pattern, parse_size


@pytest.mark.parametrize("text,value", [("4k", 4096), ("64K", 65536), ("1M", 1 << 20),
                                        ("2g", 2 << 30), ("4096", 4096), ("1MiB", 1 << 20)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "k", "-4k", "4x", "1.5M"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_spec_validation():
    with pytest.raises(ValueError, match="rw mode"):
        JobSpec(rw="sideways")
    with pytest.raises(ValueError):
        JobSpec.from_options("read", "4k", "4k-8k", 1, "1M")
    with pytest.raises(ValueError):
        JobSpec.from_options("read", None, "64k-4k", 1, "1M")
    with pytest.raises(ValueError):
        JobSpec(bs_min=1000, bs_max=1000)
    assert JobSpec.from_options("read", None, "4k-64k", 4, "16M").bs_max == 65536


def job(rw, bs=(4096, 4096), size=1 << 20, seed=1):
    return Job(0, JobSpec(rw, bs[0], bs[1], 1, size), target=2, lun=3, cpu=0,
               capacity=1 << 30, block_size=512, seed=seed)


def test_sequential_job_walks_and_wraps():
    j = job("read", size=16384)
    offs = [j.next_io()[1] for _ in range(6)]
    assert offs == [0, 4096, 8192, 12288, 0, 4096]


@given(st.sampled_from(["randread", "randwrite", "randrw", "read", "write"]), st.integers(0, 99))
def test_ios_stay_in_region_and_aligned(rw, seed):
    j = job(rw, bs=(4096, 65536), seed=seed)
    for _ in range(50):
        write, off, n = j.next_io()
        assert 4096 <= n <= 65536 and n % 4096 == 0
        assert off % 512 == 0 and off + n <= j.region
        assert write == (rw in ("write", "randwrite")) or rw == "randrw"


def test_same_seed_same_ios():
    a, b = job("randrw", seed=7), job("randrw", seed=7)
    assert [a.next_io() for _ in range(20)] == [b.next_io() for _ in range(20)]


def test_pattern_names_sector_target_and_lun():
    p = make_pattern(2, 3, 9, offset=1024, nbytes=2 * SECTOR)
    assert len(p) == 1024
    assert p[:SECTOR] != p[SECTOR:]  # sector numbers differ
    assert make_pattern(2, 3, 9, 1024, SECTOR) == p[:SECTOR]
    assert make_pattern(2, 4, 9, 1024, SECTOR) != p[:SECTOR]  # another LUN
    assert make_pattern(2, 3, 9, 1536, SECTOR) == p[SECTOR:]


def test_prefill_covers_region():
    j = job("randread", size=3 << 20)
    ios = j.prefill_ios(1 << 20)
    assert sum(n for _, n in ios) == j.region and ios[0][0] == 0
