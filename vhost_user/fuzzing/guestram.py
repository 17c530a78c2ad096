"""Guest RAM for the ring and device fuzz targets: memfd regions with guard pages.

The front-end's guest-RAM model (vhost_user/frontend/guestram.py) with two
regions and a hole between them in guest-physical space; each region's memfd
starts with a guard page (the region's mmap_offset), so the mapping the
back-end makes holds bytes that are mapped but not guest memory. After every
input the target compares the whole of both files against a snapshot taken
before it: only the bytes the device may write (the used ring, and the
writable buffers it was given) may differ. A pointer computed one byte off,
or a write through a stale or overflowing address, shows up here even when it
lands in mapped memory and no sanitizer would notice.
"""
from __future__ import annotations

import mmap
from dataclasses import dataclass

from vhost_user.frontend.guestram import FAKE_UADDR_BASE, GuestRam

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


class FuzzRam(GuestRam):
    """Region 0 at GPA 0, region 1 after a hole; `layout` gives (gpa, size)."""

    def __init__(self, layout=((0, 0x10000), (0x20000, 0x10000))) -> None:
        super().__init__([(gpa, size, FAKE_UADDR_BASE + (i << 32) + gpa, GUARD_SIZE)
                          for i, (gpa, size) in enumerate(layout)])
        self.spans = [RamSpan(r.gpa, r.size, r.uaddr, r.fd, mmap.mmap(r.fd, GUARD_SIZE + r.size))
                      for r in self.regions]
        self.reset()

    def reset(self) -> None:
        """Guard pages to GUARD_BYTE, guest memory to zero."""
        for s in self.spans:
            s.mm[:GUARD_SIZE] = bytes([GUARD_BYTE]) * GUARD_SIZE
            s.mm[GUARD_SIZE:] = bytes(s.size)

    def snapshot(self) -> list[bytes]:
        """Every memfd's bytes, guard page included."""
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
        self.spans = []
        super().close()
