"""The built-in front-end on packed rings (VIRTIO_F_RING_PACKED) against real back-ends.

The C driver ring (csrc/driver.c) lays out a packed ring when the feature is
acked; these tests drive blk through it past many wraps of both counters,
with a size that is not a power of two, out of order (two queues' worth of
requests in flight), and check a back-end's broken used descriptor is caught.
"""
from __future__ import annotations

import os
import struct

import pytest

from backends_proc import start_blk
from vhost_user.backends.blk.driver import BlkDriver, BlkRequest, DRIVER_FEATURES as BLK_FEATURES
from vhost_user.backends.blk.request import RequestType, Status
from vhost_user.errors import VirtqueueError
from vhost_user.frontend.driver_ring import PACKED_BASE
from vhost_user.protocol import VirtioFeature

MiB = 1 << 20
PACKED = 1 << VirtioFeature.VIRTIO_F_RING_PACKED


@pytest.mark.parametrize("queue_size", [100, 128, 7])
def test_blk_over_packed_rings_round_trips_past_many_wraps(sockdir, shm_image, queue_size):
    bp = start_blk(sockdir, image=shm_image(16 * MiB))
    try:
        with BlkDriver.connect(bp.socket, features=BLK_FEATURES | PACKED, queue_size=queue_size,
                               slots_per_queue=min(16, queue_size // 3 or 1), max_io=64 << 10) as drv:
            assert drv.fe.has_feature(VirtioFeature.VIRTIO_F_RING_PACKED)
            assert drv.queues[0].ring.packed
            expect = {}
            for rnd in range(6 * queue_size):   # header, data in 1-3 pieces, status
                sector = (rnd * 37) % 2000
                data = os.urandom(4096 * (1 + rnd % 4))
                drv.write(sector * 8, data, split=1 + rnd % 3)
                expect[sector] = data
                for s, d in list(expect.items())[-2:]:
                    assert drv.read(s * 8, len(d), split=1 + s % 2) == d
            base = drv.fe.stop_queue(0)
        # both positions moved; the wrap counters flipped an odd or even number of times
        assert base != PACKED_BASE and (base & 0x7FFF) == (base >> 16) & 0x7FFF
        assert "packed ring" in bp.log_tail(100)
    finally:
        bp.stop()


def test_blk_over_packed_rings_completes_a_full_queue_in_any_order(sockdir, shm_image):
    bp = start_blk(sockdir, "--io-threads", "2", image=shm_image(16 * MiB))
    try:
        with BlkDriver.connect(bp.socket, features=BLK_FEATURES | PACKED, queue_size=64,
                               slots_per_queue=16, max_io=256 << 10) as drv:
            pattern = os.urandom(256 << 10)
            drv.write(0, pattern)
            for _ in range(20):
                heads = {drv.submit(BlkRequest(RequestType.IN, 8 * k, read_len=(4096 if k % 2 else 256 << 10)))
                         : k for k in range(16)}
                done = []
                while len(done) < 16:
                    done += drv.complete(0)
                assert sorted(h for h, _, _ in done) == sorted(heads)
                for h, status, data in done:
                    k = heads[h]
                    assert status == Status.OK
                    want = (pattern[8 * 512 * k:8 * 512 * k + 4096] if k % 2 else
                            (pattern + bytes(256 << 10))[4096 * k:4096 * k + (256 << 10)])
                    assert data == want[:len(data)] and len(data) == len(want)
    finally:
        bp.stop()


def test_a_used_descriptor_with_an_id_not_in_flight_breaks_the_driver_queue(sockdir, shm_image):
    """The driver copies and checks each used descriptor: a device writing an id that is
    not in flight (here: written by hand at the driver's used slot) breaks the queue."""
    bp = start_blk(sockdir, image=shm_image(16 * MiB))
    try:
        with BlkDriver.connect(bp.socket, features=BLK_FEATURES | PACKED, queue_size=16) as drv:
            drv.read(0, 4096)
            ring = drv.queues[0].ring
            q = ring.native
            drv.fe.stop_queue(0)
            ring.add([(drv.fe.ram.alloc(16), 16, False)])   # one chain in flight
            flags = (1 << 7 | 1 << 15) if q.used_wrap else 0
            drv.fe.ram.write(ring.desc_gpa + 16 * q.used_slot + 8, struct.pack("<IHH", 0, 9, flags))
            with pytest.raises(VirtqueueError, match="id 9 is not an in-flight chain head"):
                ring.reap()
            assert ring.broken
    finally:
        bp.stop()
