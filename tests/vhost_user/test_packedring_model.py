"""The Python packed-ring writer itself (vhost_user/frontend/packedring.py), no back-end:
the bytes it lays out, wrap counters, the vhost-user base, and reaping used descriptors
written by hand the way a device does (virtio 1.2, 2.8)."""
from __future__ import annotations

import random

import pytest

from vhost_user.frontend.packedring import (
    DESC_F_AVAIL, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_USED, DESC_F_WRITE, EVENT_DESC, EVENT_DISABLE,
    PDESC, PackedRing,
)

AV = DESC_F_AVAIL    # available under wrap counter 1
AV0 = DESC_F_USED    # available under wrap counter 0


class Device:
    """The device side of 2.8, written from the spec: take chains in ring order, use them."""

    def __init__(self, ring: PackedRing) -> None:
        self.ring, self.avail, self.avail_wrap, self.used, self.used_wrap = ring, 0, 1, 0, 1

    def take(self):
        """(id, ndesc, [desc]) of the next available chain, or None."""
        r, descs = self.ring, []
        if (r.read_desc(self.avail)[3] & (AV | AV0)) != (AV if self.avail_wrap else AV0):
            return None
        while True:
            descs.append(r.read_desc(self.avail))
            self.avail += 1
            if self.avail == r.num:
                self.avail, self.avail_wrap = 0, self.avail_wrap ^ 1
            if not descs[-1][3] & DESC_F_NEXT:
                return descs[-1][2], len(descs), descs     # 2.8: id in the last descriptor

    def use(self, id: int, ndesc: int, length: int) -> None:
        used = AV | DESC_F_USED if self.used_wrap else 0
        self.ring.write_desc(self.used, 0, length, id, used | DESC_F_WRITE)
        self.used += ndesc
        if self.used >= self.ring.num:
            self.used, self.used_wrap = self.used - self.ring.num, self.used_wrap ^ 1


def test_packedring_fresh_ring_is_aligned_zeroed_and_based_0x80008000(ram):
    ring = PackedRing(ram, 100)
    assert ring.desc % 16 == 0 and ring.driver % 4 == 0 and ring.device % 4 == 0
    assert ram.read(ring.desc, 1600) == bytes(1600)
    assert ring.base() == 0x8000_8000
    assert ring.addresses(gpa=True) == (ring.desc, ring.driver, ring.device)
    assert ring.addresses() == tuple(ram.uva(a) for a in (ring.desc, ring.driver, ring.device))
    assert ring.reap() == []
    with pytest.raises(ValueError):
        PackedRing(ram, 0)
    with pytest.raises(ValueError):
        PackedRing(ram, 32769)


def test_packedring_setup_calls_packed_num_addr_base_in_order(ram):
    calls = []

    class FakeVq:
        def __getattr__(self, name):
            return lambda *a, **k: calls.append((name, a, k))

    ring = PackedRing(ram, 7)
    ring.setup(FakeVq(), gpa=True)
    assert calls == [("set_packed", (True,), {}), ("set_num", (7,), {}),
                     ("set_addr", (ring.desc, ring.driver, ring.device), {"gpa": True}),
                     ("set_base", (0x8000_8000,), {})]


def test_packedring_add_chain_lays_out_slots_with_id_next_and_avail_bits(ram):
    ring = PackedRing(ram, 8)
    ident = ring.add_chain([(0x1000, 100)], [(0x2000, 200), (0x3000, 300)])
    assert ram.read(ring.desc, 16) == PDESC.pack(0x1000, 100, ident, DESC_F_NEXT | AV)
    assert [ring.read_desc(i) for i in range(4)] == [
        (0x1000, 100, ident, DESC_F_NEXT | AV),
        (0x2000, 200, ident, DESC_F_WRITE | DESC_F_NEXT | AV),
        (0x3000, 300, ident, DESC_F_WRITE | AV),
        (0, 0, 0, 0)]
    assert ring.ndesc == {ident: 3} and ident not in ring.free
    assert ring.base() == 3 | 1 << 15 | 1 << 31


def test_packedring_unpublished_first_descriptor_is_not_available_until_publish(ram):
    ring = PackedRing(ram, 4)
    dev = Device(ring)
    ident = ring.add_chain([(0x1000, 16), (0x2000, 16)], publish=False)
    assert ring.read_desc(1) == (0x2000, 16, ident, AV)
    assert not ring.read_desc(0)[3] & AV and dev.take() is None
    before = ram.read(ring.desc, 14)
    ring.publish(ident)
    assert ram.read(ring.desc, 14) == before              # only the flags were written
    assert ring.read_desc(0)[3] == DESC_F_NEXT | AV and dev.take()[:2] == (ident, 2)


def test_packedring_chain_across_the_end_toggles_the_avail_wrap_counter(ram):
    ring = PackedRing(ram, 3)
    dev = Device(ring)
    a = ring.add_chain([(0x1000, 16), (0x2000, 16)])
    dev.use(*dev.take()[:2], 0)
    assert ring.reap() == [(a, 0)]
    b = ring.add_chain([(0x3000, 16)], [(0x4000, 16)])   # slots 2, then 0 under wrap 0
    assert ring.read_desc(2)[3] == DESC_F_NEXT | AV
    assert ring.read_desc(0) == (0x4000, 16, b, DESC_F_WRITE | AV0)
    assert ring.base() == 1 | 0 << 15 | 2 << 16 | 1 << 31
    dev.use(*dev.take()[:2], 9)                          # the used descriptor lands in slot 2
    assert ring.reap() == [(b, 9)]
    assert ring.base() == 1 | 0 << 15 | 1 << 16 | 0 << 31


def test_packedring_reap_skips_each_chain_by_its_length_out_of_order(ram):
    ring = PackedRing(ram, 8)
    dev = Device(ring)
    a = ring.add_chain([(0x1000, 16), (0x2000, 16)])
    b = ring.add_chain([(0x3000, 16)])
    ta, tb = dev.take(), dev.take()
    dev.use(*tb[:2], 5)                                  # B completes first, into slot 0
    assert ring.reap() == [(b, 5)] and ring.used_slot == 1
    dev.use(*ta[:2], 7)                                  # then A, into slot 1
    assert ring.read_desc(1) == (0, 7, a, AV | DESC_F_USED | DESC_F_WRITE)
    assert ring.reap() == [(a, 7)] and ring.used_slot == 3
    assert ring.ndesc == {} and sorted(ring.free) == list(range(8))


def test_packedring_reap_ignores_a_descriptor_used_under_the_other_wrap(ram):
    ring = PackedRing(ram, 4)
    ident = ring.add_chain([(0x1000, 16)])
    ring.write_desc(0, 0, 3, ident, DESC_F_WRITE)        # AVAIL = USED = 0: not for wrap 1
    assert ring.reap() == []
    ring.write_desc(0, 0, 3, ident, AV | DESC_F_USED)
    assert ring.reap() == [(ident, 3)]


@pytest.mark.parametrize("num", [1, 3, 7, 100])
def test_packedring_many_rounds_against_a_spec_device_keep_counters_in_step(ram, num):
    ring, rng = PackedRing(ram, num), random.Random(num)
    dev, taken, done = Device(ring), [], 0
    for _ in range(30 * num):
        size = rng.randint(1, min(num, 3))
        if ring.free and ring.in_flight + size <= num:
            ring.add_chain([(0x1000 + k, 16) for k in range(size)], indirect=rng.random() < 0.2)
        while (t := dev.take()) is not None:
            taken.append(t)
        rng.shuffle(taken)
        for t in taken[:rng.randint(0, len(taken))]:
            taken.remove(t)
            dev.use(t[0], t[1], t[1])
        done += len(ring.reap())
    assert done > 10 * num
    assert ring.base() & 0x7FFF == dev.avail and ring.base() >> 15 & 1 == dev.avail_wrap
    assert ring.base() >> 16 & 0x7FFF == dev.used and ring.base() >> 31 == dev.used_wrap


def test_packedring_indirect_is_one_ring_descriptor_over_a_sequential_table(ram):
    ring = PackedRing(ram, 4)
    ident = ring.add_chain([(0x1000, 10)], [(0x2000, 20), (0x3000, 30)], indirect=True)
    table, length, rid, flags = ring.read_desc(0)
    assert (length, rid, flags) == (48, ident, DESC_F_INDIRECT | AV) and table % 16 == 0
    assert [PDESC.unpack(ram.read(table + 16 * k, 16)) for k in range(3)] == [
        (0x1000, 10, 0, 0), (0x2000, 20, 0, DESC_F_WRITE), (0x3000, 30, 0, DESC_F_WRITE)]
    assert ring.ndesc == {ident: 1} and ring.read_desc(1) == (0, 0, 0, 0)


def test_packedring_add_chain_refuses_empty_chains_and_chains_without_room(ram):
    ring = PackedRing(ram, 4)
    with pytest.raises(ValueError):
        ring.add_chain()
    ring.add_chain([(0x1000, 16)] * 3)
    with pytest.raises(MemoryError, match="no room"):
        ring.add_chain([(0x1000, 16)] * 2)
    assert ring.base() == 3 | 1 << 15 | 1 << 31          # nothing was written
    ring.add_chain([(0x1000, 16)] * 3, indirect=True)     # one slot is enough
    with pytest.raises(MemoryError):
        ring.add_chain([(0x1000, 16)], indirect=True)


def test_packedring_event_areas_bytes(ram):
    ring = PackedRing(ram, 8)
    ring.set_driver_event(EVENT_DESC, off=5, wrap=0)
    assert ram.read(ring.driver, 4) == (5).to_bytes(2, "little") + EVENT_DESC.to_bytes(2, "little")
    ring.set_driver_event(EVENT_DISABLE)
    assert ram.read(ring.driver, 4) == (0x8000).to_bytes(2, "little") + b"\x01\x00"
    with pytest.raises(ValueError):
        ring.set_driver_event(EVENT_DESC, off=1 << 15)
    ram.put_u16(ring.device + 2, EVENT_DISABLE)
    assert ring.device_event_flags == EVENT_DISABLE


def test_packedring_hostile_builders_break_the_rule_they_name(ram):
    buf = ram.alloc(64)
    ring = PackedRing(ram, 8)
    assert Device(ring).take() is None
    cases = {
        "id_out_of_range": lambda t: t[0] == 13,
        "duplicate_id": lambda t: t[0] == ring.read_desc(1)[2],
        "endless_chain": lambda t: False,
        "nested_indirect": lambda t: PDESC.unpack(ram.read(t[2][0][0], 16))[3] & DESC_F_INDIRECT,
        "indirect_with_next": lambda t: t[2][0][3] & (DESC_F_INDIRECT | DESC_F_NEXT) == 5,
        "order": lambda t: [d[3] & DESC_F_WRITE for d in t[2]] == [DESC_F_WRITE, 0],
        "indirect_after_direct": lambda t: t[2][1][3] & DESC_F_INDIRECT and t[1] == 2,
        "id_in_last": lambda t: t[0] == 13 and t[2][0][2] < 8,
    }
    for name, check in cases.items():
        ring = PackedRing(ram, 8)
        dev = Device(ring)
        getattr(ring, "hostile_" + name)(buf)
        if name == "endless_chain":
            assert all(ring.read_desc(i)[3] == DESC_F_NEXT | AV for i in range(8))
            continue
        t = dev.take()
        assert t is not None and check(t), name
    ring = PackedRing(ram, 8)
    ring.hostile_indirect_len(24)
    ring.hostile_address(1 << 40, 32, DESC_F_WRITE)
    assert ring.read_desc(0)[1:] == (24, 0, DESC_F_INDIRECT | AV)
    assert ring.read_desc(1) == (1 << 40, 32, 1, DESC_F_WRITE | AV)
    ident = ring.reserved_indirect_flags(buf)
    table = ring.read_desc(2)[0]
    assert PDESC.unpack(ram.read(table, 16)) == (buf, 16, 0xBEEF, DESC_F_NEXT)
    assert ring.read_desc(2)[2:] == (ident, DESC_F_INDIRECT | AV)
