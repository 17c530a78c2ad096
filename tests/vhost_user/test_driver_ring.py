"""Driver-side split virtqueue (csrc/driver.c via vhost_user.frontend.driver_ring).

No back-end is needed: `FakeDevice` walks the rings from the device side with
plain struct/memoryview on the same memfd mapping, in a thread woken by the
kick eventfd, and signals the call eventfd as a back-end would.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import select
import struct
import threading
import time

import pytest

from vhost_user.backends.blk.driver_load import BenchResult, bench_area_size, run_blk_load
from vhost_user.frontend.driver_ring import DriverQueue, ring_layout
from vhost_user.errors import DescriptorIndexOutOfRange, VirtqueueError

GPA_BASE = 0x4000_0000
AREA_SIZE = 4 << 20
DATA_OFFSET = 1 << 20  # rings below, buffers above
VRING_DESC_F_NEXT, VRING_DESC_F_WRITE = 1, 2
VRING_USED_F_NO_NOTIFY = 1


def need_event(event: int, new: int, old: int) -> bool:
    return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF


class Area:
    """A memfd-backed guest RAM region with kick/call eventfds."""

    def __init__(self, size: int = AREA_SIZE) -> None:
        self.fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self.map = mmap.mmap(self.fd, size)
        self.kick = os.eventfd(0, os.EFD_CLOEXEC)
        self.call = os.eventfd(0, os.EFD_CLOEXEC)

    def queue(self, size: int = 256, *, event_idx: bool = False, base_index: int = 0) -> DriverQueue:
        desc, avail, used, _ = ring_layout(size)
        return DriverQueue(
            self.map, GPA_BASE, size,
            desc_offset=desc, avail_offset=avail, used_offset=used,
            kick_fd=self.kick, call_fd=self.call, event_idx=event_idx, base_index=base_index,
        )

    def close(self) -> None:
        self.map.close()
        for fd in (self.fd, self.kick, self.call):
            os.close(fd)


class FakeDevice(threading.Thread):
    """Device side of one split queue, written from the spec (2.7) in Python.

    `handler(chain) -> (used_len, delay_s)` serves one chain of
    (gpa, len, flags) tuples; the default echoes and reports the writable bytes.
    """

    def __init__(self, area: Area, q: DriverQueue, *, event_idx=False, base_index=0, handler=None):
        super().__init__(daemon=True)
        self.mem = memoryview(area.map)
        self.area, self.size, self.event_idx = area, q.size, event_idx
        self.desc = q.desc_gpa - GPA_BASE
        self.avail = q.avail_gpa - GPA_BASE
        self.used = q.used_gpa - GPA_BASE
        self.last_avail = self.used_idx = base_index
        self.handler = handler or (lambda chain: (sum(n for _, n, f in chain if f & VRING_DESC_F_WRITE), 0))
        self.chains: list[list[tuple[int, int, int]]] = []
        self.stop = threading.Event()
        self.failure: BaseException | None = None

    def _store_u16(self, offset: int, value: int) -> None:
        """One 16-bit store, as a device must publish an index (struct writes byte by byte,
        so the driver could see a torn index)."""
        ctypes.c_uint16.from_buffer(self.area.map, offset).value = value

    def u16(self, off: int) -> int:
        return struct.unpack_from("<H", self.mem, off)[0]

    def walk(self, head: int) -> list[tuple[int, int, int]]:
        chain, i = [], head
        for _ in range(self.size):
            addr, length, flags, nxt = struct.unpack_from("<QIHH", self.mem, self.desc + 16 * i)
            chain.append((addr, length, flags))
            if not flags & VRING_DESC_F_NEXT:
                return chain
            i = nxt
        raise AssertionError("descriptor loop")

    def serve_pending(self) -> None:
        old_used = self.used_idx
        while True:
            avail_idx = self.u16(self.avail + 2)
            while self.last_avail != avail_idx:
                head = self.u16(self.avail + 4 + 2 * (self.last_avail % self.size))
                chain = self.walk(head)
                self.chains.append(chain)
                used_len, delay = self.handler(chain)
                if delay:
                    time.sleep(delay)
                struct.pack_into("<II", self.mem, self.used + 4 + 8 * (self.used_idx % self.size), head, used_len)
                self.used_idx = (self.used_idx + 1) & 0xFFFF
                self._store_u16(self.used + 2, self.used_idx)
                self.last_avail = (self.last_avail + 1) & 0xFFFF
                if delay:
                    os.eventfd_write(self.area.call, 1)
            if self.event_idx:  # 2.7.10: publish avail_event, then re-check avail->idx
                self._store_u16(self.used + 4 + 8 * self.size, self.last_avail)
            if self.u16(self.avail + 2) == self.last_avail:
                break
        if self.used_idx == old_used:
            return
        if self.event_idx:
            notify = need_event(self.u16(self.avail + 4 + 2 * self.size), self.used_idx, old_used)
        else:
            notify = not self.u16(self.avail) & 1  # VRING_AVAIL_F_NO_INTERRUPT
        if notify:
            os.eventfd_write(self.area.call, 1)

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                ready, _, _ = select.select([self.area.kick], [], [], 0.02)
                if ready:
                    os.eventfd_read(self.area.kick)
                    self.serve_pending()
        except BaseException as e:  # surfaced by the test through .failure
            self.failure = e

    def __enter__(self) -> FakeDevice:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.join(5)
        self.mem.release()
        if self.failure:
            raise self.failure


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def area():
    before = open_fds()
    a = Area()
    yield a
    a.close()
    assert open_fds() == before


def reap_all(q: DriverQueue, count: int, timeout: float = 5.0) -> list[tuple[int, int]]:
    got, deadline = [], time.monotonic() + timeout
    while len(got) < count:
        assert time.monotonic() < deadline, f"reaped {len(got)} of {count}"
        got += q.reap()
        if len(got) < count:
            q.wait(0.1)
    return got


def buf(offset: int) -> int:
    return GPA_BASE + DATA_OFFSET + offset


# -- layout and chains ------------------------------------------------------


def test_ring_layout_meets_spec_alignment():
    for size in (1, 2, 256, 32768):
        desc, avail, used, total = ring_layout(size)
        assert desc % 16 == 0 and avail % 2 == 0 and used % 4 == 0
        assert avail >= desc + 16 * size and used >= avail + 6 + 2 * size
        assert total >= used + 6 + 8 * size and total % 4096 == 0
    for bad in (0, 3, 65536):
        with pytest.raises(ValueError):
            ring_layout(bad)


def test_add_chain_lays_out_descriptors_and_avail_entry(area):
    with area.queue(8) as q:
        head = q.add([(buf(0), 16, False), (buf(4096), 512, True), (buf(8192), 1, True)])
        mem = memoryview(area.map)
        desc_off, avail_off = q.desc_gpa - GPA_BASE, q.avail_gpa - GPA_BASE
        i, seen = head, []
        for _ in range(3):
            seen.append(struct.unpack_from("<QIHH", mem, desc_off + 16 * i))
            i = seen[-1][3]
        assert [(a, n) for a, n, _, _ in seen] == [(buf(0), 16), (buf(4096), 512), (buf(8192), 1)]
        assert [f for _, _, f, _ in seen] == [
            VRING_DESC_F_NEXT, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, VRING_DESC_F_WRITE,
        ]
        assert struct.unpack_from("<HHH", mem, avail_off) == (0, 1, head)
        assert q.num_free == 5 and q.in_flight == 1
        assert q.desc_gpa == GPA_BASE + ring_layout(8)[0]
        del mem


def test_add_rejects_bad_chains_without_breaking_queue(area):
    with area.queue(4) as q:
        with pytest.raises(ValueError, match="outside"):
            q.add([(GPA_BASE + AREA_SIZE - 8, 16, False)])
        with pytest.raises(ValueError, match="outside"):
            q.add([(GPA_BASE - 4096, 16, False)])
        with pytest.raises(ValueError, match="precedes"):
            q.add([(buf(0), 16, True), (buf(16), 16, False)])
        with pytest.raises(ValueError, match="free descriptors"):
            q.add([(buf(0), 16, False)] * 5)
        with pytest.raises(ValueError):
            q.add([])
        with pytest.raises(ValueError):
            q.add([(buf(0), 0, False)])
        assert q.num_free == 4 and not q.broken
        q.add([(buf(0), 16, False)])


def test_queue_rejects_bad_ring_placement(area):
    desc, avail, used, total = ring_layout(256)
    common = dict(kick_fd=area.kick, call_fd=area.call, event_idx=False)
    with pytest.raises(ValueError, match="outside"):
        DriverQueue(area.map, GPA_BASE, 256, desc_offset=AREA_SIZE - 64, avail_offset=avail, used_offset=used, **common)
    with pytest.raises(ValueError, match="aligned"):
        DriverQueue(area.map, GPA_BASE, 256, desc_offset=8, avail_offset=avail + 8, used_offset=used, **common)
    with pytest.raises(ValueError, match="outside"):  # overlapping rings
        DriverQueue(area.map, GPA_BASE, 256, desc_offset=0, avail_offset=16, used_offset=used, **common)
    with pytest.raises(ValueError):
        DriverQueue(area.map, GPA_BASE, 100, desc_offset=desc, avail_offset=avail, used_offset=used, **common)


# -- talking to a device ----------------------------------------------------


@pytest.mark.parametrize("event_idx", [False, True])
def test_used_elements_are_reaped_and_descriptors_recycled(area, event_idx):
    with area.queue(16, event_idx=event_idx) as q, FakeDevice(area, q, event_idx=event_idx) as dev:
        for _ in range(10):  # 10 x 5 chains of 3 through a 16-entry table
            batch = [q.add([(buf(0), 16, False), (buf(4096 * k), 512, True), (buf(100), 1, True)]) for k in range(5)]
            q.kick()
            got = reap_all(q, 5)
            assert sorted(h for h, _ in got) == sorted(batch)
            assert all(n == 513 for _, n in got)
        assert q.num_free == 16 and q.in_flight == 0
        assert len(dev.chains) == 50


@pytest.mark.parametrize("event_idx", [False, True])
def test_avail_index_wraps_past_65535(area, event_idx):
    base = 65530
    with (
        area.queue(8, base_index=base, event_idx=event_idx) as q,
        FakeDevice(area, q, base_index=base, event_idx=event_idx) as dev,
    ):
        for i in range(20):
            head = q.add([(buf(64 * i), 64, False)])
            q.kick()
            assert reap_all(q, 1) == [(head, 0)]
        assert dev.last_avail == (base + 20) & 0xFFFF == 14
        assert [c[0][0] for c in dev.chains] == [buf(64 * i) for i in range(20)]


def test_kick_honours_no_notify_flag(area):
    with area.queue(8) as q:
        struct.pack_into("<H", area.map, q.used_gpa - GPA_BASE, VRING_USED_F_NO_NOTIFY)
        q.add([(buf(0), 16, False)])
        assert q.kick() is False
        struct.pack_into("<H", area.map, q.used_gpa - GPA_BASE, 0)
        q.add([(buf(0), 16, False)])
        assert q.kick() is True
        assert os.eventfd_read(area.kick) == 1
        assert q.kick() is False  # nothing new since the last kick


def test_kick_honours_avail_event(area):
    with area.queue(8, event_idx=True) as q:
        avail_event = q.used_gpa - GPA_BASE + 4 + 8 * 8
        struct.pack_into("<H", area.map, avail_event, 5)  # wake me when entry 5 is published
        for _ in range(5):
            q.add([(buf(0), 16, False)])
            assert q.kick() is False
        q.add([(buf(0), 16, False)])
        assert q.kick() is True


def test_wait_times_out_then_sees_used_entry(area):
    with area.queue(8) as q:
        t0 = time.monotonic()
        assert q.wait(0.05) is False
        assert time.monotonic() - t0 >= 0.04
        head = q.add([(buf(0), 16, True)])
        used = q.used_gpa - GPA_BASE
        struct.pack_into("<II", area.map, used + 4, head, 16)
        struct.pack_into("<H", area.map, used + 2, 1)
        assert q.wait(1.0) is True  # found in the ring before blocking
        assert q.reap() == [(head, 16)]


# -- a back-end that breaks the rules ----------------------------------------


def publish_used(area: Area, q: DriverQueue, idx: int, entries: list[tuple[int, int]]) -> None:
    used = q.used_gpa - GPA_BASE
    for k, (head, n) in enumerate(entries):
        struct.pack_into("<II", area.map, used + 4 + 8 * ((idx + k) % q.size), head, n)
    struct.pack_into("<H", area.map, used + 2, (idx + len(entries)) & 0xFFFF)


@pytest.mark.parametrize(
    "entries, error, match",
    [
        ([(8 + 3, 0)], DescriptorIndexOutOfRange, "not below the queue size"),
        ([(0xFFFFFFFF, 0)], DescriptorIndexOutOfRange, "not below the queue size"),
        ([("free", 0)], VirtqueueError, "not an in-flight"),
        ([("head", 0), ("head", 0)], VirtqueueError, "past the chains in flight"),
        ([("second", 0)], VirtqueueError, "not an in-flight"),
    ],
)
def test_buggy_device_used_entry_breaks_queue_cleanly(area, caplog, entries, error, match):
    with area.queue(8) as q:
        head = q.add([(buf(0), 16, False), (buf(16), 16, True)])  # descriptors head, head's next
        second = struct.unpack_from("<H", area.map, q.desc_gpa - GPA_BASE + 16 * head + 14)[0]
        free = 7  # a fresh free list hands out 0, 1, ...
        assert {head, second} == {0, 1}
        ids = {"head": head, "free": free, "second": second}
        publish_used(area, q, 0, [(ids.get(h, h), n) for h, n in entries])
        with pytest.raises(error, match=match):
            q.reap()
        assert q.broken
        assert any(r.levelname == "ERROR" for r in caplog.records)
        with pytest.raises(VirtqueueError, match="broken"):
            q.add([(buf(0), 16, False)])
        with pytest.raises(VirtqueueError, match="broken"):
            q.reap()


def test_closed_queue_refuses_work_and_releases_area(area):
    q = area.queue(8)
    q.close()
    with pytest.raises(ValueError, match="closed"):
        q.add([(buf(0), 16, False)])
    q.close()


# -- blk benchmark loop -------------------------------------------------------

BLOCK = 4096
CAPACITY = 1 << 16  # sectors


class BlkHandler:
    """Serves virtio-blk chains and checks their shape; fails every 7th block."""

    def __init__(self, area: Area, *, write: bool, delay: float = 0.0) -> None:
        self.mem, self.write, self.delay = memoryview(area.map), write, delay
        self.sectors: list[int] = []
        self.failed = 0

    def __call__(self, chain):
        (hdr, hlen, hflags), (data, dlen, dflags), (status, slen, sflags) = chain
        assert (hlen, slen, dlen) == (16, 1, BLOCK)
        assert hflags == VRING_DESC_F_NEXT and sflags == VRING_DESC_F_WRITE
        assert dflags == VRING_DESC_F_NEXT | (0 if self.write else VRING_DESC_F_WRITE)
        assert (data - GPA_BASE) % 4096 == 0
        rtype, _, sector = struct.unpack_from("<IIQ", self.mem, hdr - GPA_BASE)
        assert rtype == (1 if self.write else 0)
        assert sector % (BLOCK // 512) == 0 and sector + BLOCK // 512 <= CAPACITY
        self.sectors.append(sector)
        bad = sector // (BLOCK // 512) % 7 == 0
        self.failed += bad
        self.mem[status - GPA_BASE] = 1 if bad else 0
        return (1 if self.write else BLOCK + 1), self.delay


def run_bench(area: Area, *, event_idx=False, base_index=0, write=False, random=True, delay=0.0, **kw):
    with area.queue(256, event_idx=event_idx, base_index=base_index) as q:
        handler = BlkHandler(area, write=write, delay=delay)
        with FakeDevice(area, q, event_idx=event_idx, base_index=base_index, handler=handler):
            kw.setdefault("queue_depth", 8)
            try:
                result = run_blk_load(
                    q,
                    write=write, block_size=BLOCK, random=random, capacity_sectors=CAPACITY,
                    data_offset=DATA_OFFSET, seed=42, **kw,
                )
            finally:
                handler.mem.release()
        assert q.in_flight == 0 and q.num_free == 256
        return result, handler


@pytest.mark.parametrize("event_idx", [False, True])
@pytest.mark.parametrize("write", [False, True])
def test_bench_completes_requested_count_with_stats(area, event_idx, write):
    result, dev = run_bench(area, event_idx=event_idx, write=write, requests=500, spin_us=5)
    assert isinstance(result, BenchResult)
    assert result.requests == 500 == len(dev.sectors)
    assert result.errors == dev.failed > 0
    assert result.bytes == (500 - dev.failed) * BLOCK
    assert result.elapsed_s > 0 and result.iops == pytest.approx(500 / result.elapsed_s)
    assert result.mb_s == pytest.approx(result.bytes / result.elapsed_s / 1e6)
    assert 0 < result.p50_us <= result.p99_us <= result.max_us * 1.02
    assert result.kicks > 0 and result.wakeups > 0
    assert len(set(dev.sectors)) > 400  # random over 8192 blocks


def test_bench_sequential_walks_blocks_in_order(area):
    result, dev = run_bench(area, random=False, queue_depth=1, requests=20)
    assert result.requests == 20
    assert dev.sectors == [i * (BLOCK // 512) for i in range(20)]


def test_bench_index_wraps_past_65535(area):
    result, _ = run_bench(area, event_idx=True, base_index=65000, requests=1000, queue_depth=16)
    assert result.requests == 1000


def test_bench_by_duration_keeps_running_until_deadline(area):
    result, _ = run_bench(area, duration_s=0.3, queue_depth=4)
    assert result.requests > 10 and result.elapsed_s >= 0.3


def test_bench_latency_percentiles_track_device_delay(area):
    result, _ = run_bench(area, queue_depth=1, requests=30, delay=0.003)
    assert 3000 <= result.p50_us <= 3000 * 3
    assert result.p50_us <= result.p99_us
    assert result.mean_us == pytest.approx(result.p50_us, rel=0.5)


def test_bench_stalled_device_times_out(area):
    with area.queue(64) as q:  # nobody serves the queue
        with pytest.raises(TimeoutError):
            run_blk_load(
                q, write=False, block_size=BLOCK, queue_depth=4, random=True, capacity_sectors=CAPACITY,
                data_offset=DATA_OFFSET, requests=10, seed=1, stall_timeout_s=0.1,
            )
        with pytest.raises(ValueError, match="in flight"):
            run_blk_load(
                q, write=False, block_size=BLOCK, queue_depth=4, random=True, capacity_sectors=CAPACITY,
                data_offset=DATA_OFFSET, requests=10, seed=1,
            )


@pytest.mark.parametrize(
    "override",
    [
        dict(block_size=1000),
        dict(queue_depth=0),
        dict(queue_depth=100),  # 300 descriptors > 256
        dict(capacity_sectors=4),
        dict(data_offset=AREA_SIZE - 4096),
        dict(data_offset=0),  # over the rings
        dict(requests=None),
    ],
)
def test_bench_rejects_bad_parameters(area, override):
    args = dict(
        write=False, block_size=BLOCK, queue_depth=4, random=True, capacity_sectors=CAPACITY,
        data_offset=DATA_OFFSET, requests=10, seed=1,
    )
    args.update(override)
    with area.queue(256) as q:
        with pytest.raises(ValueError):
            run_blk_load(q, **args)
        assert not q.broken


def test_bench_area_size_covers_buffers_and_headers():
    assert bench_area_size(4096, 8) == 8 * 4096 + 8 * 32
    assert bench_area_size(512, 2) == 2 * 4096 + 2 * 32
