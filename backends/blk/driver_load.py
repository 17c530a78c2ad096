"""The virtio-blk request load of the built-in front-end, in C (driver_blk.c), GIL released.

The Python side of backends/blk/driver_blk.c: `run_blk_load` keeps a queue
full of 3-descriptor requests on a `DriverQueue` and returns what it measured.
"""
from __future__ import annotations

from dataclasses import dataclass
from vhost_user._driver import ffi, lib
from vhost_user.frontend.driver_ring import DriverQueue, u32

__all__ = ["BenchResult", "bench_area_size", "run_blk_load"]


@dataclass(frozen=True)
class BenchResult:
    """What one `run_blk_load` call measured. mb_s is 10**6 bytes per second."""

    requests: int
    bytes: int
    errors: int
    elapsed_s: float
    iops: float
    mb_s: float
    p50_us: float
    p99_us: float
    kicks: int
    wakeups: int
    mean_us: float = 0.0
    max_us: float = 0.0


def bench_area_size(block_size: int, queue_depth: int) -> int:
    """Bytes `run_blk_load` needs at data_offset: per slot a 4 KiB-aligned data
    buffer, then per slot 32 bytes holding the 16-byte header and status byte."""
    return lib.drv_bench_area_size(u32(block_size, "block_size"), u32(queue_depth, "queue_depth"))


def run_blk_load(
    ring: DriverQueue,
    *,
    write: bool,
    block_size: int,
    queue_depth: int,
    random: bool,
    capacity_sectors: int,
    data_offset: int,
    duration_s: float | None = None,
    requests: int | None = None,
    seed: int = 0,
    spin_us: float = 0.0,
    stall_timeout_s: float = 10.0,
) -> BenchResult:
    """Runs a virtio-blk load in C with the GIL released: keeps `queue_depth`
    3-descriptor requests (header, data, status) in flight, resubmitting on
    completion, until `requests` were submitted and/or `duration_s` passed,
    then drains. Slot buffers take `bench_area_size(block_size,
    queue_depth)` bytes at `data_offset` in the area. Spins on the used
    ring `spin_us` before blocking on the call eventfd; raises TimeoutError
    when nothing completes for `stall_timeout_s`.
    """
    if duration_s is None and requests is None:
        raise ValueError("give duration_s, requests, or both")
    if ring.in_flight:
        raise ValueError(f"{ring.in_flight} chains still in flight; reap them first")
    if 3 * queue_depth > ring.size:
        raise ValueError(f"queue depth {queue_depth} needs {3 * queue_depth} descriptors, queue has {ring.size}")
    p = ffi.new(
        "struct drv_bench_params *",
        {
            "write": bool(write),
            "block_size": u32(block_size, "block_size"),
            "queue_depth": u32(queue_depth, "queue_depth"),
            "random": bool(random),
            "capacity_sectors": capacity_sectors,
            "data_offset": data_offset,
            "duration_ns": int((duration_s or 0) * 1e9),
            "requests": requests or 0,
            "seed": seed & (2**64 - 1),
            "spin_ns": int(spin_us * 1e3),
            "stall_timeout_ns": max(1, int(stall_timeout_s * 1e9)),
        },
    )
    s = ffi.new("struct drv_bench_stats *")
    ring.check(lib.drv_blk_bench(ring.native, p, s), "blk bench")
    return _bench_result(s)


def _bench_result(s) -> BenchResult:
    elapsed = s.elapsed_ns / 1e9
    rate = (lambda x: x / elapsed) if elapsed > 0 else (lambda x: 0.0)
    return BenchResult(
        requests=s.requests,
        bytes=s.bytes,
        errors=s.errors,
        elapsed_s=elapsed,
        iops=rate(s.requests),
        mb_s=rate(s.bytes) / 1e6,
        p50_us=lib.drv_hist_percentile(s.hist, s.lat_max_ns, 0.50) / 1e3,
        p99_us=lib.drv_hist_percentile(s.hist, s.lat_max_ns, 0.99) / 1e3,
        kicks=s.kicks,
        wakeups=s.wakeups,
        mean_us=(s.lat_sum_ns / s.requests / 1e3) if s.requests else 0.0,
        max_us=s.lat_max_ns / 1e3,
    )
