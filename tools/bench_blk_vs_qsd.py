#!/usr/bin/env python3
"""Side-by-side benchmark: our vhost-user-blk against qemu-storage-daemon.

Both back-ends serve the same raw file (in /dev/shm, or in --dir) and are
driven by the same built-in front-end (`vhost-user-bench`, C driver loop).
Runs are interleaved (ours, peer, ours, peer, ...) so drift on the machine
hits both alike, and the report gives ratios. Back-end CPU time per request
comes from /proc. `--compare ARGS` runs ours a second time in every round
with those extra options (say `--no-mmap`), reported as its own rows.

    python3 tools/bench_blk_vs_qsd.py [--runtime 5] [--rounds 2] [--qsd-aio io_uring] [--io-threads N]
        [--dir DIR] [--compare ARGS] [--markdown]
"""

from __future__ import annotations

import argparse
import functools
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from vhost_user.backends.blk.bench import BlkBenchSpec, run_blk_bench

CASES = [
    # (label, rw, block size, iodepth, queues)
    ("4k randread QD1", "randread", 4096, 1, 1),
    ("4k randread QD32", "randread", 4096, 32, 1),
    ("4k randread QD128", "randread", 4096, 128, 1),
    ("4k randwrite QD32", "randwrite", 4096, 32, 1),
    ("1M seq read QD8", "read", 1 << 20, 8, 1),
    ("4k randread QD32, 2 queues", "randread", 4096, 32, 2),
]


def _wait_socket(path: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 20
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"back-end did not start: {proc.args}")
        time.sleep(0.02)


OURS_EXTRA: list[str] = []


def start_ours(d: str, image: str, queues: int, extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    sock = os.path.join(d, "ours.sock")
    proc = subprocess.Popen([sys.executable, "-m", "vhost_user.backends.blk", "--socket", sock,
                             "--image", image, "--num-queues", str(queues), "--queue-size", "512",
                             *OURS_EXTRA, *extra],
                            stderr=subprocess.DEVNULL)
    _wait_socket(sock, proc)
    return proc, sock


QSD_AIO = "threads"


def start_qsd(d: str, image: str, queues: int) -> tuple[subprocess.Popen, str]:
    sock = os.path.join(d, "qsd.sock")
    qsd = shutil.which("qemu-storage-daemon")
    if not qsd:
        raise SystemExit("qemu-storage-daemon is not installed (tools/install-test-deps.sh)")
    proc = subprocess.Popen([
        qsd, "--blockdev", f"driver=file,node-name=f,filename={image},cache.direct=off,aio={QSD_AIO}",
        "--export", f"type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={sock},"
                    f"writable=on,num-queues={queues}",
    ], stderr=subprocess.DEVNULL)
    _wait_socket(sock, proc)
    return proc, sock


def measure(starter, d, image, rw, bs, qd, queues, runtime):
    proc, sock = starter(d, image, queues)
    try:
        return run_blk_bench(BlkBenchSpec(socket=sock, rw=rw, block_size=bs, iodepth=qd,
                                          queues=queues, runtime=runtime, queue_size=512,
                                          pid=proc.pid))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if os.path.exists(sock):
            os.unlink(sock)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runtime", type=float, default=5.0, help="seconds per run")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds per case")
    ap.add_argument("--size", type=int, default=1 << 30, help="image size in bytes")
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    ap.add_argument("--qsd-aio", choices=["threads", "io_uring"], default="threads",
                    help="qemu-storage-daemon's I/O engine (its default is threads)")
    ap.add_argument("--case", action="append", choices=[c[0] for c in CASES], metavar="LABEL",
                    help="run only this case (repeatable; default all): " + ", ".join(c[0] for c in CASES))
    ap.add_argument("--io-threads", type=int, metavar="N",
                    help="our back-end's --io-threads (default: its own default)")
    ap.add_argument("--dir", default="/dev/shm",
                    help="where the image lives (default /dev/shm; a directory on a disk file "
                         "system gives page-cached reads of a regular file)")
    ap.add_argument("--compare", metavar="ARGS",
                    help="also run ours with these extra options in every round (e.g. --no-mmap)")
    args = ap.parse_args()
    global QSD_AIO
    QSD_AIO = args.qsd_aio
    if args.io_threads is not None:
        OURS_EXTRA[:] = ["--io-threads", str(args.io_threads)]

    d = tempfile.mkdtemp(prefix="vu-bench-", dir=args.dir)
    compare = tuple(shlex.split(args.compare)) if args.compare else None
    image = os.path.join(d, "disk.img")
    with open(image, "wb") as f:  # fully allocated so reads hit real pages
        chunk = os.urandom(1 << 20)
        for _ in range(args.size >> 20):
            f.write(chunk)
    rows = []
    try:
        for label, rw, bs, qd, queues in [c for c in CASES if not args.case or c[0] in args.case]:
            ours, peer, other = [], [], []
            for _ in range(args.rounds):
                ours.append(measure(start_ours, d, image, rw, bs, qd, queues, args.runtime))
                peer.append(measure(start_qsd, d, image, rw, bs, qd, queues, args.runtime))
                if compare:
                    other.append(measure(functools.partial(start_ours, extra=compare),
                                         d, image, rw, bs, qd, queues, args.runtime))
            rows.append((label, ours, peer))
            if compare:
                rows.append((f"{label}, ours {args.compare}", other, peer))
            for name, rs in (("ours", ours), (f"ours {args.compare}", other)):
                if rs:
                    o_iops = statistics.median(r.iops for r in rs)
                    p_iops = statistics.median(r.iops for r in peer)
                    print(f"{label}: {name} {o_iops:,.0f} IOPS, qsd {p_iops:,.0f} IOPS, "
                          f"ratio {o_iops / p_iops:.2f}", file=sys.stderr)
    finally:
        shutil.rmtree(d, ignore_errors=True)

    if args.markdown:
        print("| case | ours IOPS | qsd IOPS | IOPS ratio | ours p99 µs | qsd p99 µs "
              "| ours CPU µs/req | qsd CPU µs/req | CPU ratio |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, ours, peer in rows:
        med = lambda rs, f: statistics.median(getattr(r, f) for r in rs)  # noqa: E731
        o, p = med(ours, "iops"), med(peer, "iops")
        oc, pc = med(ours, "backend_cpu_us_per_request"), med(peer, "backend_cpu_us_per_request")
        cells = [label, f"{o:,.0f}", f"{p:,.0f}", f"{o / p:.2f}x",
                 f"{med(ours, 'p99_us'):.1f}", f"{med(peer, 'p99_us'):.1f}",
                 f"{oc:.2f}", f"{pc:.2f}", f"{oc / pc:.2f}x"]
        print("| " + " | ".join(cells) + " |" if args.markdown else "  ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
