"""A packed virtqueue (virtio 1.2, 2.8) written byte by byte in Python, seen from the driver.

The packed twin of `splitring.py`: tests and fuzz targets use it to put well
formed and malicious packed rings into a `GuestRam`. One ring of 16-byte
descriptors {addr, len, id, flags} carries both directions; the driver makes
a chain available by filling consecutive slots and writing the first
descriptor's flags last (AVAIL = its wrap counter, USED = the inverse), and
reads completions back from its own used position (AVAIL = USED = the used
wrap counter). Both counters start at 1 and flip whenever a position passes
the end of the ring. The driver and device event suppression areas are 4
bytes each ({off_wrap, flags}).

`base()` is the 32-bit SET_VRING_BASE value of vhost-user for packed rings:
bits 0-14 the next avail slot, 15 its wrap counter, 16-30 the used slot, 31
its wrap counter.

`add_chain` is the well-formed writer (it refuses a chain the ring has no
room for, 2.8 "Scatter-Gather Support"); `put_chain` writes any descriptors
under any id, and the `hostile_*` methods use it to break one driver rule
of 2.8 each. An indirect table outside memory is
`hostile_address(addr, 16, DESC_F_INDIRECT)`, a zero-length one
`hostile_indirect_len(0)`, an overflowing element `hostile_address(2**64 - 8, 16)`.
"""
from __future__ import annotations

import struct

from .guestram import GuestRam

__all__ = ["PackedRing", "PDESC", "avail_bits", "DESC_F_NEXT", "DESC_F_WRITE", "DESC_F_INDIRECT", "DESC_F_AVAIL",
           "DESC_F_USED", "EVENT_ENABLE", "EVENT_DISABLE", "EVENT_DESC"]

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
DESC_F_AVAIL = 1 << 7
DESC_F_USED = 1 << 15
EVENT_ENABLE = 0
EVENT_DISABLE = 1
EVENT_DESC = 2

#: one packed descriptor: addr, len, id, flags (little endian, 16 bytes)
PDESC = struct.Struct("<QIHH")


def avail_bits(wrap: int) -> int:
    """The AVAIL/USED bits that make a descriptor available under driver wrap counter `wrap`."""
    return DESC_F_AVAIL if wrap else DESC_F_USED


class PackedRing:
    """A packed virtqueue laid out in GuestRam, seen from the driver."""

    def __init__(self, ram: GuestRam, num: int, *, region: int = 0,
                 at: tuple[int, int, int] | None = None) -> None:
        """A ring of `num` (1..32768) descriptors allocated in `region`, or placed at
        `at` = (desc, driver area, device area) GPAs."""
        if not 0 < num <= 32768:
            raise ValueError("a packed ring has 1..32768 descriptors")
        self.ram = ram
        self.num = num
        if at is None:
            at = (ram.alloc(16 * num, 16, region), ram.alloc(4, 4, region), ram.alloc(4, 4, region))
        self.desc, self.driver, self.device = at
        self.avail_slot, self.avail_wrap = 0, 1
        self.used_slot, self.used_wrap = 0, 1
        self.free = list(range(num))
        self.ndesc: dict[int, int] = {}      # buffer id -> ring descriptors of its chain
        self._pending: dict[int, tuple[int, int]] = {}   # id -> (slot, flags) not yet published

    # -- addresses -----------------------------------------------------------------
    def addresses(self, gpa: bool = False) -> tuple[int, int, int]:
        """(desc, driver area, device area) as front-end virtual addresses, or GPAs."""
        if gpa:
            return self.desc, self.driver, self.device
        return self.ram.uva(self.desc), self.ram.uva(self.driver), self.ram.uva(self.device)

    def base(self) -> int:
        return (self.avail_slot | self.avail_wrap << 15 | self.used_slot << 16
                | self.used_wrap << 31)

    def setup(self, vq, *, gpa: bool = False) -> None:
        """set_packed + set_num + set_addr + set_base on a back-end Virtqueue."""
        vq.set_packed(True)
        vq.set_num(self.num)
        vq.set_addr(*self.addresses(gpa), gpa=gpa)
        vq.set_base(self.base())

    # -- descriptors ---------------------------------------------------------------------
    def write_desc(self, slot: int, addr: int, length: int, id: int, flags: int,
                   table: int | None = None) -> None:
        """Descriptor `slot` of the ring (or of an indirect table), whatever its values."""
        self.ram.write((self.desc if table is None else table) + 16 * slot,
                       PDESC.pack(addr, length, id, flags))

    def read_desc(self, slot: int) -> tuple[int, int, int, int]:
        return PDESC.unpack(self.ram.read(self.desc + 16 * slot, 16))

    def _take_id(self, id: int | None) -> int:
        if id is not None:
            if id in self.free:
                self.free.remove(id)
            return id
        if not self.free:
            raise MemoryError("no free buffer ids")
        return self.free.pop(0)

    def put_chain(self, descs, id: int | None = None, *, publish: bool = True) -> int:
        """Write `descs` = [(addr, len, flags without AVAIL/USED)] into consecutive slots
        from the next avail slot, each with buffer `id` (default: the next free one); returns
        the id. Raw: no room check, and `id` may be anything (the hostile builders use that)."""
        if not descs:
            raise ValueError("a chain has at least one descriptor")
        id = self._take_id(id)
        first = None
        for addr, length, flags in descs:
            flags |= avail_bits(self.avail_wrap)
            if first is None:   # its flags are written last, by publish(); until then
                first = (self.avail_slot, flags)   # they read as "not available"
                self.write_desc(self.avail_slot, addr, length, id, avail_bits(not self.avail_wrap))
            else:
                self.write_desc(self.avail_slot, addr, length, id, flags)
            self.avail_slot += 1
            if self.avail_slot == self.num:
                self.avail_slot, self.avail_wrap = 0, self.avail_wrap ^ 1
        self.ndesc[id] = len(descs)
        self._pending[id] = first
        if publish:
            self.publish(id)
        return id

    def publish(self, *ids: int) -> None:
        """Write the first descriptor's flags of each chain: the device may take it now."""
        for id in ids:
            slot, flags = self._pending.pop(id)
            self.ram.put_u16(self.desc + 16 * slot + 14, flags)

    def add_chain(self, readable=(), writable=(), *, indirect: bool = False,
                  publish: bool = True) -> int:
        """Chain of (gpa, len) buffers, readable first; returns its buffer id."""
        bufs = [(a, n, 0) for a, n in readable] + [(a, n, DESC_F_WRITE) for a, n in writable]
        if not bufs:
            raise ValueError("a chain has at least one buffer")
        if not self.free:
            raise MemoryError("no free buffer ids")
        if self.in_flight + (1 if indirect else len(bufs)) > self.num:
            raise MemoryError("no room in the ring for the chain")   # 2.8: driver must check
        if indirect:
            table = self.ram.alloc(16 * len(bufs), 16)
            for k, (a, n, f) in enumerate(bufs):
                self.write_desc(k, a, n, 0, f, table=table)
            return self.put_chain([(table, 16 * len(bufs), DESC_F_INDIRECT)], publish=publish)
        flags = [f | (DESC_F_NEXT if k + 1 < len(bufs) else 0) for k, (_, _, f) in enumerate(bufs)]
        return self.put_chain([(a, n, fl) for (a, n, _), fl in zip(bufs, flags)], publish=publish)

    @property
    def in_flight(self) -> int:
        """Ring slots held by chains the device has not used yet (published or not)."""
        return sum(self.ndesc.values())

    # -- used descriptors / event areas ------------------------------------------------------
    def reap(self) -> list[tuple[int, int]]:
        """New used descriptors (id, len); frees their ids and skips their chains' slots."""
        out = []
        while True:
            _, length, id, flags = self.read_desc(self.used_slot)
            avail, used = bool(flags & DESC_F_AVAIL), bool(flags & DESC_F_USED)
            if not (avail == used == bool(self.used_wrap)):
                return out
            if id not in self.ndesc:
                raise AssertionError(f"used descriptor with id {id}, which is not in flight")
            out.append((id, length))
            self.used_slot += self.ndesc.pop(id)
            if self.used_slot >= self.num:
                self.used_slot, self.used_wrap = self.used_slot - self.num, self.used_wrap ^ 1
            self.free.append(id)

    def set_driver_event(self, flags: int, off: int = 0, wrap: int = 1) -> None:
        """The driver area: ENABLE / DISABLE / DESC (at slot `off` under wrap counter `wrap`)."""
        if not 0 <= off < 1 << 15 or wrap not in (0, 1):
            raise ValueError("off is 15 bits and wrap one bit")
        self.ram.write(self.driver, struct.pack("<HH", off | wrap << 15, flags))

    @property
    def device_event_flags(self) -> int:
        return self.ram.u16(self.device + 2)

    # -- hostile rings -------------------------------------------------------------------------
    def hostile_id_out_of_range(self, buf: int) -> int:
        return self.put_chain([(buf, 16, 0)], id=self.num + 5)

    def hostile_duplicate_id(self, buf: int) -> int:
        """A second chain under the id of one still in flight."""
        id = self.put_chain([(buf, 16, 0)])
        self.put_chain([(buf, 16, 0)], id=id)
        return id

    def hostile_endless_chain(self, buf: int) -> int:
        """NEXT on every descriptor of the ring: the chain never ends."""
        return self.put_chain([(buf, 16, DESC_F_NEXT)] * self.num, id=0)

    def hostile_nested_indirect(self, buf: int) -> int:
        inner = self.ram.alloc(16, 16)
        self.write_desc(0, buf, 16, 0, 0, table=inner)
        outer = self.ram.alloc(16, 16)
        self.write_desc(0, inner, 16, 0, DESC_F_INDIRECT, table=outer)
        return self.put_chain([(outer, 16, DESC_F_INDIRECT)])

    def hostile_indirect_len(self, length: int = 24) -> int:
        return self.put_chain([(self.ram.alloc(32, 16), length, DESC_F_INDIRECT)])

    def hostile_indirect_with_next(self, buf: int) -> int:
        table = self.ram.alloc(16, 16)
        self.write_desc(0, buf, 16, 0, 0, table=table)
        return self.put_chain([(table, 16, DESC_F_INDIRECT | DESC_F_NEXT), (buf, 16, 0)])

    def hostile_address(self, addr: int, length: int = 16, flags: int = 0) -> int:
        return self.put_chain([(addr, length, flags)])

    def hostile_order(self, buf: int) -> int:
        """A readable descriptor after a writable one."""
        return self.put_chain([(buf, 16, DESC_F_WRITE | DESC_F_NEXT), (buf + 16, 16, 0)])

    def hostile_indirect_after_direct(self, buf: int) -> int:
        """A direct descriptor whose NEXT leads to an INDIRECT one (2.8: an indirect
        descriptor must not be part of a NEXT-linked list)."""
        table = self.ram.alloc(16, 16)
        self.write_desc(0, buf, 16, 0, 0, table=table)
        return self.put_chain([(buf, 16, DESC_F_NEXT), (table, 16, DESC_F_INDIRECT)])

    def hostile_id_in_last(self, buf: int) -> int:
        """A valid, free id on the first descriptor but an out-of-range one on the last:
        2.8 puts the buffer id in the last descriptor, so the chain's id is the bad one."""
        id = self.put_chain([(buf, 16, DESC_F_NEXT), (buf + 16, 16, 0)], publish=False)
        last = (self.avail_slot - 1) % self.num
        self.ram.put_u16(self.desc + 16 * last + 12, self.num + 5)
        self.publish(id)
        return id

    def reserved_indirect_flags(self, buf: int) -> int:
        """Not an error: an indirect table whose entries carry NEXT and junk ids, which
        2.8 reserves and the device must ignore (entries are sequential, len / 16 of them)."""
        table = self.ram.alloc(32, 16)
        self.write_desc(0, buf, 16, 0xBEEF, DESC_F_NEXT, table=table)
        self.write_desc(1, buf + 16, 16, 0xBEEF, DESC_F_WRITE | DESC_F_NEXT, table=table)
        return self.put_chain([(table, 32, DESC_F_INDIRECT)])
