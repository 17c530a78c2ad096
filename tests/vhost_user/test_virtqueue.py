"""Split virtqueue through the Python API: pop/push, notifications, hostile rings, workers."""
from __future__ import annotations

import logging
import os
import threading
import time

import pytest

from ringlayout import (
    AVAIL_F_NO_INTERRUPT,
    USED_F_NO_NOTIFY,
    GuestRam,
    SplitRing,
    count_events,
    wait_for,
)
from vhost_user.errors import (
    AddressOutOfRange,
    AvailIndexJump,
    BadIndirectLength,
    ChainTooLong,
    DescriptorIndexOutOfRange,
    DescriptorLoop,
    DescriptorOrder,
    NestedIndirect,
    VirtqueueError,
)
from vhost_user.memory import GuestMemory
from vhost_user.virtqueue import Virtqueue

MB = 1 << 20


def started(ram, ring, *, index=0, handler=None, event_idx=False, call=None, kick=None, mem=None):
    vq = Virtqueue(index)
    ring.setup(vq)
    vq.set_event_idx(event_idx)
    if call is not None:
        vq.set_call(call)
    if kick is not None:
        vq.set_kick(kick)
    memory = mem if mem is not None else ram.memory()
    vq.start(memory, handler)
    return vq, memory


def finish(vq, memory):
    vq.close()
    memory.close()


# -- pop / push ------------------------------------------------------------------------------

def test_pop_direct_chain_returns_segments(ram):
    ring = SplitRing(ram, 16)
    rd, wr = ram.alloc(100), ram.alloc(64)
    ram.write(rd, bytes(range(100)))
    vq, mem = started(ram, ring)
    assert vq.pop() is None
    head = ring.add_chain([(rd, 40), (rd + 40, 60)], [(wr, 64)])
    ring.publish(head)
    c = vq.pop()
    assert c.head == head
    assert c.read() == bytes(range(100))
    assert c.read_len == 100 and c.write_len == 64
    assert c.write(b"A" * 10, offset=60) == 4
    vq.push(c.head, 64)
    assert ring.reap() == [(head, 64)]
    assert ram.read(wr + 60, 4) == b"AAAA"
    assert vq.pop() is None
    assert vq.get_base() == 1
    finish(vq, mem)


def test_pop_indirect_chain(ram):
    ring = SplitRing(ram, 8)
    rd, wr = ram.alloc(32), ram.alloc(32)
    ram.write(rd, b"r" * 32)
    vq, mem = started(ram, ring)
    head = ring.add_chain([(rd, 16), (rd + 16, 16)], [(wr, 32)], indirect=True)
    ring.publish(head)
    c = vq.pop()
    assert c.read() == b"r" * 32
    assert [s[2] for s in c.writable] == [32]
    vq.push(c.head, 0)
    assert ring.reap() == [(head, 0)]
    finish(vq, mem)


def test_pop_buffer_crossing_regions_is_split():
    ram = GuestRam([(0, MB), (MB, MB, 0x5000_0000, 4096)])
    ring = SplitRing(ram, 8)
    vq, mem = started(ram, ring)
    ram.write(MB - 8, b"01234567abcdefgh")
    ring.publish(ring.add_chain([(MB - 8, 16)]))
    c = vq.pop()
    assert c.readable == [(0, MB - 8, 8), (1, 0, 8)]
    assert c.read() == b"01234567abcdefgh"
    finish(vq, mem)
    ram.close()


def test_rings_by_gpa_and_in_second_region():
    ram = GuestRam([(0, MB), (16 * MB, MB)])
    ring = SplitRing(ram, 8, region=1)
    vq = Virtqueue(0)
    ring.setup(vq, gpa=True)
    mem = ram.memory()
    vq.start(mem)
    buf = ram.alloc(8)
    ring.publish(ring.add_chain([(buf, 8)]))
    assert vq.pop().readable == [(0, buf, 8)]
    finish(vq, mem)
    ram.close()


def test_index_wraps_around_65535(ram):
    ring = SplitRing(ram, 4, base=65533)
    buf = ram.alloc(16)
    vq, mem = started(ram, ring)
    seen = []
    for _ in range(6):
        h = ring.add_chain([(buf, 16)])
        ring.publish(h)
        c = vq.pop()
        seen.append(c.head)
        vq.push(c.head, 1)
        assert ring.reap() == [(h, 1)]
    assert vq.get_base() == (65533 + 6) & 0xFFFF
    assert ring.used_idx == (65533 + 6) & 0xFFFF
    assert not vq.broken
    finish(vq, mem)


def test_set_num_rejects_bad_sizes():
    vq = Virtqueue(0, max_size=256)
    for n in (0, 3, 512, 100):
        with pytest.raises(ValueError):
            vq.set_num(n)
    vq.set_num(256)
    vq.close()


def test_start_rejects_ring_outside_memory(ram):
    ring = SplitRing(ram, 8)
    vq = Virtqueue(0)
    ring.setup(vq)
    vq.set_addr(0x7000_0000_0000, *ring.addresses()[1:])
    mem = ram.memory()
    with pytest.raises(AddressOutOfRange):
        vq.start(mem)
    assert not vq.started
    vq.set_addr(ring.addresses()[0] + 8, *ring.addresses()[1:])
    with pytest.raises(VirtqueueError, match="misaligned"):
        vq.start(mem)
    finish(vq, mem)


def test_stop_returns_base_and_restart_continues(ram):
    ring = SplitRing(ram, 8)
    buf = ram.alloc(16)
    vq, mem = started(ram, ring)
    ring.publish(ring.add_chain([(buf, 16)]), ring.add_chain([(buf, 16)]))
    c = vq.pop()
    vq.push(c.head, 0)
    assert vq.stop() == 1
    vq.start(mem)
    assert vq.pop() is not None
    finish(vq, mem)


# -- notification suppression ------------------------------------------------------------------

def complete_one(vq, ring, buf):
    ring.publish(ring.add_chain([(buf, 16)]))
    c = vq.pop()
    vq.push(c.head, 0)
    ring.reap()
    return vq.notify()


def test_notify_flag_suppression_counts_eventfd_writes(ram, eventfd):
    ring = SplitRing(ram, 8)
    buf = ram.alloc(16)
    call = eventfd()
    vq, mem = started(ram, ring, call=call)
    assert complete_one(vq, ring, buf)
    assert not vq.notify()  # nothing new used
    ring.set_avail_flags(AVAIL_F_NO_INTERRUPT)
    assert not complete_one(vq, ring, buf)
    ring.set_avail_flags(0)
    assert complete_one(vq, ring, buf)
    assert count_events(call) == 2
    assert vq.stats["notifies"] == 2
    finish(vq, mem)


def test_notify_event_idx_uses_used_event(ram, eventfd):
    ring = SplitRing(ram, 8)
    buf = ram.alloc(16)
    call = eventfd()
    vq, mem = started(ram, ring, call=call, event_idx=True)
    assert complete_one(vq, ring, buf)  # first notification is unconditional
    ring.set_used_event(5)  # driver wants a call once used idx passes 5
    results = [complete_one(vq, ring, buf) for _ in range(6)]  # used idx 2..7
    assert results == [False, False, False, False, True, False]
    ring.set_avail_flags(AVAIL_F_NO_INTERRUPT)  # ignored with EVENT_IDX
    ring.set_used_event(7)
    assert complete_one(vq, ring, buf)
    assert count_events(call) == 3
    finish(vq, mem)


def test_worker_suppresses_kicks_and_writes_avail_event(ram, eventfd):
    ring = SplitRing(ram, 8)
    buf = ram.alloc(16)
    call, kick = eventfd(), eventfd()
    seen = []
    during = []

    def handler(vq):
        during.append(ring.used_flags)
        while (c := vq.pop()) is not None:
            seen.append(c.head)
            vq.push(c.head, 0)

    vq, mem = started(ram, ring, call=call, kick=os.dup(kick), handler=handler)
    wait_for(lambda: ring.used_flags == 0)
    for _ in range(3):
        ring.publish(ring.add_chain([(buf, 16)]))
        os.eventfd_write(kick, 1)
        wait_for(lambda: ring.used_idx == len(seen) and len(seen) > 0 and ring.reap() is not None)
    wait_for(lambda: len(seen) == 3)
    assert all(f & USED_F_NO_NOTIFY for f in during)  # kicks off while handling
    wait_for(lambda: ring.used_flags == 0)  # back on before sleeping
    assert vq.stats["kicks"] >= 1
    assert vq.stop() == 3
    vq.close()
    # event idx: avail_event tracks last_avail before sleeping
    ring2 = SplitRing(ram, 8)
    vq2, mem2 = started(ram, ring2, call=call, kick=os.dup(kick), handler=handler, event_idx=True)
    ring2.publish(ring2.add_chain([(buf, 16)]), ring2.add_chain([(buf, 16)]))
    os.eventfd_write(kick, 1)
    wait_for(lambda: ring2.used_idx == 2)
    wait_for(lambda: ring2.avail_event == 2)
    finish(vq2, mem2)
    mem.close()


# -- hostile rings -----------------------------------------------------------------------------

BUF = 0x1000  # overwritten per test with a real buffer


def build_loop(ring, buf):
    ring.publish(ring.hostile_loop(buf, 3))


def build_indirect_loop(ring, buf):
    ring.publish(ring.hostile_indirect_loop(buf))


def build_next_range(ring, buf):
    ring.publish(ring.hostile_next_out_of_range(buf))


def build_head_range(ring, buf):
    ring.publish(ring.num + 5)


def build_nested(ring, buf):
    ring.publish(ring.hostile_nested_indirect(buf))


def build_indirect_len(ring, buf):
    ring.publish(ring.hostile_indirect_len(24))


def build_indirect_zero(ring, buf):
    ring.publish(ring.hostile_indirect_len(0))


def build_outside(ring, buf):
    ring.publish(ring.hostile_address(0x7000_0000, 16))


def build_overflow(ring, buf):
    ring.publish(ring.hostile_address((1 << 64) - 16, 32))


def build_straddle(ring, buf):
    ring.publish(ring.hostile_address(ring.ram.regions[-1].gpa + ring.ram.regions[-1].size - 8, 16))


def build_jump(ring, buf):
    ring.hostile_avail_jump()


def build_order(ring, buf):
    ring.publish(ring.hostile_write_before_read(buf))


HOSTILE = [
    (build_loop, DescriptorLoop, "descriptor loop on queue 3 at head 0"),
    (build_indirect_loop, DescriptorLoop, "descriptor loop on queue 3"),
    (build_next_range, DescriptorIndexOutOfRange, "next index 11 out of range on queue 3 at head 0"),
    (build_head_range, DescriptorIndexOutOfRange, "head index 13 out of range on queue 3"),
    (build_nested, NestedIndirect, "nested indirect descriptor on queue 3"),
    (build_indirect_len, BadIndirectLength, "indirect table length 24"),
    (build_indirect_zero, BadIndirectLength, "indirect table length 0"),
    (build_outside, AddressOutOfRange, "outside guest memory on queue 3"),
    (build_overflow, AddressOutOfRange, "outside guest memory"),
    (build_straddle, AddressOutOfRange, "outside guest memory"),
    (build_jump, AvailIndexJump, "avail index jumped from 0 to 9"),
    (build_order, DescriptorOrder, "readable descriptor after a writable one on queue 3"),
]


@pytest.mark.parametrize("build,exc,msg", HOSTILE, ids=[h[0].__name__[6:] for h in HOSTILE])
def test_hostile_ring_breaks_queue_with_typed_error(build, exc, msg, ram, eventfd, caplog):
    ring = SplitRing(ram, 8)
    buf = ram.alloc_guarded(64)
    err = eventfd()
    vq = Virtqueue(3)
    ring.setup(vq)
    vq.set_err(err)
    mem = ram.memory()
    vq.start(mem)
    build(ring, buf)
    before = ram.snapshot()
    with caplog.at_level(logging.ERROR, logger="vhost_user.virtqueue"):
        with pytest.raises(exc, match=msg):
            vq.pop()
    assert vq.broken and isinstance(vq.failure, exc)
    assert msg.split(" on queue")[0] in vq.error
    assert [r.getMessage() for r in caplog.records] == [vq.error]
    assert count_events(err) == 1
    # later operations are no-ops
    assert vq.pop() is None
    vq.push(0, 1)
    assert not vq.notify()
    assert ram.snapshot() == before  # nothing written anywhere
    ram.check_guards()
    vq.reset()
    assert not vq.broken and vq.error is None
    finish(vq, mem)


def test_hostile_chain_length_overflow_breaks_queue():
    big = 1 << 31
    ram = GuestRam([(0, MB), (1 << 32, big)])  # sparse memfd: nothing is touched
    ring = SplitRing(ram, 8)
    vq, mem = started(ram, ring)
    ids = ring._take(3)
    for k, i in enumerate(ids):
        ring.write_desc(i, 1 << 32, big - 1, 2 | (1 if k < 2 else 0), ids[k + 1] if k < 2 else 0)
    ring.publish(ids[0])
    with pytest.raises(ChainTooLong, match="chain length overflow on queue 0 at head 0"):
        vq.pop()
    assert ring.used_idx == 0
    finish(vq, mem)
    ram.close()


def test_hostile_queue_in_worker_leaves_other_queue_working(ram, eventfd, caplog):
    good, bad = SplitRing(ram, 8), SplitRing(ram, 8)
    buf = ram.alloc_guarded(64)
    kicks = [eventfd(), eventfd()]
    err = eventfd()
    mem = ram.memory()

    def handler(vq):
        while (c := vq.pop()) is not None:
            vq.push(c.head, 0)

    q0, _ = started(ram, good, index=0, kick=os.dup(kicks[0]), handler=handler, mem=mem)
    q1 = Virtqueue(1)
    bad.setup(q1)
    q1.set_kick(os.dup(kicks[1]))
    q1.set_err(err)
    with caplog.at_level(logging.ERROR, logger="vhost_user.virtqueue"):
        q1.start(mem, handler)
        bad.publish(bad.hostile_loop(buf, 2))
        os.eventfd_write(kicks[1], 1)
        wait_for(lambda: q1.broken)
        wait_for(lambda: count_events(err) == 1)
    assert "descriptor loop on queue 1 at head 0" in caplog.text
    for _ in range(5):
        good.publish(good.add_chain([(buf, 16)]))
        os.eventfd_write(kicks[0], 1)
    wait_for(lambda: good.used_idx == 5)
    assert not q0.broken
    ram.check_guards()
    assert q1.stop() == 0
    q0.close()
    q1.close()
    mem.close()


# -- worker lifecycle ------------------------------------------------------------------------

def test_memory_swap_while_worker_runs(eventfd):
    ram = GuestRam([(0, MB), (2 * MB, MB)])
    ring = SplitRing(ram, 64)
    kick = eventfd()
    done = []
    stop = threading.Event()

    def handler(vq):
        while (c := vq.pop()) is not None:
            c.write(c.read()[::-1])
            vq.push(c.head, c.write_len)
            done.append(c.head)

    mem = ram.memory()
    vq, _ = started(ram, ring, kick=os.dup(kick), handler=handler, mem=mem)
    buf = ram.alloc(16, region=1)
    ram.write(buf, b"0123456789abcdef")
    out = ram.alloc(16, region=1)

    def producer():
        n = 0
        while not stop.is_set() and n < 400:
            # Every 100 requests, wait for one more swap: the swaps interleave with the
            # worker however slow they are (under ASan on a loaded machine a whole run
            # once fit between two of them).
            if n and n % 100 == 0 and len(tables) <= n // 100:
                time.sleep(0.001)
                continue
            ring.reap()
            if len(ring.free) >= 2:
                ring.publish(ring.add_chain([(buf, 16)], [(out, 16)]))
                os.eventfd_write(kick, 1)
                n += 1
        stop.set()

    tables = [mem]
    t = threading.Thread(target=producer)
    t.start()
    while not stop.is_set():
        new = ram.memory()
        vq.update_memory(new)
        tables[-1].close()
        tables.append(new)
    t.join()
    wait_for(lambda: len(done) == 400)
    assert ram.read(out, 16) == b"fedcba9876543210"
    assert len(tables) > 2 and all(t.closed for t in tables[:-1])
    vq.close()
    assert not vq.started
    tables[-1].close()
    assert tables[-1].closed
    ram.close()


def test_update_memory_without_ring_stops_queue(eventfd):
    ram = GuestRam([(0, MB), (2 * MB, MB)])
    ring = SplitRing(ram, 8)
    mem = ram.memory()
    vq, _ = started(ram, ring, kick=eventfd(), handler=lambda vq: None, mem=mem)
    smaller = mem.without_region(0, MB, ram.regions[0].uaddr)
    with pytest.raises(AddressOutOfRange):
        vq.update_memory(smaller)
    assert not vq.started
    smaller.close()
    mem.close()
    vq.close()
    ram.close()


def test_stop_completes_native_batch_and_kick_swap(ram, eventfd):
    ring = SplitRing(ram, 8)
    buf = ram.alloc(16)
    k1, k2 = eventfd(), eventfd()
    handled = []

    def handler(vq):
        while (c := vq.pop()) is not None:
            handled.append(c.head)
            vq.push(c.head, 0)

    vq, mem = started(ram, ring, kick=os.dup(k1), handler=handler)
    vq.set_kick(os.dup(k2))  # swapped while running
    ring.publish(ring.add_chain([(buf, 16)]))
    os.eventfd_write(k2, 1)
    wait_for(lambda: ring.used_idx == 1)
    assert vq.stop() == 1
    finish(vq, mem)


def test_no_fd_leaks_across_lifecycle(eventfd):
    base = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        ram = GuestRam([(0, MB)])
        ring = SplitRing(ram, 8)
        vq = Virtqueue(0)
        ring.setup(vq)
        vq.set_kick(os.eventfd(0))
        vq.set_call(os.eventfd(0))
        vq.set_err(os.eventfd(0))
        vq.set_call(os.eventfd(0))  # replaced one is closed
        mem = ram.memory()
        vq.start(mem, lambda q: None)
        vq.update_memory(new := ram.memory())
        mem.close()
        vq.stop()
        vq.close()
        new.close()
        ram.close()
    assert len(os.listdir("/proc/self/fd")) == base


def test_python_handler_exception_is_logged_and_queue_continues(ram, eventfd, caplog):
    ring = SplitRing(ram, 8)
    buf = ram.alloc(16)
    kick = eventfd()
    calls = []

    def handler(vq):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        while (c := vq.pop()) is not None:
            vq.push(c.head, 0)

    with caplog.at_level(logging.ERROR, logger="vhost_user.virtqueue"):
        vq, mem = started(ram, ring, kick=os.dup(kick), handler=handler)
        wait_for(lambda: len(calls) >= 1)
        ring.publish(ring.add_chain([(buf, 16)]))
        os.eventfd_write(kick, 1)
        wait_for(lambda: ring.used_idx == 1)
    assert "handler failed" in caplog.text
    assert not vq.broken
    finish(vq, mem)


def test_guest_memory_empty_start_rejected():
    vq = Virtqueue(0)
    vq.set_num(8)
    vq.set_addr(0, 0x1000, 0x2000)
    with pytest.raises(AddressOutOfRange):
        vq.start(GuestMemory.empty())
    vq.close()


def test_busy_poll_picks_up_work_without_kicks_and_arms_them_when_it_gives_up(ram, eventfd):
    """The driver need not kick while the worker polls (kicks stay off); once the poll
    gives up, kicks are on and one wakes the worker."""
    ring = SplitRing(ram, 8)
    buf = ram.alloc(16)
    kick = eventfd()

    def handler(vq):
        while (c := vq.pop()) is not None:
            vq.push(c.head, 0)

    vq = Virtqueue(0, poll_us=3_000_000)
    ring.setup(vq)
    vq.set_kick(os.dup(kick))
    mem = ram.memory()
    vq.start(mem, handler)
    for n in (1, 2):  # no kicks: the first look or the poll takes the first, the poll the second
        ring.publish(ring.add_chain([(buf, 16)]))
        wait_for(lambda: ring.used_idx == n, timeout=2)
        assert ring.used_flags & USED_F_NO_NOTIFY, "kicks were on while the worker polled"
    wait_for(lambda: not ring.used_flags & USED_F_NO_NOTIFY, timeout=10)  # the poll gave up
    ring.publish(ring.add_chain([(buf, 16)]))
    os.eventfd_write(kick, 1)
    wait_for(lambda: ring.used_idx == 3, timeout=5)
    stats = vq.stats
    assert stats["kicks"] == 1 and stats["polled"] >= 1, stats
    vq.stop()
    finish(vq, mem)
