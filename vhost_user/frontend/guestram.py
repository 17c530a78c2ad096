"""Guest RAM as memfd regions: the one model the front-end, tests and fuzzing share.

A region is a memfd (or a slice of one shared memfd, crosvm's layout) mapped
here, at a guest-physical address (GPA) and a synthetic front-end virtual
address (`uaddr`), starting `offset` bytes into its fd (SET_MEM_TABLE's
mmap_offset). `memory_regions()` / `table()` hand the regions out the way a
back-end receives them, and `memory()` builds the back-end's `GuestMemory`
from fresh fd duplicates exactly as the session does.

Front-end virtual addresses are synthetic: each region gets a distinct fake
`userspace_addr`, which is all the protocol needs (the back-end only uses
them to translate ring addresses), and it catches back-ends that confuse
guest-physical with front-end addresses.

Subclasses add what their users check on top: tests/ringlayout.py guard
bytes inside guest memory, vhost_user/fuzzing/guestram.py guard pages in
front of each region (the bytes at file offsets below `offset`).
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass

from vhost_user.channel import close_fds

__all__ = ["GuestRam", "RamRegion", "FAKE_UADDR_BASE"]

FAKE_UADDR_BASE = 0x7F00_0000_0000
_PAGE = 4096


@dataclass
class RamRegion:
    gpa: int
    size: int
    fd: int
    mem: mmap.mmap       # the region's bytes only (file offset `offset`)
    uaddr: int
    offset: int = 0      # where the region starts in its fd (mmap_offset)

    @property
    def mmap_offset(self) -> int:
        return self.offset

    def contains(self, gpa: int, length: int = 1) -> bool:
        return self.gpa <= gpa and gpa + length <= self.gpa + self.size


class GuestRam:
    """Guest memory as memfd regions, with a bump allocator for rings and buffers."""

    default_align = 64

    def __init__(self, layout=None, *, single_fd: bool = False, alloc_region: int = 0):
        """`layout` lists (gpa, size[, uaddr[, offset]]); default one 64 MiB region at GPA 0.

        With `single_fd` every region lives in one memfd, one after the other
        (crosvm's guest memory); else each region has its own memfd, holding
        the region at `offset` (default 0; QEMU's memory backends). A missing
        uaddr is a fake one, distinct per region. `alloc_region` is the
        region `alloc` uses unless told otherwise.
        """
        self.regions: list[RamRegion] = []
        layout = list(layout or [(0, 64 << 20)])
        if any(spec[1] % _PAGE or spec[0] % _PAGE or (len(spec) > 3 and spec[3] % _PAGE) for spec in layout):
            raise ValueError("regions must be page aligned")
        if not 0 <= alloc_region < len(layout):
            raise ValueError(f"alloc_region {alloc_region} is not one of {len(layout)} regions")
        if single_fd and any(len(spec) > 3 for spec in layout):
            raise ValueError("single_fd places the regions itself: give no offsets")
        shared = -1
        if single_fd:
            shared = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
            os.ftruncate(shared, sum(spec[1] for spec in layout))
        start = 0
        for i, spec in enumerate(layout):
            gpa, size = spec[0], spec[1]
            uaddr = spec[2] if len(spec) > 2 else self._default_uaddr(i, gpa)
            if single_fd:
                fd, offset = shared, start
            else:
                offset = spec[3] if len(spec) > 3 else 0
                fd = os.memfd_create(f"guest-ram-{i}", os.MFD_CLOEXEC)
                os.ftruncate(fd, offset + size)
            mem = mmap.mmap(fd, size, mmap.MAP_SHARED, offset=offset)
            self.regions.append(RamRegion(gpa, size, fd, mem, uaddr, offset))
            start += size
        self.alloc_region = alloc_region
        self._next = {id(r): 0 for r in self.regions}

    @staticmethod
    def _default_uaddr(i: int, gpa: int) -> int:
        return FAKE_UADDR_BASE + (i << 40) + gpa

    # -- addresses ----------------------------------------------------------------
    def region_of(self, gpa: int, length: int = 1) -> RamRegion:
        for r in self.regions:
            if r.contains(gpa, length):
                return r
        raise ValueError(f"GPA range {gpa:#x}+{length} is not inside one RAM region")

    def uaddr(self, gpa: int) -> int:
        r = self.region_of(gpa)
        return r.uaddr + gpa - r.gpa

    uva = uaddr

    # -- allocation -----------------------------------------------------------------
    def alloc(self, size: int, align: int | None = None, region: int | None = None) -> int:
        """Allocate `size` bytes in region `region` (default `alloc_region`); returns the GPA."""
        align = align or self.default_align
        r = self.regions[self.alloc_region if region is None else region]
        off = -(-self._next[id(r)] // align) * align
        if off + size > r.size:
            raise MemoryError(f"guest RAM region {region} exhausted")
        self._next[id(r)] = off + size
        return r.gpa + off

    # -- byte access (a range may run on into an adjacent region) ------------------
    def _pieces(self, gpa: int, length: int) -> list[tuple[RamRegion, int, int]]:
        """(region, offset, n) covering the range; ValueError before any access if it leaves RAM."""
        out, pos = [], 0
        while pos < length:
            r = self.region_of(gpa + pos)
            off = gpa + pos - r.gpa
            n = min(length - pos, r.size - off)
            out.append((r, off, n))
            pos += n
        return out

    def read(self, gpa: int, length: int) -> bytes:
        return b"".join(r.mem[off:off + n] for r, off, n in self._pieces(gpa, length))

    def write(self, gpa: int, data: bytes) -> None:
        pos = 0
        for r, off, n in self._pieces(gpa, len(data)):
            r.mem[off:off + n] = data[pos:pos + n]
            pos += n

    def u16(self, gpa: int) -> int:
        return struct.unpack("<H", self.read(gpa, 2))[0]

    def put_u16(self, gpa: int, v: int) -> None:
        self.write(gpa, struct.pack("<H", v & 0xFFFF))

    def snapshot(self) -> list[bytes]:
        """Every region's bytes (compare after a run to see what was written)."""
        return [bytes(r.mem) for r in self.regions]

    # -- what the back-end gets ---------------------------------------------------
    def memory_regions(self):
        from vhost_user.protocol import MemoryRegion

        return [MemoryRegion(r.gpa, r.size, r.uaddr, r.offset) for r in self.regions]

    def table(self) -> tuple[list[int], list[tuple[int, int, int, int]]]:
        """(fds, regions) as SET_MEM_TABLE delivers them; the fds are new dups."""
        fds = [os.dup(r.fd) for r in self.regions]
        return fds, [(r.gpa, r.size, r.uaddr, r.offset) for r in self.regions]

    def memory(self):
        """The back-end's `GuestMemory` over this RAM (it closes its fd dups)."""
        from vhost_user.memory import GuestMemory

        return GuestMemory.from_table(*self.table())

    def close(self) -> None:
        for r in self.regions:
            r.mem.close()
        close_fds(sorted({r.fd for r in self.regions}))
        self.regions = []
