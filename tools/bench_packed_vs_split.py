#!/usr/bin/env python3
"""Packed against split virtqueues on the same work, side by side in one run.

blk: our vhost-user-blk on a tmpfs image, driven by the built-in front-end's C
loop (`vhost-user-bench blk`, with and without `--packed`), a fresh connection
per run, split and packed taking turns round by round. net: one
vhost-user-net process per layout, two ports each, and `run_net_bench`
alternates them in slices (the other one stopped meanwhile). Prints medians,
the packed/split ratio and the machine's load average when the run ended.

    python3 tools/bench_packed_vs_split.py [--runtime 3] [--rounds 3] [--markdown]
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from vhost_user.backends.blk.bench import BlkBenchSpec, run_blk_bench
from vhost_user.backends.net.bench import run_net_bench

BLK_CASES = [
    # (label, rw, block size, iodepth)
    ("blk 4k randread QD32", "randread", 4096, 32),
    ("blk 4k randwrite QD32", "randwrite", 4096, 32),
    ("blk 1M seq read QD8", "read", 1 << 20, 8),
]


def _start(argv: list[str], sock: str) -> subprocess.Popen:
    proc = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while not os.path.exists(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"back-end did not start: {' '.join(argv)}")
        time.sleep(0.02)
    return proc


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def blk_rows(d: str, runtime: float, rounds: int, size: int) -> list[tuple]:
    image = os.path.join(d, "disk.img")
    with open(image, "wb") as f:     # allocated, so reads hit real pages
        chunk = os.urandom(1 << 20)
        for _ in range(size >> 20):
            f.write(chunk)
    sock = os.path.join(d, "blk.sock")
    proc = _start([sys.executable, "-m", "vhost_user.backends.blk", "--socket", sock,
                   "--image", image, "--queue-size", "512"], sock)
    rows = []
    try:
        for label, rw, bs, qd in BLK_CASES:
            runs = {False: [], True: []}
            for _ in range(rounds):
                for packed in (False, True):
                    runs[packed].append(run_blk_bench(BlkBenchSpec(
                        socket=sock, rw=rw, block_size=bs, iodepth=qd, runtime=runtime,
                        queue_size=512, pid=proc.pid, packed=packed)))
            med = lambda rs, f: statistics.median(getattr(r, f) for r in rs)  # noqa: E731
            rows.append((label, "IOPS", med(runs[False], "iops"), med(runs[True], "iops"),
                         med(runs[False], "backend_cpu_us_per_request") * 1000,
                         med(runs[True], "backend_cpu_us_per_request") * 1000, "ns/req"))
            print(f"{label}: split {rows[-1][2]:,.0f}, packed {rows[-1][3]:,.0f} IOPS", file=sys.stderr)
    finally:
        _stop(proc)
    return rows


def net_rows(d: str, runtime: float, rounds: int) -> list[tuple]:
    # one vhost-user-net process per layout (a switch learns the sink's MAC on one port)
    procs, pairs = [], []
    try:
        for name in ("split", "packed"):
            socks = [os.path.join(d, f"{name}{i}.sock") for i in range(2)]
            procs.append(_start([sys.executable, "-m", "vhost_user.backends.net", "--socket", socks[0],
                                 "--socket", socks[1]], socks[1]))
            pairs.append((socks[0], socks[1]))
        stats = run_net_bench(pairs, frame_sizes=(64, 1500), pids=[p.pid for p in procs],
                              labels=["split", "packed"], runtime=runtime * rounds, rounds=rounds,
                              packed=[False, True], pause_others=True)
    finally:
        for proc in procs:
            _stop(proc)
    rows = []
    for size in (64, 1500):
        s, p = (next(st for st in stats if st["label"] == lab and st["frame_size"] == size)
                for lab in ("split", "packed"))
        rows.append((f"net {size}-byte frames", "frames/s", s["pps"], p["pps"],
                     s["cpu_ns_per_frame"], p["cpu_ns_per_frame"], "ns/frame"))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runtime", type=float, default=3.0, help="seconds per run")
    ap.add_argument("--rounds", type=int, default=3, help="turns of each layout per case")
    ap.add_argument("--size", type=int, default=256 << 20, help="blk image bytes")
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = ap.parse_args()
    d = tempfile.mkdtemp(prefix="vu-packed-", dir="/dev/shm")
    try:
        rows = blk_rows(d, args.runtime, args.rounds, args.size) + net_rows(d, args.runtime, args.rounds)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    if args.markdown:
        print("| case | split | packed | packed/split | split CPU | packed CPU | CPU packed/split |")
        print("|---|---:|---:|---:|---:|---:|---:|")
    for label, unit, s, p, sc, pc, cunit in rows:
        cells = [label, f"{s:,.0f} {unit}", f"{p:,.0f} {unit}", f"{p / s:.2f}x",
                 f"{sc:,.0f} {cunit}", f"{pc:,.0f} {cunit}", f"{pc / sc:.2f}x"]
        print("| " + " | ".join(cells) + " |" if args.markdown else "  ".join(cells))
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
