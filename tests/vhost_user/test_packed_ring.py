"""Packed virtqueues (virtio 1.2, 2.8) through the Python API: pop/push, wrap counters,
unpop, notification suppression, the vhost-user base, hostile rings, a worker."""
from __future__ import annotations

import logging
import os
import threading

import pytest

from ringlayout import count_events, wait_for
from vhost_user.errors import (
    AddressOutOfRange,
    BadBufferId,
    BadIndirectLength,
    ChainTooLong,
    DescriptorLoop,
    DescriptorOrder,
    NestedIndirect,
)
from vhost_user.frontend.packedring import (
    DESC_F_WRITE, EVENT_DESC, EVENT_DISABLE, EVENT_ENABLE, PackedRing,
)
from vhost_user.virtqueue import Virtqueue


def started(ram, ring, *, index=0, handler=None, event_idx=False, call=None, kick=None):
    vq = Virtqueue(index)
    ring.setup(vq)
    vq.set_event_idx(event_idx)
    if call is not None:
        vq.set_call(call)
    if kick is not None:
        vq.set_kick(kick)
    memory = ram.memory()
    vq.start(memory, handler)
    return vq, memory


def finish(vq, memory):
    vq.close()
    memory.close()


def test_pop_direct_chain_and_push_one_used_descriptor(ram):
    ring = PackedRing(ram, 8)
    rd, wr = ram.alloc(100), ram.alloc(300)
    vq, mem = started(ram, ring)
    assert vq.pop() is None
    ident = ring.add_chain([(rd, 100)], [(wr, 200), (wr + 200, 100)])
    c = vq.pop()
    assert c.head == ident
    assert sum(n for _, _, n in c.readable) == 100 and sum(n for _, _, n in c.writable) == 300
    assert vq.pop() is None
    vq.push(c.head, 77)
    assert ring.reap() == [(ident, 77)]
    _, _, _, flags = ring.read_desc(0)
    assert flags & DESC_F_WRITE                      # 2.8: data was written
    assert vq.get_base() == ring.base() == 3 | 1 << 15 | 3 << 16 | 1 << 31
    finish(vq, mem)


def test_pop_indirect_chain(ram):
    ring = PackedRing(ram, 4)
    buf = ram.alloc(64)
    vq, mem = started(ram, ring)
    ident = ring.add_chain([(buf, 16)], [(buf + 16, 48)], indirect=True)
    c = vq.pop()
    assert c.head == ident and len(c.readable) == 1 and len(c.writable) == 1
    vq.push(c.head, 48)
    assert ring.reap() == [(ident, 48)]
    finish(vq, mem)


def test_unpublished_chain_is_not_taken(ram):
    ring = PackedRing(ram, 8)
    buf = ram.alloc(16)
    vq, mem = started(ram, ring)
    ident = ring.add_chain([(buf, 16)], publish=False)
    assert vq.pop() is None
    ring.publish(ident)
    assert vq.pop().head == ident
    finish(vq, mem)


@pytest.mark.parametrize("num", [5, 7, 64])
def test_wrap_counters_flip_over_many_rounds_out_of_order(ram, num):
    """More chains than slots, of 1-3 descriptors, completed newest first: every id comes
    back once with its own length, and both sides agree on the base."""
    ring = PackedRing(ram, num)
    buf = ram.alloc(4096)
    vq, mem = started(ram, ring)
    done = descs = 0
    for rnd in range(12 * num):
        size = 1 + rnd % 3 if num >= 3 else 1
        batch = []
        while len(batch) < 2 and ring.free and sum(ring.ndesc.values()) + size <= num:
            batch.append(ring.put_chain([(buf + 16 * k, 16, 1 if k + 1 < size else 0)
                                         for k in range(size)]))
        descs += size * len(batch)
        popped = [vq.pop() for _ in batch]
        assert [c.head for c in popped] == batch and vq.pop() is None
        for c in reversed(popped):
            vq.push(c.head, c.head + 1000)
        got = ring.reap()
        assert sorted(got) == sorted((i, i + 1000) for i in batch)
        done += len(got)
    assert done >= 12 * num and descs >= 12 * num      # round the ring a dozen times
    assert vq.get_base() == ring.base()
    finish(vq, mem)


def test_stop_returns_both_positions_and_a_new_queue_continues(ram):
    ring = PackedRing(ram, 6)
    buf = ram.alloc(64)
    vq, mem = started(ram, ring)
    for _ in range(5):
        ring.add_chain([(buf, 16)], [(buf + 16, 16)])
        c = vq.pop()
        vq.push(c.head, 16)
        ring.reap()
    base = vq.stop()
    assert base == ring.base() and base & 0x8000 == 0    # avail wrapped once
    finish(vq, mem)
    vq, mem = started(ram, ring)
    ident = ring.add_chain([(buf, 16)])
    assert vq.pop().head == ident
    finish(vq, mem)


def test_unpop_gives_the_last_chains_back(ram):
    ring = PackedRing(ram, 8)
    buf = ram.alloc(64)
    vq, mem = started(ram, ring)
    a, b = ring.add_chain([(buf, 16)]), ring.add_chain([(buf, 16)], [(buf + 16, 16)])
    first, second = vq.pop(), vq.pop()
    vq.push(first.head, 1)            # an earlier pop completed in between (vsock rx does)
    vq.unpop()
    assert vq.pop().head == second.head == b and first.head == a
    vq.push(b, 2)
    assert ring.reap() == [(a, 1), (b, 2)]
    finish(vq, mem)


def test_push_of_an_id_not_in_flight_is_refused_and_writes_nothing(ram):
    ring = PackedRing(ram, 4)
    buf = ram.alloc(16)
    vq, mem = started(ram, ring)
    ring.add_chain([(buf, 16)])
    c = vq.pop()
    before = ram.snapshot()
    with pytest.raises(ValueError):
        vq.push((c.head + 1) % 4, 1)
    assert ram.snapshot() == before and not vq.broken
    finish(vq, mem)


def _complete(vq, ring, buf):
    ring.add_chain([(buf, 16)])
    vq.push(vq.pop().head, 0)
    ring.reap()
    return vq.notify()


def test_driver_event_flags_suppress_notifications(ram, eventfd):
    ring = PackedRing(ram, 8)
    buf = ram.alloc(16)
    call = eventfd()
    vq, mem = started(ram, ring, call=call)
    assert _complete(vq, ring, buf)
    assert not vq.notify()                       # nothing new used
    ring.set_driver_event(EVENT_DISABLE)
    assert not _complete(vq, ring, buf)
    ring.set_driver_event(EVENT_ENABLE)
    assert _complete(vq, ring, buf)
    assert count_events(call) == 2
    finish(vq, mem)


def test_driver_event_desc_notifies_when_its_slot_is_used(ram, eventfd):
    """EVENT_IDX: flags DESC with off_wrap = slot 3 (wrap 1): a notification when the
    used descriptor at slot 3 is written, not before, not after."""
    ring = PackedRing(ram, 8)
    buf = ram.alloc(16)
    call = eventfd()
    vq, mem = started(ram, ring, call=call, event_idx=True)
    assert _complete(vq, ring, buf)              # slot 0: the first one always notifies
    ring.set_driver_event(EVENT_DESC, off=3, wrap=1)
    assert [_complete(vq, ring, buf) for _ in range(4)] == [False, False, True, False]
    ring.set_driver_event(EVENT_DESC, off=1, wrap=0)   # used slots 5, 6, 7, then 0 and 1 of the next round
    assert [_complete(vq, ring, buf) for _ in range(5)] == [False, False, False, False, True]
    finish(vq, mem)


def test_worker_disables_kicks_while_it_works_and_enables_them_after(ram, eventfd):
    ring = PackedRing(ram, 8)
    buf = ram.alloc(16)
    seen, during = [], []

    def handler(vq):
        during.append(ring.device_event_flags)
        while (c := vq.pop()) is not None:
            seen.append(c.head)
            vq.push(c.head, 0)

    kick = eventfd()
    vq, mem = started(ram, ring, handler=handler, kick=kick, call=eventfd())
    ids = [ring.add_chain([(buf, 16)]) for _ in range(3)]
    os.eventfd_write(kick, 1)
    wait_for(lambda: len(seen) == 3)
    vq.stop()
    assert seen == ids and during and during[0] == EVENT_DISABLE
    assert ring.device_event_flags == EVENT_ENABLE
    finish(vq, mem)


def build_id_range(ring, buf):
    ring.hostile_id_out_of_range(buf)


def build_duplicate(ring, buf):
    ring.hostile_duplicate_id(buf)


def build_endless(ring, buf):
    ring.hostile_endless_chain(buf)


def build_nested(ring, buf):
    ring.hostile_nested_indirect(buf)


def build_indirect_len(ring, buf):
    ring.hostile_indirect_len(24)


def build_indirect_next(ring, buf):
    ring.hostile_indirect_with_next(buf)


def build_outside(ring, buf):
    ring.hostile_address(1 << 40)


def build_order(ring, buf):
    ring.hostile_order(buf)


HOSTILE = [
    (build_id_range, BadBufferId, "buffer id 13 out of range on queue 3"),
    (build_duplicate, BadBufferId, "buffer id 0 is already in flight on queue 3"),
    (build_endless, DescriptorLoop, "descriptor chain longer than the ring on queue 3"),
    (build_nested, NestedIndirect, "nested indirect descriptor on queue 3"),
    (build_indirect_len, BadIndirectLength, "indirect table length 24"),
    (build_indirect_next, ChainTooLong, "indirect descriptor chained to others on queue 3"),
    (build_outside, AddressOutOfRange, "outside guest memory on queue 3"),
    (build_order, DescriptorOrder, "readable descriptor after a writable one on queue 3"),
]


@pytest.mark.parametrize("build,exc,msg", HOSTILE, ids=[h[0].__name__[6:] for h in HOSTILE])
def test_hostile_packed_ring_breaks_queue_with_typed_error(build, exc, msg, ram, eventfd, caplog):
    ring = PackedRing(ram, 8)
    buf = ram.alloc_guarded(64)
    err = eventfd()
    vq = Virtqueue(3)
    ring.setup(vq)
    vq.set_err(err)
    mem = ram.memory()
    vq.start(mem)
    build(ring, buf)
    if build is build_duplicate:
        vq.pop()                     # the first chain under that id is fine
    before = ram.snapshot()
    with caplog.at_level(logging.ERROR, logger="vhost_user.virtqueue"):
        with pytest.raises(exc, match=msg):
            vq.pop()
    assert vq.broken and msg.split(" on queue")[0] in vq.error
    assert count_events(err) == 1
    assert vq.pop() is None          # later operations are no-ops
    vq.push(0, 1)
    assert not vq.notify()
    assert ram.snapshot() == before  # nothing written anywhere
    ram.check_guards()
    vq.reset()
    assert not vq.broken and not vq.packed
    finish(vq, mem)


def test_packed_size_need_not_be_a_power_of_two_but_split_must():
    vq = Virtqueue(0, 1024)
    with pytest.raises(ValueError, match="power of two"):
        vq.set_num(100)
    vq.set_packed(True)
    vq.set_num(100)
    with pytest.raises(ValueError, match="not in 1..1024"):
        vq.set_num(1025)
    vq.set_base(0xFFFF_FFFF)                 # any 32 bits; checked against the size at start
    vq.set_packed(False)
    with pytest.raises(ValueError, match="16-bit"):
        vq.set_base(0x1_0000)
    vq.close()


def test_two_threads_pop_and_push_while_the_driver_adds(ram):
    """The driver (this thread) adds while a device thread pops and pushes: nothing lost."""
    ring = PackedRing(ram, 16)
    buf = ram.alloc(16)
    vq, mem = started(ram, ring)
    total, got, stop = 2000, [], threading.Event()

    def device():
        while not stop.is_set():
            c = vq.pop()
            if c is not None:
                vq.push(c.head, 5)

    t = threading.Thread(target=device)
    t.start()
    sent = 0
    try:
        while len(got) < total:
            while sent < total and ring.free and sum(ring.ndesc.values()) < 16:
                ring.add_chain([(buf, 16)])
                sent += 1
            got += ring.reap()
    finally:
        stop.set()
        t.join()
    assert len(got) == total and all(n == 5 for _, n in got)
    finish(vq, mem)
