"""Guest RAM for the ring and blk fuzz targets: memfd regions with guard bytes.

Two regions with a hole between them in guest-physical space; each region's
memfd starts with a guard page (the region's mmap_offset), so the mapping the
back-end makes holds bytes that are mapped but not guest memory. After every
input the target compares the whole of both files against a snapshot taken
before it: only the bytes the device may write (the used ring, and the
writable buffers it was given) may differ. A pointer computed one byte off,
or a write through a stale or overflowing address, shows up here even when it
lands in mapped memory and no sanitizer would notice.
"""
from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

from vhost_user.memory import GuestMemory

__all__ = ["FuzzRam", "RamSpan", "GUARD_BYTE", "GUARD_SIZE"]

GUARD_BYTE = 0xA5
GUARD_SIZE = 4096


@dataclass
class RamSpan:
    gpa: int
    size: int
    uaddr: int
    fd: int
    mm: mmap.mmap  # the whole memfd: guard page, then the region


class FuzzRam:
    """Region 0 at GPA 0, region 1 after a hole; `layout` gives (gpa, size)."""

    def __init__(self, layout=((0, 0x10000), (0x20000, 0x10000))) -> None:
        self.spans: list[RamSpan] = []
        for i, (gpa, size) in enumerate(layout):
            fd = os.memfd_create(f"fuzz-ram-{i}", os.MFD_CLOEXEC)
            os.ftruncate(fd, GUARD_SIZE + size)
            mm = mmap.mmap(fd, GUARD_SIZE + size)
            self.spans.append(RamSpan(gpa, size, 0x7F00_0000_0000 + (i << 32) + gpa, fd, mm))
        self.reset()

    def reset(self) -> None:
        """Guard pages to GUARD_BYTE, guest memory to zero."""
        for s in self.spans:
            s.mm[:GUARD_SIZE] = bytes([GUARD_BYTE]) * GUARD_SIZE
            s.mm[GUARD_SIZE:] = bytes(s.size)

    def memory(self) -> GuestMemory:
        """What the back-end builds from SET_MEM_TABLE (fresh fd dups, closed by it)."""
        fds = [os.dup(s.fd) for s in self.spans]
        return GuestMemory.from_table(fds, [(s.gpa, s.size, s.uaddr, GUARD_SIZE) for s in self.spans])

    def _find(self, gpa: int) -> tuple[RamSpan, int]:
        for s in self.spans:
            if s.gpa <= gpa < s.gpa + s.size:
                return s, gpa - s.gpa
        raise ValueError(f"gpa {gpa:#x} is not fuzz RAM")

    def write(self, gpa: int, data: bytes) -> None:
        s, off = self._find(gpa)
        if off + len(data) > s.size:
            raise ValueError("write crosses the region end")
        s.mm[GUARD_SIZE + off:GUARD_SIZE + off + len(data)] = data

    def read(self, gpa: int, n: int) -> bytes:
        s, off = self._find(gpa)
        return s.mm[GUARD_SIZE + off:GUARD_SIZE + off + n]

    def uaddr(self, gpa: int) -> int:
        s, off = self._find(gpa)
        return s.uaddr + off

    def snapshot(self) -> list[bytes]:
        return [bytes(s.mm) for s in self.spans]

    def check_writes(self, before: list[bytes], allowed: list[tuple[int, int, int]]) -> None:
        """Assert that only `allowed` (region index, offset, length) spans changed."""
        for i, s in enumerate(self.spans):
            now = bytes(s.mm)
            if now == before[i]:
                continue
            expected = bytearray(before[i])
            for region, off, n in allowed:
                if region == i:
                    lo = GUARD_SIZE + off
                    expected[lo:lo + n] = now[lo:lo + n]
            if bytes(expected) != now:
                bad = next(k for k in range(len(now)) if now[k] != expected[k])
                where = "guard page" if bad < GUARD_SIZE else f"region offset {bad - GUARD_SIZE:#x}"
                raise AssertionError(f"region {i}: unexpected write at {where}")

    def close(self) -> None:
        for s in self.spans:
            s.mm.close()
            os.close(s.fd)
        self.spans = []
