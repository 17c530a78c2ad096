"""Driver-side split-ring layout for tests (no sockets, no C).

`GuestRam` is guest memory made of memfd regions at chosen guest physical
addresses (GPA) and front-end virtual addresses (uaddr), with gaps if
wanted.  `GuestRam.table()` hands out fresh fds plus region tuples, exactly
what a back-end receives with SET_MEM_TABLE, so a test builds its
`GuestMemory` the same way the session does.

`SplitRing` lays out a split virtqueue (virtio 1.2, 2.7) in that memory,
builds chains (direct, indirect, crossing regions), publishes them and
reads the used ring back.  Its `hostile_*` methods build the rings a
malicious driver would: loops, out-of-range next, nested indirect, bad
indirect length, addresses outside memory or overflowing, readable after
writable, and avail index jumps.  Index wrap-around is `SplitRing(...,
base=65530)`.
"""
from __future__ import annotations

import mmap
import os
import struct
import time
from dataclasses import dataclass, field

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1
GUARD = 0xA5

_DESC = struct.Struct("<QIHH")


@dataclass
class RamRegion:
    gpa: int
    size: int
    uaddr: int
    mmap_offset: int
    fd: int
    mm: mmap.mmap
    next_free: int = 0

    def contains(self, gpa: int) -> bool:
        return self.gpa <= gpa < self.gpa + self.size


@dataclass
class GuestRam:
    """Guest memory: memfd regions given as (gpa, size[, uaddr[, mmap_offset]])."""

    layout: list = field(default_factory=lambda: [(0, 1 << 20)])
    regions: list[RamRegion] = field(init=False, default_factory=list)
    guards: list[tuple[int, int]] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        for i, spec in enumerate(self.layout):
            gpa, size = spec[0], spec[1]
            uaddr = spec[2] if len(spec) > 2 else 0x7F00_0000_0000 + gpa + i * 0x1000_0000
            off = spec[3] if len(spec) > 3 else 0
            fd = os.memfd_create(f"guest-ram-{i}", os.MFD_CLOEXEC)
            os.ftruncate(fd, off + size)
            mm = mmap.mmap(fd, off + size)
            self.regions.append(RamRegion(gpa, size, uaddr, off, fd, mm))

    # -- what the back-end gets --------------------------------------------------
    def table(self) -> tuple[list[int], list[tuple[int, int, int, int]]]:
        """(fds, regions) as SET_MEM_TABLE delivers them; the fds are new dups."""
        fds = [os.dup(r.fd) for r in self.regions]
        return fds, [(r.gpa, r.size, r.uaddr, r.mmap_offset) for r in self.regions]

    def memory(self):
        from vhost_user.memory import GuestMemory

        return GuestMemory.from_table(*self.table())

    # -- byte access ----------------------------------------------------------------
    def _find(self, gpa: int) -> RamRegion:
        for r in self.regions:
            if r.contains(gpa):
                return r
        raise ValueError(f"gpa {gpa:#x} not in test RAM")

    def write(self, gpa: int, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            r = self._find(gpa + pos)
            off = gpa + pos - r.gpa
            n = min(len(data) - pos, r.size - off)
            r.mm[r.mmap_offset + off:r.mmap_offset + off + n] = data[pos:pos + n]
            pos += n

    def read(self, gpa: int, length: int) -> bytes:
        out = bytearray()
        while len(out) < length:
            r = self._find(gpa + len(out))
            off = gpa + len(out) - r.gpa
            n = min(length - len(out), r.size - off)
            out += r.mm[r.mmap_offset + off:r.mmap_offset + off + n]
        return bytes(out)

    def u16(self, gpa: int) -> int:
        return struct.unpack("<H", self.read(gpa, 2))[0]

    def put_u16(self, gpa: int, v: int) -> None:
        self.write(gpa, struct.pack("<H", v & 0xFFFF))

    def uva(self, gpa: int) -> int:
        r = self._find(gpa)
        return r.uaddr + (gpa - r.gpa)

    def snapshot(self) -> list[bytes]:
        return [bytes(r.mm[:]) for r in self.regions]

    # -- allocation ------------------------------------------------------------------
    def alloc(self, n: int, align: int = 16, region: int = 0) -> int:
        """A fresh, zeroed GPA range of n bytes inside one region."""
        r = self.regions[region]
        start = (r.next_free + align - 1) // align * align
        if start + n > r.size:
            raise MemoryError("test RAM region full")
        r.next_free = start + n
        self.write(r.gpa + start, bytes(n))
        return r.gpa + start

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

    def close(self) -> None:
        for r in self.regions:
            r.mm.close()
            os.close(r.fd)
        self.regions = []


class SplitRing:
    """A split virtqueue laid out in GuestRam, seen from the driver."""

    def __init__(self, ram: GuestRam, num: int, *, base: int = 0, region: int = 0) -> None:
        self.ram = ram
        self.num = num
        self.desc = ram.alloc(16 * num, 16, region)
        self.avail = ram.alloc(6 + 2 * num, 2, region)
        self.used = ram.alloc(6 + 8 * num, 4, region)
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
        base = self.desc if table is None else table
        self.ram.write(base + 16 * i, _DESC.pack(addr, length, flags, next))

    def read_desc(self, i: int) -> tuple[int, int, int, int]:
        return _DESC.unpack(self.ram.read(self.desc + 16 * i, 16))

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
