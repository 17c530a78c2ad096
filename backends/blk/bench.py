"""`vhost-user-bench blk`: random or sequential I/O at a fixed depth, driven in C.

Each queue gets one thread that runs the driver-side loop (driver_ring, GIL
released); given the back-end's pid, its CPU time per request is read from /proc.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass

from vhost_user.cli import parse_size
from vhost_user.frontend.bench import process_cpu_seconds
from .driver_load import bench_area_size, run_blk_load

from vhost_user.protocol import VirtioFeature

from .driver import DRIVER_FEATURES, BlkDriver

__all__ = ["BlkBenchReport", "BlkBenchSpec", "add_arguments", "run", "run_blk_bench"]


def add_arguments(p) -> None:
    """The options of `vhost-user-bench blk`."""
    p.add_argument("--socket", "-s", required=True, help="back-end socket path")
    p.add_argument("--rw", default="randread", choices=sorted(_PATTERNS))
    p.add_argument("--bs", type=parse_size, default=4096, help="block size (default 4k)")
    p.add_argument("--iodepth", type=int, default=32, help="requests in flight per queue")
    p.add_argument("--queues", type=int, default=1, help="queues driven at once")
    p.add_argument("--runtime", type=float, default=5.0, help="seconds")
    p.add_argument("--queue-size", type=int, default=256)
    p.add_argument("--pid", type=int, help="back-end pid, to report its CPU time per request")
    p.add_argument("--packed", action="store_true",
                   help="packed virtqueues (VIRTIO_F_RING_PACKED) instead of split ones")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


_PATTERNS = {
    "randread": (False, True),
    "randwrite": (True, True),
    "read": (False, False),
    "write": (True, False),
}


@dataclass
class BlkBenchSpec:
    socket: str
    rw: str = "randread"
    block_size: int = 4096
    iodepth: int = 32
    queues: int = 1
    runtime: float = 5.0
    queue_size: int = 256
    pid: int | None = None
    seed: int = 1
    packed: bool = False


@dataclass
class BlkBenchReport:
    rw: str
    block_size: int
    iodepth: int
    queues: int
    requests: int
    errors: int
    elapsed_s: float
    iops: float
    mb_s: float
    p50_us: float
    p99_us: float
    backend_cpu_s: float | None
    backend_cpu_us_per_request: float | None

    def line(self) -> str:
        cpu = (f"  backend cpu {self.backend_cpu_us_per_request:.2f} us/req"
               if self.backend_cpu_us_per_request is not None else "")
        return (f"{self.rw} bs={self.block_size} qd={self.iodepth} queues={self.queues}: "
                f"{self.iops:,.0f} IOPS  {self.mb_s:,.1f} MB/s  p50 {self.p50_us:.1f} us  "
                f"p99 {self.p99_us:.1f} us  errors {self.errors}{cpu}")


def run_blk_bench(spec: BlkBenchSpec) -> BlkBenchReport:
    """Connect, run the pattern on every queue at once, disconnect."""
    if spec.rw not in _PATTERNS:
        raise ValueError(f"unknown pattern {spec.rw!r}; choose from {', '.join(_PATTERNS)}")
    write, random = _PATTERNS[spec.rw]
    qd = min(spec.iodepth, spec.queue_size // 3)
    ram = spec.queues * bench_area_size(spec.block_size, qd) + (32 << 20)
    ram = -(-ram // (2 << 20)) * (2 << 20)
    features = DRIVER_FEATURES | ((1 << VirtioFeature.VIRTIO_F_RING_PACKED) if spec.packed else 0)
    driver = BlkDriver.connect(spec.socket, num_queues=spec.queues, queue_size=spec.queue_size,
                               ram_size=ram, max_io=4096, slots_per_queue=1, features=features)
    if spec.packed and not driver.fe.has_feature(VirtioFeature.VIRTIO_F_RING_PACKED):
        driver.close()
        raise ValueError("the back-end does not offer packed virtqueues")
    try:
        capacity = driver.config.capacity if driver.config else 0
        if capacity * 512 < spec.block_size:
            raise ValueError("device too small for the block size")
        # Region 0 starts at GPA 0, so a GPA in it is also its offset in the ring's area.
        area = [driver.fe.ram.alloc(bench_area_size(spec.block_size, qd), 4096)
                for _ in range(spec.queues)]
        results = [None] * spec.queues
        errors: list[BaseException] = []

        def one(q: int) -> None:
            try:
                results[q] = run_blk_load(
                    driver.queues[q].ring,
                    write=write, block_size=spec.block_size, queue_depth=qd, random=random,
                    capacity_sectors=capacity, data_offset=area[q],
                    duration_s=spec.runtime, seed=spec.seed + q)
            except BaseException as exc:  # reported below, after all threads end
                errors.append(exc)

        cpu0 = process_cpu_seconds(spec.pid) if spec.pid else None
        threads = [threading.Thread(target=one, args=(q,)) for q in range(spec.queues)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - t0
        cpu = process_cpu_seconds(spec.pid) - cpu0 if spec.pid else None
        if errors:
            raise errors[0]
    finally:
        driver.close()
    requests = sum(r.requests for r in results)
    total_bytes = sum(r.bytes for r in results)
    return BlkBenchReport(
        rw=spec.rw, block_size=spec.block_size, iodepth=qd, queues=spec.queues,
        requests=requests, errors=sum(r.errors for r in results), elapsed_s=elapsed,
        iops=requests / elapsed, mb_s=total_bytes / elapsed / 1e6,
        p50_us=max(r.p50_us for r in results), p99_us=max(r.p99_us for r in results),
        backend_cpu_s=cpu,
        backend_cpu_us_per_request=(cpu / requests * 1e6) if cpu is not None and requests else None,
    )


def run(args) -> int:
    """Run `vhost-user-bench blk` with its parsed options; the exit code."""
    spec = BlkBenchSpec(socket=args.socket, rw=args.rw, block_size=args.bs, iodepth=args.iodepth,
                        queues=args.queues, runtime=args.runtime, queue_size=args.queue_size,
                        pid=args.pid, packed=args.packed)
    report = run_blk_bench(spec)
    print(json.dumps(asdict(report)) if args.json else report.line())
    return 0 if report.errors == 0 else 1
