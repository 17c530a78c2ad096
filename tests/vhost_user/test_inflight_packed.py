"""Inflight I/O tracking on packed rings (vhost-user.rst, "Inflight I/O tracking", packed;
csrc/inflight_packed.c): the region's layout, crash recovery of positions and chains,
a push interrupted either side of its publication, and hostile regions."""
from __future__ import annotations

import mmap
import os
import struct

import pytest

from vhost_user.errors import VirtqueueError
from vhost_user.frontend.packedring import PackedRing
from vhost_user.virtqueue import Virtqueue, inflight_queue_size

# QueueRegionPacked header and DescStatePacked (32 bytes each)
HDR = struct.Struct("<QHHHHHHBB7x")
DESC = struct.Struct("<BxHHHQHHIQ")
NUM = 8
FRESH = 1 << 15 | 1 << 31   # both slots 0, both wrap counters 1


class Region:
    """One queue's QueueRegionPacked in a memfd, as QEMU keeps it across restarts."""

    def __init__(self) -> None:
        self.size = inflight_queue_size(NUM)
        self.fd = os.memfd_create("inflight", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, self.size)
        self.mm = mmap.mmap(self.fd, self.size)

    def header(self) -> dict:
        keys = ("features", "version", "desc_num", "free_head", "old_free_head", "used_idx",
                "old_used_idx", "used_wrap_counter", "old_used_wrap_counter")
        return dict(zip(keys, HDR.unpack_from(self.mm, 0)))

    def set_header(self, **fields) -> None:
        h = self.header()
        h.update(fields)
        HDR.pack_into(self.mm, 0, *h.values())

    def desc(self, i: int) -> dict:
        keys = ("inflight", "next", "last", "num", "counter", "id", "flags", "len", "addr")
        return dict(zip(keys, DESC.unpack_from(self.mm, 32 + 32 * i)))

    def set_desc(self, i: int, **fields) -> None:
        d = self.desc(i)
        d.update(fields)
        DESC.pack_into(self.mm, 32 + 32 * i, *d.values())

    def heads(self) -> dict[int, dict]:
        """buffer id -> head entry of every chain marked in flight."""
        out = {}
        for i in range(NUM):
            d = self.desc(i)
            if d["inflight"]:
                out[d["id"]] = d
        return out

    def close(self) -> None:
        self.mm.close()
        os.close(self.fd)


@pytest.fixture
def region():
    r = Region()
    yield r
    r.close()


def start(ring: PackedRing, mem, region: Region, base: int | None = None) -> Virtqueue:
    """A queue as QEMU starts it: packed, the region attached, `base` (stale after a crash)."""
    vq = Virtqueue(0)
    ring.setup(vq)
    if base is not None:
        vq.set_base(base)
    vq.set_inflight(region.mm, 0)
    vq.start(mem, None)
    return vq


def _crash(vq: Virtqueue) -> None:
    """The back-end dies: nothing more reaches the ring or the region."""
    vq.close()


def test_packed_region_initialised_on_first_start(ram, region):
    ring = PackedRing(ram, NUM)
    mem = ram.memory()
    vq = start(ring, mem, region)
    h = region.header()
    assert h["version"] == 1 and h["desc_num"] == NUM and h["features"] == 1 << 34
    assert (h["used_idx"], h["used_wrap_counter"]) == (0, 1) == (h["old_used_idx"],
                                                                 h["old_used_wrap_counter"])
    vq.close()
    mem.close()


def test_packed_region_holds_each_chain_in_flight_and_frees_it_at_push(ram, region):
    ring = PackedRing(ram, NUM)
    buf = ram.alloc(4096)
    mem = ram.memory()
    vq = start(ring, mem, region)
    a = ring.add_chain([(buf, 16)], [(buf + 16, 100), (buf + 116, 200)])
    b = ring.add_chain((), [(buf + 1024, 64)])
    ca, cb = vq.pop(), vq.pop()
    heads = region.heads()
    assert sorted(heads) == sorted([a, b])
    assert heads[a]["num"] == 3 and heads[b]["num"] == 1
    assert heads[a]["counter"] < heads[b]["counter"]
    # the head's list holds the chain's descriptors as the driver wrote them
    i, seen = [k for k in range(NUM) if region.desc(k)["inflight"] and region.desc(k)["id"] == a][0], []
    for _ in range(3):
        d = region.desc(i)
        seen.append((d["addr"], d["len"]))
        i = d["next"]
    assert seen == [(buf, 16), (buf + 16, 100), (buf + 116, 200)]
    vq.push(cb.head, 64)
    assert sorted(region.heads()) == [a]
    h = region.header()
    assert (h["used_idx"], h["old_used_idx"]) == (1, 1)   # b took one slot
    vq.push(ca.head, 300)
    assert region.heads() == {}
    assert region.header()["old_used_idx"] == 4
    vq.close()
    mem.close()


def test_packed_restart_with_a_stale_base_takes_positions_and_chains_from_the_region(ram, region):
    """QEMU restarts a dead back-end with the base of the previous start; the region
    gives the true positions and the chains still in flight, in pop order, rebuilt from
    the copy even where used descriptors have overwritten their ring slots."""
    ring = PackedRing(ram, 4)
    bufs = [ram.alloc(256) for _ in range(6)]
    mem = ram.memory()
    vq = start(ring, mem, region)
    ids = [ring.add_chain([(bufs[0], 16)], [(bufs[1], 32)]),   # slots 0-1
           ring.add_chain((), [(bufs[2], 48)]),                 # slot 2
           ring.add_chain((), [(bufs[3], 64)])]                 # slot 3
    chains = [vq.pop() for _ in ids]
    vq.push(chains[2].head, 64)                                 # used at slot 0
    vq.push(chains[1].head, 48)                                 # used at slot 1
    assert ring.reap() == [(ids[2], 64), (ids[1], 48)]
    late = ring.add_chain((), [(bufs[4], 80)])                  # slot 0 again, wrap 0
    _crash(vq)
    vq2 = start(ring, mem, region, base=FRESH)                  # stale: what QEMU has
    assert vq2.inflight_heads() == [ids[0]]
    # used: two chains of 1 slot = slot 2, wrap 1; avail: + chain 0's 2 slots = slot 0, wrap 0
    assert vq2.get_base() == 0 | 0 << 15 | 2 << 16 | 1 << 31
    again = vq2.pop()
    assert again.head == ids[0]
    assert [n for _, _, n in again.readable] == [16] and [n for _, _, n in again.writable] == [32]
    new = vq2.pop()
    assert new.head == late and vq2.pop() is None
    vq2.push(again.head, 32)
    vq2.push(new.head, 80)
    assert ring.reap() == [(ids[0], 32), (late, 80)]
    vq2.close()
    mem.close()


@pytest.mark.parametrize("published", [False, True])
def test_packed_push_interrupted_around_its_publication_counts_once(ram, region, published):
    """A crash after a push set region->used_idx but before it caught old_used_idx up:
    the first used slot's USED bit says whether the driver got the batch."""
    ring = PackedRing(ram, NUM)
    buf = ram.alloc(256)
    mem = ram.memory()
    vq = start(ring, mem, region)
    a = ring.add_chain((), [(buf, 16)])
    b = ring.add_chain((), [(buf + 16, 16)])
    vq.pop(), vq.pop()
    _crash(vq)
    # forge the middle of a push of [a, b]: both heads "being completed", the end set
    for i in range(NUM):
        if region.desc(i)["inflight"]:
            region.set_desc(i, inflight=2)
    region.set_header(used_idx=2)
    if published:   # the used descriptors reached the ring (first slot's flags last)
        for slot, ident in ((1, b), (0, a)):
            ring.write_desc(slot, 0, 16, ident, 1 << 7 | 1 << 15 | 2)
    vq2 = start(ring, mem, region, base=FRESH)
    if published:
        assert vq2.inflight_heads() == [] and vq2.get_base() == 2 | 1 << 15 | 2 << 16 | 1 << 31
        assert sorted(i for i, _ in ring.reap()) == sorted([a, b])
    else:
        assert sorted(vq2.inflight_heads()) == sorted([a, b])
        assert vq2.get_base() == 2 | 1 << 15 | 0 << 16 | 1 << 31
        for _ in range(2):
            c = vq2.pop()
            vq2.push(c.head, 16)
        assert sorted(i for i, _ in ring.reap()) == sorted([a, b])
    h = region.header()
    assert (h["used_idx"], h["old_used_idx"]) == (2, 2)
    vq2.close()
    mem.close()


HOSTILE = {
    "id out of range": lambda r, h: r.set_desc(h[0], id=NUM),
    "length zero": lambda r, h: r.set_desc(h[0], num=0),
    "longer than the ring": lambda r, h: r.set_desc(h[0], num=NUM + 1),
    "link out of range": lambda r, h: r.set_desc(h[0], num=2, next=NUM + 3),
    "last entry wrong": lambda r, h: r.set_desc(h[0], last=(r.desc(h[0])["last"] + 1) % NUM),
    "unknown inflight state": lambda r, h: r.set_desc(h[0], inflight=7),
    "an id in flight twice": lambda r, h: r.set_desc(h[1], id=r.desc(h[0])["id"]),
    "two chains share an entry": lambda r, h: r.set_desc(h[1], num=2, next=h[0], last=h[0]),
    "desc_num differs": lambda r, h: r.set_header(desc_num=NUM * 2),
    "split layout": lambda r, h: r.set_header(features=0),
    "used slot out of range": lambda r, h: r.set_header(old_used_idx=NUM, used_idx=NUM),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_corrupt_packed_region_is_refused_and_the_queue_does_not_start(ram, region, case):
    """Two one-descriptor chains in flight at the crash; the region then breaks one rule."""
    ring = PackedRing(ram, NUM)
    buf = ram.alloc(64)
    mem = ram.memory()
    vq = start(ring, mem, region)
    ring.add_chain((), [(buf, 16)])
    ring.add_chain((), [(buf + 16, 16)])
    vq.pop(), vq.pop()
    _crash(vq)
    heads = [i for i in range(NUM) if region.desc(i)["inflight"]]
    assert len(heads) == 2
    HOSTILE[case](region, heads)
    vq2 = Virtqueue(0)
    ring.setup(vq2)
    vq2.set_inflight(region.mm, 0)
    with pytest.raises(VirtqueueError, match="inflight region does not match"):
        vq2.start(mem, None)
    vq2.close()
    mem.close()
