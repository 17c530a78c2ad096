"""Inflight I/O tracking (vhost-user.rst, "Inflight I/O tracking", split rings)."""
from __future__ import annotations

import mmap
import os
import struct

import pytest

from ringlayout import SplitRing, wait_for
from vhost_user.errors import VirtqueueError
from vhost_user.backends.blk.engine import BlkEngine
from vhost_user.virtqueue import Virtqueue, inflight_queue_size

HDR = struct.Struct("<QHHHH")
DESC = struct.Struct("<B5xHQ")
NUM = 8


class Region:
    """Reads the QueueRegionSplit the back-end maintains."""

    def __init__(self, queues: int = 1):
        self.size = inflight_queue_size(NUM)
        self.fd = os.memfd_create("inflight", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, self.size * queues)
        self.mm = mmap.mmap(self.fd, self.size * queues)

    def header(self, q: int = 0):
        features, version, desc_num, last_batch_head, used_idx = HDR.unpack_from(self.mm, q * self.size)
        return dict(version=version, desc_num=desc_num, last_batch_head=last_batch_head, used_idx=used_idx)

    def desc(self, i: int, q: int = 0):
        inflight, nxt, counter = DESC.unpack_from(self.mm, q * self.size + 16 + 16 * i)
        return inflight, nxt, counter

    def set_desc(self, i: int, inflight: int, q: int = 0):
        nxt, counter = self.desc(i, q)[1:]
        DESC.pack_into(self.mm, q * self.size + 16 + 16 * i, inflight, nxt, counter)

    def set_used_idx(self, v: int, q: int = 0):
        struct.pack_into("<H", self.mm, q * self.size + 14, v)

    def inflight(self, q: int = 0) -> list[int]:
        return [i for i in range(NUM) if self.desc(i, q)[0]]

    def close(self):
        self.mm.close()
        os.close(self.fd)


@pytest.fixture
def region():
    r = Region(queues=2)
    yield r
    r.close()


def new_queue(ring, mem, region, base=None, handler=None, offset=0, kick=None):
    vq = Virtqueue(0)
    ring.setup(vq)
    if base is not None:
        vq.set_base(base)
    if kick is not None:
        vq.set_kick(kick)
    vq.set_inflight(region.mm, offset)
    vq.start(mem, handler)
    return vq


def _three_popped(ram, region):
    """A started queue with three one-buffer chains published and popped (none pushed):
    (ring, memory, queue, their heads, the popped chains)."""
    ring = SplitRing(ram, NUM)
    buf = ram.alloc(16)
    mem = ram.memory()
    vq = new_queue(ring, mem, region)
    heads = [ring.add_chain([(buf, 16)]) for _ in range(3)]
    ring.publish(*heads)
    chains = [vq.pop() for _ in range(3)]
    return ring, mem, vq, heads, chains


def test_inflight_region_initialised_on_first_start(ram, region):
    ring = SplitRing(ram, NUM)
    mem = ram.memory()
    vq = new_queue(ring, mem, region, offset=region.size)
    assert region.header(1) == dict(version=1, desc_num=NUM, last_batch_head=0, used_idx=0)
    assert region.header(0)["version"] == 0  # the other queue's slice is untouched
    vq.close()
    mem.close()


def test_inflight_set_at_pop_cleared_at_push(ram, region):
    ring, mem, vq, heads, chains = _three_popped(ram, region)
    assert region.inflight() == sorted(heads)
    assert [region.desc(h)[2] for h in heads] == [0, 1, 2]
    vq.push(chains[1].head, 0)
    assert region.inflight() == sorted([heads[0], heads[2]])
    hdr = region.header()
    assert hdr["last_batch_head"] == heads[1] and hdr["used_idx"] == 1
    vq.close()
    mem.close()


def test_inflight_listed_and_resubmitted_after_crash(ram, region):
    ring = SplitRing(ram, NUM)
    buf = ram.alloc(16)
    mem = ram.memory()
    vq = new_queue(ring, mem, region)
    heads = [ring.add_chain([(buf, 16)]) for _ in range(4)]
    ring.publish(*heads[:3])
    a, b, c = (vq.pop() for _ in range(3))
    vq.push(b.head, 0)
    vq.close()  # "crash": a and c never completed
    ring.publish(heads[3])
    # The front-end restarts us with base = used->idx (GET_VRING_BASE failed).
    vq2 = new_queue(ring, mem, region, base=ring.used_idx)
    assert vq2.inflight_heads() == [a.head, c.head]
    assert vq2.get_base() == 3  # used_idx + inflight count
    order = [vq2.pop().head for _ in range(3)]
    assert order == [a.head, c.head, heads[3]]
    assert vq2.pop() is None
    for h in order:
        vq2.push(h, 0)
    assert region.inflight() == []
    vq2.close()
    mem.close()


def test_inflight_recovers_batch_interrupted_after_used_idx(ram, region):
    ring, mem, vq, heads, chains = _three_popped(ram, region)
    vq.push(chains[0].head, 0)
    vq.push(chains[1].head, 0)
    vq.close()
    # Simulate a crash right after the used->idx store of the last push:
    # its inflight flag and the region's used_idx were not updated yet.
    region.set_desc(chains[1].head, 1)
    region.set_used_idx(1)
    vq2 = new_queue(ring, mem, region, base=ring.used_idx)
    assert vq2.inflight_heads() == [chains[2].head]
    assert region.header()["used_idx"] == 2
    vq2.close()
    mem.close()


def test_inflight_region_too_small_rejected(ram):
    ring = SplitRing(ram, NUM)
    mem = ram.memory()
    vq = Virtqueue(0)
    ring.setup(vq)
    small = mmap.mmap(-1, 64)
    vq.set_inflight(small, 0)
    with pytest.raises(VirtqueueError, match="inflight"):
        vq.start(mem)
    assert not vq.started
    vq.close()
    small.close()
    mem.close()


def test_inflight_blk_engine_resubmits_before_new_requests(ram, region, tmp_path):
    disk = os.memfd_create("disk", os.MFD_CLOEXEC)
    os.ftruncate(disk, 1 << 20)
    ring = SplitRing(ram, NUM)
    mem = ram.memory()

    def write_req(sector, byte):
        req, st = ram.alloc(16 + 512), ram.alloc(1)  # header and data in one descriptor
        ram.write(req, struct.pack("<IIQ", 1, 0, sector) + bytes([byte]) * 512)
        return ring.add_chain([(req, 16 + 512)], [(st, 1)])

    vq = new_queue(ring, mem, region)
    ring.publish(write_req(0, 0x11), write_req(1, 0x22))
    assert vq.pop() is not None and vq.pop() is not None  # popped, never done
    vq.close()
    ring.publish(write_req(2, 0x33))
    kick = os.eventfd(0, os.EFD_CLOEXEC)
    engine = BlkEngine(disk, (1 << 20) // 512)
    vq2 = new_queue(ring, mem, region, base=ring.used_idx, handler=engine, kick=os.dup(kick))
    wait_for(lambda: ring.used_idx == 3)
    assert [u[0] for u in ring.reap()] == [0, 2, 4]  # resubmitted heads first
    assert os.pread(disk, 1536, 0) == b"\x11" * 512 + b"\x22" * 512 + b"\x33" * 512
    assert region.inflight() == []
    vq2.close()
    mem.close()
    os.close(kick)
    os.close(disk)
