"""Driver-side split-ring layout for tests (no sockets, no C).

`GuestRam` is the front-end's guest-RAM model (vhost_user/frontend/guestram.py)
with the defaults tests want (one 1 MiB region, 16-byte alignment) and guard
bytes around buffers: regions at chosen guest physical addresses (GPA) and
front-end virtual addresses (uaddr), with gaps if wanted; `table()` hands
out fresh fds plus region tuples, exactly what a back-end receives with
SET_MEM_TABLE, so a test builds its `GuestMemory` the same way the session
does.

`SplitRing` (vhost_user/frontend/splitring.py) lays out a split virtqueue in
that memory, well-formed or hostile (its `hostile_*` methods).
"""
from __future__ import annotations

import os
import time

from vhost_user.frontend.guestram import FAKE_UADDR_BASE, GuestRam as _GuestRam
from vhost_user.frontend.splitring import (  # noqa: F401  (re-exported for the tests)
    AVAIL_F_NO_INTERRUPT, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, USED_F_NO_NOTIFY, SplitRing,
)

GUARD = 0xA5


class GuestRam(_GuestRam):
    """Guest memory: memfd regions given as (gpa, size[, uaddr[, mmap_offset]])."""

    default_align = 16

    def __init__(self, layout=((0, 1 << 20),)) -> None:
        super().__init__(list(layout))
        self.guards: list[tuple[int, int]] = []

    @staticmethod
    def _default_uaddr(i: int, gpa: int) -> int:
        return FAKE_UADDR_BASE + gpa + i * 0x1000_0000

    def alloc(self, n: int, align: int = 16, region: int = 0) -> int:
        """A fresh, zeroed GPA range of n bytes inside one region."""
        gpa = super().alloc(n, align, region)
        self.write(gpa, bytes(n))
        return gpa

    def alloc_guarded(self, n: int, guard: int = 32, region: int = 0) -> int:
        """n bytes surrounded by guard bytes that check_guards() verifies."""
        base = self.alloc(n + 2 * guard, 16, region)
        self.write(base, bytes([GUARD]) * guard)
        self.write(base + guard + n, bytes([GUARD]) * guard)
        self.guards += [(base, guard), (base + guard + n, guard)]
        return base + guard

    def check_guards(self) -> None:
        for gpa, n in self.guards:
            got = self.read(gpa, n)
            assert got == bytes([GUARD]) * n, f"guard bytes at {gpa:#x} were overwritten"


# -- small test utilities ---------------------------------------------------------------

def count_events(fd: int) -> int:
    """Read (and reset) an eventfd counter; 0 if nothing was written."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def wait_for(pred, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError("timed out waiting for the worker")
        time.sleep(0.001)
