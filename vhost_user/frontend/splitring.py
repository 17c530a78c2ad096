"""A split virtqueue (virtio 1.2, 2.7) written byte by byte in Python, seen from the driver.

The built-in front-end drives back-ends through the C ring (driver_ring.py,
csrc/driver.c), which only ever writes well-formed rings. Tests and fuzz
targets must also write the rings a malicious driver would, so this is the
one Python writer of the split-ring layout: `write_desc` / `write_avail` /
`append_avail` put
any descriptor or avail ring (loops, out-of-range next, nested indirect,
addresses outside memory) into a `GuestRam`, and `SplitRing` builds on them:
it lays a queue out, builds chains (direct, indirect, crossing regions),
publishes them, reads the used ring back, and its `hostile_*` methods build
the malformed rings. Index wrap-around is `SplitRing(..., base=65530)`.
"""
from __future__ import annotations

import struct

from .guestram import GuestRam

__all__ = ["SplitRing", "write_desc", "write_avail", "append_avail", "DESC", "DESC_F_NEXT", "DESC_F_WRITE",
           "DESC_F_INDIRECT", "AVAIL_F_NO_INTERRUPT", "USED_F_NO_NOTIFY"]

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1

#: one descriptor: addr, len, flags, next (little endian, 16 bytes)
DESC = struct.Struct("<QIHH")


def write_desc(ram: GuestRam, table: int, i: int, addr: int, length: int, flags: int = 0,
               next: int = 0) -> None:
    """Descriptor `i` of the table at GPA `table`, whatever its values."""
    ram.write(table + 16 * i, DESC.pack(addr, length, flags, next))


def write_avail(ram: GuestRam, avail: int, flags: int, idx: int, heads=()) -> None:
    """avail->flags, avail->idx and the first len(heads) ring entries."""
    ram.write(avail, struct.pack(f"<HH{len(heads)}H", flags, idx, *heads))


def append_avail(ram: GuestRam, avail: int, num: int, head: int, idx: int | None = None) -> int:
    """Put `head` in the next avail slot after the avail->idx now in memory, then store
    avail->idx + 1 (or `idx`, to make it jump); returns the stored index. Publishes by
    hand behind the back of a ring's owner (the C driver ring), as a malicious driver would."""
    old = ram.u16(avail + 2)
    ram.put_u16(avail + 4 + 2 * (old % num), head)
    new = (old + 1) & 0xFFFF if idx is None else idx & 0xFFFF
    ram.put_u16(avail + 2, new)
    return new


class SplitRing:
    """A split virtqueue laid out in GuestRam, seen from the driver."""

    def __init__(self, ram: GuestRam, num: int, *, base: int = 0, region: int = 0,
                 at: tuple[int, int, int] | None = None) -> None:
        """Rings of `num` entries allocated in `region`, or placed at `at` = (desc, avail, used)
        GPAs; avail->idx and used->idx start at `base`."""
        self.ram = ram
        self.num = num
        if at is None:
            at = (ram.alloc(16 * num, 16, region), ram.alloc(6 + 2 * num, 2, region),
                  ram.alloc(6 + 8 * num, 4, region))
        self.desc, self.avail, self.used = at
        self.avail_idx = base & 0xFFFF
        self.last_used = base & 0xFFFF
        ram.put_u16(self.avail + 2, self.avail_idx)
        ram.put_u16(self.used + 2, self.avail_idx)
        self.free = list(range(num))
        self.chains: dict[int, list[int]] = {}

    # -- addresses -----------------------------------------------------------------
    def addresses(self, gpa: bool = False) -> tuple[int, int, int]:
        """(desc, avail, used) as front-end virtual addresses, or GPAs."""
        if gpa:
            return self.desc, self.avail, self.used
        return self.ram.uva(self.desc), self.ram.uva(self.avail), self.ram.uva(self.used)

    def setup(self, vq, *, gpa: bool = False) -> None:
        """set_num + set_addr + set_base on a back-end Virtqueue."""
        vq.set_num(self.num)
        vq.set_addr(*self.addresses(gpa), gpa=gpa)
        vq.set_base(self.avail_idx)

    # -- descriptors ---------------------------------------------------------------------
    def write_desc(self, i: int, addr: int, length: int, flags: int = 0, next: int = 0,
                   table: int | None = None) -> None:
        write_desc(self.ram, self.desc if table is None else table, i, addr, length, flags, next)

    def read_desc(self, i: int) -> tuple[int, int, int, int]:
        return DESC.unpack(self.ram.read(self.desc + 16 * i, 16))

    def _take(self, n: int) -> list[int]:
        if n > len(self.free):
            raise MemoryError("no free descriptors")
        ids, self.free = self.free[:n], self.free[n:]
        return ids

    def add_chain(self, readable=(), writable=(), *, indirect: bool = False) -> int:
        """Chain of (gpa, len) buffers, readable first; returns the head (not yet published)."""
        bufs = [(a, n, 0) for a, n in readable] + [(a, n, DESC_F_WRITE) for a, n in writable]
        if indirect:
            table = self.ram.alloc(16 * len(bufs), 16)
            for k, (a, n, f) in enumerate(bufs):
                more = DESC_F_NEXT if k + 1 < len(bufs) else 0
                self.write_desc(k, a, n, f | more, k + 1 if more else 0, table=table)
            (head,) = self._take(1)
            self.write_desc(head, table, 16 * len(bufs), DESC_F_INDIRECT)
            self.chains[head] = [head]
            return head
        ids = self._take(len(bufs))
        for k, (a, n, f) in enumerate(bufs):
            more = DESC_F_NEXT if k + 1 < len(bufs) else 0
            self.write_desc(ids[k], a, n, f | more, ids[k + 1] if more else 0)
        self.chains[ids[0]] = ids
        return ids[0]

    def publish(self, *heads: int) -> None:
        """Put heads in the avail ring, then store the new avail->idx."""
        for h in heads:
            self.ram.put_u16(self.avail + 4 + 2 * (self.avail_idx % self.num), h)
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.ram.put_u16(self.avail + 2, self.avail_idx)

    def set_avail_idx(self, v: int) -> None:
        self.avail_idx = v & 0xFFFF
        self.ram.put_u16(self.avail + 2, self.avail_idx)

    # -- used ring / notification fields --------------------------------------------------
    @property
    def used_idx(self) -> int:
        return self.ram.u16(self.used + 2)

    @property
    def used_flags(self) -> int:
        return self.ram.u16(self.used)

    @property
    def avail_event(self) -> int:
        return self.ram.u16(self.used + 4 + 8 * self.num)

    def set_used_event(self, v: int) -> None:
        self.ram.put_u16(self.avail + 4 + 2 * self.num, v)

    def set_avail_flags(self, v: int) -> None:
        self.ram.put_u16(self.avail, v)

    def reap(self) -> list[tuple[int, int]]:
        """New used elements (id, len) since the last call; frees their descriptors."""
        out = []
        idx = self.used_idx
        while self.last_used != idx:
            slot = self.used + 4 + 8 * (self.last_used % self.num)
            uid, ulen = struct.unpack("<II", self.ram.read(slot, 8))
            out.append((uid, ulen))
            self.free += self.chains.pop(uid, [])
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out

    # -- hostile rings -------------------------------------------------------------------------
    def hostile_loop(self, buf: int, length: int = 2) -> int:
        """A direct chain of `length` descriptors whose last points back to the first."""
        ids = self._take(length)
        for k, i in enumerate(ids):
            self.write_desc(i, buf, 16, DESC_F_NEXT, ids[(k + 1) % length])
        return ids[0]

    def hostile_next_out_of_range(self, buf: int) -> int:
        (h,) = self._take(1)
        self.write_desc(h, buf, 16, DESC_F_NEXT, self.num + 3)
        return h

    def hostile_nested_indirect(self, buf: int) -> int:
        inner = self.ram.alloc(16, 16)
        self.write_desc(0, buf, 16, 0, 0, table=inner)
        outer = self.ram.alloc(32, 16)
        self.write_desc(0, buf, 16, DESC_F_NEXT, 1, table=outer)
        self.write_desc(1, inner, 16, DESC_F_INDIRECT, 0, table=outer)
        (h,) = self._take(1)
        self.write_desc(h, outer, 32, DESC_F_INDIRECT)
        return h

    def hostile_indirect_len(self, length: int = 24) -> int:
        table = self.ram.alloc(32, 16)
        (h,) = self._take(1)
        self.write_desc(h, table, length, DESC_F_INDIRECT)
        return h

    def hostile_indirect_loop(self, buf: int) -> int:
        table = self.ram.alloc(32, 16)
        self.write_desc(0, buf, 16, DESC_F_NEXT, 1, table=table)
        self.write_desc(1, buf, 16, DESC_F_NEXT, 0, table=table)
        (h,) = self._take(1)
        self.write_desc(h, table, 32, DESC_F_INDIRECT)
        return h

    def hostile_address(self, addr: int, length: int = 16, flags: int = 0) -> int:
        """One descriptor at an arbitrary address (outside memory, or overflowing)."""
        (h,) = self._take(1)
        self.write_desc(h, addr, length, flags)
        return h

    def hostile_write_before_read(self, buf: int) -> int:
        ids = self._take(2)
        self.write_desc(ids[0], buf, 16, DESC_F_WRITE | DESC_F_NEXT, ids[1])
        self.write_desc(ids[1], buf + 16, 16, 0)
        return ids[0]

    def hostile_avail_jump(self, by: int | None = None) -> None:
        """Move avail->idx more than the queue size past what the device consumed."""
        self.set_avail_idx(self.last_used + (self.num + 1 if by is None else by))
