"""GuestMemory: mapping, validation, translation, lifetime."""
from __future__ import annotations

import os

import pytest

from ringlayout import GuestRam
from vhost_user.errors import GuestMemoryError
from vhost_user.memory import GuestMemory

MB = 1 << 20


def memfd(size: int) -> int:
    fd = os.memfd_create("t", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def test_translate_splits_at_region_ends():
    ram = GuestRam([(0, MB), (MB, MB), (4 * MB, MB)])
    with ram.memory() as mem:
        assert mem.translate(MB - 10, 30) == [(0, MB - 10, 10), (1, 0, 20)]
        assert mem.translate(4 * MB + 5, 5) == [(2, 5, 5)]
        assert mem.translate(0, 0) == []
    ram.close()


def test_translate_gap_raises():
    ram = GuestRam([(0, MB), (4 * MB, MB)])
    with ram.memory() as mem:
        with pytest.raises(GuestMemoryError, match="outside every region"):
            mem.translate(MB - 4, 8)
        with pytest.raises(GuestMemoryError):
            mem.translate(8 * MB, 1)
    ram.close()


def test_translate_overflow_raises():
    ram = GuestRam([(0, MB)])
    with ram.memory() as mem:
        with pytest.raises(GuestMemoryError, match="overflow"):
            mem.translate((1 << 64) - 8, 16)
    ram.close()


def test_read_write_cross_regions_and_mmap_offset():
    ram = GuestRam([(0, MB, 0x10000000, 4096), (MB, MB, 0x20000000, 8192)])
    with ram.memory() as mem:
        mem.write(MB - 3, b"abcdef")
        assert mem.read(MB - 3, 6) == b"abcdef"
        assert ram.read(MB - 3, 6) == b"abcdef"
        assert mem.uva_to_gpa(0x20000010) == MB + 0x10
        with pytest.raises(GuestMemoryError):
            mem.uva_to_gpa(0x30000000)
        r = mem.regions[1]
        assert (r.gpa, r.size, r.uaddr, r.mmap_offset) == (MB, MB, 0x20000000, 8192)
    ram.close()


def test_with_region_closes_fd_and_keeps_mapping(fd_check):
    fd = memfd(MB)
    os.pwrite(fd, b"xyz", 100)
    mem = GuestMemory.empty().with_region(fd, 0, MB, 0x1000_0000, 0)
    assert not fd_is_open(fd)
    assert mem.read(100, 3) == b"xyz"
    mem.close()


@pytest.mark.parametrize("gpa,uaddr", [(MB // 2, 0x9000_0000), (5 * MB, 0x1000_0000 + 4096)])
def test_with_region_overlap_rejected(gpa, uaddr, fd_check):
    mem = GuestMemory.empty().with_region(memfd(MB), 0, MB, 0x1000_0000, 0)
    fd = memfd(MB)
    with pytest.raises(GuestMemoryError, match="overlaps"):
        mem.with_region(fd, gpa, MB, uaddr, 0)
    assert not fd_is_open(fd)
    mem.close()


def test_with_region_zero_size_rejected(fd_check):
    fd = memfd(MB)
    with pytest.raises(GuestMemoryError, match="zero size"):
        GuestMemory.empty().with_region(fd, 0, 0, 0, 0)
    assert not fd_is_open(fd)


def test_with_region_larger_than_fd_rejected(fd_check):
    fd = memfd(MB)
    with pytest.raises(GuestMemoryError, match="only"):
        GuestMemory.empty().with_region(fd, 0, MB, 0, 4096)
    assert not fd_is_open(fd)


def test_with_region_more_than_32_rejected(fd_check):
    mem = GuestMemory.empty()
    tables = []
    for i in range(32):
        mem = mem.with_region(memfd(4096), i * MB, 4096, 0x1000_0000 + i * MB, 0)
        tables.append(mem)
    fd = memfd(4096)
    with pytest.raises(GuestMemoryError, match="slot"):
        mem.with_region(fd, 64 * MB, 4096, 0x9000_0000, 0)
    assert not fd_is_open(fd)
    for t in tables:
        t.close()


def test_without_region_removes_exact_match(fd_check):
    a = GuestMemory.empty().with_region(memfd(MB), 0, MB, 0x1000_0000, 0)
    b = a.with_region(memfd(MB), MB, MB, 0x2000_0000, 0)
    b.write(MB, b"keep")
    c = b.without_region(0, MB, 0x1000_0000)
    assert [r.gpa for r in c.regions] == [MB]
    with pytest.raises(GuestMemoryError):
        c.without_region(0, MB, 0x1000_0000)
    a.close()
    b.close()
    # the shared mapping survives until its last table closes
    assert c.read(MB, 4) == b"keep"
    c.close()


def test_from_table_closes_all_fds_on_error(fd_check):
    fds = [memfd(MB), memfd(MB)]
    with pytest.raises(GuestMemoryError, match="overlaps"):
        GuestMemory.from_table(fds, [(0, MB, 0, 0), (0, MB, 0x1000_0000, 0)])
    assert not any(fd_is_open(fd) for fd in fds)


def test_close_is_deferred_while_acquired(fd_check):
    ram = GuestRam([(0, MB)])
    mem = ram.memory()
    mem.acquire()
    mem.close()
    assert not mem.closed
    assert mem.read(0, 4) == bytes(4)
    mem.release()
    assert mem.closed
    with pytest.raises(GuestMemoryError, match="closed"):
        mem.acquire()
    ram.close()


def test_region_bounds_checked():
    ram = GuestRam([(0, MB)])
    with ram.memory() as mem:
        with pytest.raises(GuestMemoryError):
            mem.regions[0].read(MB - 2, 4)
    ram.close()
