"""Dirty page logging on packed rings (csrc/packed.c, dirtylog.c), at the ring level.

A packed ring's used descriptors overwrite slots of the descriptor ring that
may still hold descriptors of chains in flight, so the device logs each
chain from the copy it took at pop, and the used descriptors at the ring's
own guest-physical address. These tests lay out packed rings with the
Python writer, attach a bitmap as SET_LOG_BASE would, and check which pages
a push marks: every page the device wrote, nothing it only read.
"""
from __future__ import annotations

import mmap

import pytest

from vhost_user._native import lib
from vhost_user.dirtylog import DirtyLog, log_size_for
from vhost_user.frontend.packedring import PackedRing
from vhost_user.protocol import VHOST_VRING_F_LOG
from vhost_user.virtqueue import Virtqueue

PAGE = 4096


def _pages(gpa: int, length: int) -> set[int]:
    return set(range(gpa // PAGE, (gpa + length - 1) // PAGE + 1)) if length else set()


class Logged:
    """A started packed Virtqueue over `ring` with a dirty log attached."""

    def __init__(self, ram, ring: PackedRing, *, log_ring: bool = True) -> None:
        self.vq = Virtqueue(0)
        ring.setup(self.vq)
        self.memory = ram.memory()
        if log_ring:   # VHOST_VRING_F_LOG, log_guest_addr = the device area, as QEMU sends
            self.vq.set_log_flags(VHOST_VRING_F_LOG, ring.device)
        self.map = mmap.mmap(-1, log_size_for(self.memory))
        self.log = DirtyLog(self.map)
        self.vq.set_dirty_log(self.log)
        self.vq.start(self.memory, None)

    def marked(self) -> set[int]:
        bits = self.map[:]
        return {8 * i + b for i, byte in enumerate(bits) if byte for b in range(8) if byte >> b & 1}

    def clear(self) -> None:
        self.map[:] = bytes(len(self.map))

    def close(self) -> None:
        self.vq.set_dirty_log(None)
        self.vq.close()
        self.memory.close()
        self.log.release()
        self.map.close()


@pytest.fixture
def buffers(ram):
    """Page-aligned buffers, each on pages of its own."""
    return lambda n, pages=1: [ram.alloc(pages * PAGE, PAGE) for _ in range(n)]


def test_packed_push_marks_written_bytes_used_descriptor_and_nothing_read(ram, buffers):
    ring = PackedRing(ram, 8)
    rd, w1, w2 = buffers(3, pages=2)
    q = Logged(ram, ring)
    try:
        ident = ring.add_chain([(rd, 2 * PAGE)], [(w1, 2 * PAGE), (w2, 2 * PAGE)])
        c = q.vq.pop()
        q.clear()
        q.vq.push(c.head, 2 * PAGE + 100)   # all of w1 and 100 bytes of w2
        assert ring.reap() == [(ident, 2 * PAGE + 100)]
        marked = q.marked()
        ring_pages = _pages(ring.desc, 16 * ring.num)
        assert _pages(w1, 2 * PAGE) | _pages(w2, 100) <= marked
        assert _pages(ring.desc, 16) <= marked            # the used descriptor, slot 0
        assert not marked & _pages(rd, 2 * PAGE)          # only read
        assert not marked & _pages(w2 + PAGE, PAGE)       # beyond the used length
        assert marked <= _pages(w1, 2 * PAGE) | _pages(w2, 100) | ring_pages | _pages(ring.device, 4)
        assert q.vq.stats["log_missed"] == 0
    finally:
        q.close()


def test_packed_log_uses_the_copy_taken_at_pop_after_the_ring_slots_were_reused(ram, buffers):
    """Chain A (3 slots) completes last: by then B's used descriptor and a new chain C
    have overwritten A's slots, yet A's writable pages are marked, and C's are not."""
    ring = PackedRing(ram, 4)
    rd, wa1, wa2, wb, wc = buffers(5)
    q = Logged(ram, ring)
    try:
        a = ring.add_chain([(rd, 64)], [(wa1, PAGE), (wa2, PAGE)])   # slots 0-2
        b = ring.add_chain((), [(wb, PAGE)])                         # slot 3
        ca, cb = q.vq.pop(), q.vq.pop()
        assert (ca.head, cb.head) == (a, b)
        q.vq.push(b, PAGE)                                           # used descriptor at slot 0
        assert ring.reap() == [(b, PAGE)]
        c = ring.add_chain((), [(wc, PAGE)])                         # slot 0 again, new wrap
        cc = q.vq.pop()
        assert cc.head == c
        q.clear()
        q.vq.push(a, 2 * PAGE)
        marked = q.marked()
        assert _pages(wa1, PAGE) | _pages(wa2, PAGE) <= marked
        assert not marked & (_pages(wc, PAGE) | _pages(wb, PAGE) | _pages(rd, 64))
        q.vq.push(c, 10)
        assert ring.reap() == [(a, 2 * PAGE), (c, 10)]
        assert _pages(wc, 10) <= q.marked()
    finally:
        q.close()


def test_packed_log_reads_an_indirect_table_again(ram, buffers):
    ring = PackedRing(ram, 4)
    rd, w1, w2 = buffers(3)
    q = Logged(ram, ring)
    try:
        ident = ring.add_chain([(rd, PAGE)], [(w1, PAGE), (w2, PAGE)], indirect=True)
        c = q.vq.pop()
        q.clear()
        q.vq.push(c.head, PAGE + 1)
        marked = q.marked()
        assert _pages(w1, PAGE) | _pages(w2, 1) <= marked
        assert not marked & _pages(rd, PAGE)
        assert ring.reap() == [(ident, PAGE + 1)]
    finally:
        q.close()


def test_packed_ring_writes_are_logged_only_with_vring_f_log(ram, buffers):
    ring = PackedRing(ram, 8)
    (w,) = buffers(1)
    q = Logged(ram, ring, log_ring=False)
    try:
        ring.add_chain((), [(w, PAGE)])
        c = q.vq.pop()
        q.clear()
        q.vq.push(c.head, PAGE)
        assert q.marked() == _pages(w, PAGE)   # the buffer, not the ring
    finally:
        q.close()


def test_packed_device_event_flags_are_logged_at_log_guest_addr(ram):
    ring = PackedRing(ram, 8)
    q = Logged(ram, ring)
    try:
        q.clear()
        lib.vr_disable_notify(q.vq.native_queue)
        assert q.marked() == _pages(ring.device, 4)
    finally:
        q.close()


def test_a_driver_with_more_descriptors_in_flight_than_the_ring_breaks_the_queue(ram, buffers):
    """Used position 0, avail position 4 on a 4-slot ring: slot 0 is rewritten before the
    device used it (PackedRing's put_chain does no room check)."""
    ring = PackedRing(ram, 4)
    (w,) = buffers(1)
    q = Logged(ram, ring)
    try:
        ring.add_chain((), [(w, 16), (w + 16, 16), (w + 32, 16), (w + 48, 16)])
        assert q.vq.pop() is not None
        ring.put_chain([(w, 16, 2)])
        with pytest.raises(Exception, match="more descriptors in flight than the ring holds"):
            q.vq.pop()
    finally:
        q.close()
