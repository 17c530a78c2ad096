#!/usr/bin/env python3
"""Two builds of the back-ends side by side, every device, one run: did a change cost speed?

Each build is a directory holding its `vhost-user-blk`, `-net`, `-vsock` and
`-gpu` programs (a venv's bin/; the default "after" build is the one next to
this interpreter). Both builds serve at the same time and are driven by the
same built-in front-end, taking turns round by round so machine noise hits
both; the table gives each figure of "after" as a ratio to "before", with the
load average of the machine when the run ended. What runs:

* blk: 4 KiB random reads at QD32 and 1 MiB sequential reads at QD4 (one
  queue, a tmpfs image each);
* net: 64 and 1500-byte frames between two ports (`--pause-others`: the
  back-end not measured is stopped during the other's slice);
* vsock: 64 KiB writes guest to host and host to guest (fresh back-ends per
  round, as tools/bench_vsock_backends.py does);
* gpu: 1920x1080 TRANSFER_TO_HOST_2D + RESOURCE_FLUSH cycles.

    git worktree add /tmp/pretree COMMIT
    python3 -m venv --system-site-packages /tmp/prevenv
    /tmp/prevenv/bin/pip install --no-deps /tmp/pretree
    python3 tools/bench_before_after.py --before /tmp/prevenv/bin [--runtime 3] [--rounds 3] [--pin]
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time

from vhost_user.backends.blk.bench import BlkBenchSpec, run_blk_bench
from vhost_user.backends.gpu.bench import run_gpu_bench
from vhost_user.backends.net.bench import run_net_bench
from vhost_user.backends.vsock.bench import run_vsock_bench

DEVICES = ("blk", "net", "vsock", "gpu")


class Build:
    """One build's programs, started on demand and stopped at the end."""

    def __init__(self, label: str, bindir: str, workdir: str, cpu: int | None) -> None:
        self.label, self.bindir, self.cpu = label, bindir, cpu
        self.workdir = os.path.join(workdir, label)
        os.makedirs(self.workdir)
        self.procs: list[subprocess.Popen] = []

    def start(self, program: str, args: list[str], wait_for: list[str]) -> subprocess.Popen:
        cmd = [os.path.join(self.bindir, program), *args]
        if self.cpu is not None:
            cmd = ["taskset", "-c", str(self.cpu), *cmd]
        log = open(os.path.join(self.workdir, program + ".log"), "ab")
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
        log.close()
        deadline = time.monotonic() + 30
        while not all(os.path.exists(p) for p in wait_for):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{self.label}: {' '.join(cmd)} did not come up "
                                 f"(see {self.workdir}/{program}.log)")
            time.sleep(0.05)
        self.procs.append(proc)
        return proc

    def path(self, name: str) -> str:
        return os.path.join(self.workdir, name)

    def stop(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in list(self.procs):
            self.stop(proc)


def _blk(builds, runtime, rounds) -> list[tuple]:
    out = []
    procs = []
    for b in builds:
        image = b.path("disk.img")
        with open(image, "wb") as f:
            f.truncate(256 << 20)
        procs.append(b.start("vhost-user-blk", ["--socket", b.path("blk.sock"), "--image", image],
                             [b.path("blk.sock")]))
    cases = [("4k randread QD32", "randread", 4096, 32), ("1M read QD4", "read", 1 << 20, 4)]
    for name, rw, bs, qd in cases:
        iops = {b.label: [] for b in builds}
        cpu = {b.label: [] for b in builds}
        for _ in range(rounds):
            for b, proc in zip(builds, procs):
                r = run_blk_bench(BlkBenchSpec(socket=b.path("blk.sock"), rw=rw, block_size=bs,
                                               iodepth=qd, runtime=runtime, pid=proc.pid))
                if r.errors:
                    raise SystemExit(f"{b.label}: blk {name}: {r.errors} errors")
                iops[b.label].append(r.iops)
                cpu[b.label].append(r.backend_cpu_us_per_request)
        out.append(("blk", name, "IOPS", iops, "us CPU/req", cpu))
    for b, proc in zip(builds, procs):
        b.stop(proc)
    return out


def _net(builds, runtime, rounds) -> list[tuple]:
    procs, pairs = [], []
    for b in builds:
        a, c = b.path("net-a.sock"), b.path("net-b.sock")
        procs.append(b.start("vhost-user-net", ["--socket", a, "--socket", c], [a, c]))
        pairs.append((a, c))
    try:
        stats = run_net_bench(pairs, pids=[p.pid for p in procs], labels=[b.label for b in builds],
                              runtime=runtime * rounds, rounds=rounds, pause_others=True)
    finally:
        for b, proc in zip(builds, procs):
            b.stop(proc)
    out = []
    for size in (64, 1500):
        pps = {st["label"]: [st["pps"]] for st in stats if st["frame_size"] == size}
        cpu = {st["label"]: [st["cpu_ns_per_frame"]] for st in stats if st["frame_size"] == size}
        out.append(("net", f"{size} B frames", "frames/s", pps, "ns CPU/frame", cpu))
    return out


def _vsock(builds, runtime, rounds) -> list[tuple]:
    mb = {}
    cpu = {}
    for _ in range(rounds):
        for b in builds:
            sock, uds = b.path("vsock.sock"), b.path("vsock.uds")
            for p in (sock, uds):
                if os.path.exists(p):
                    os.unlink(p)
            proc = b.start("vhost-user-vsock", ["--guest-cid", "3", "--socket", sock,
                                                "--uds-path", uds], [sock, uds])
            try:
                reports = run_vsock_bench(sock, uds, write_sizes=(65536,), runtime=runtime,
                                          pid=proc.pid)
            finally:
                b.stop(proc)
            for r in reports:
                key = f"64 KiB {r['direction']}"
                mb.setdefault(key, {x.label: [] for x in builds})[b.label].append(r["mb_s"])
                cpu.setdefault(key, {x.label: [] for x in builds})[b.label].append(
                    r["backend_mb_per_cpu_s"])
    return [("vsock", key, "MB/s", mb[key], "MB per CPU-s", cpu[key]) for key in mb]


def _gpu(builds, runtime, rounds) -> list[tuple]:
    procs = [b.start("vhost-user-gpu", ["--socket", b.path("gpu.sock")], [b.path("gpu.sock")])
             for b in builds]
    try:
        stats = run_gpu_bench([b.path("gpu.sock") for b in builds], pids=[p.pid for p in procs],
                              labels=[b.label for b in builds], runtime=runtime * rounds,
                              rounds=rounds)
    finally:
        for b, proc in zip(builds, procs):
            b.stop(proc)
    cycles = {st["label"]: [st["cycles_per_s"]] for st in stats}
    cpu = {st["label"]: [st["cpu_ms_per_cycle"]] for st in stats}
    return [("gpu", "1080p transfer+flush", "cycles/s", cycles, "ms CPU/cycle", cpu)]


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _table(rows, before: str, after: str) -> str:
    lines = [f"| device | case | {after} | {before} | {after} / {before} | CPU: {after} | "
             f"CPU: {before} | CPU ratio |", "|---|---|---|---|---|---|---|---|"]
    for dev, case, unit, rate, cpu_unit, cpu in rows:
        ra, rb = _mean(rate[after]), _mean(rate[before])
        ca, cb = _mean(cpu[after]), _mean(cpu[before])
        cpu_ratio = f"{ca / cb:.2f}" if ca and cb else "-"
        lines.append(f"| {dev} | {case} | {ra:,.0f} {unit} | {rb:,.0f} {unit} | {ra / rb:.2f} | "
                     f"{ca or 0:.2f} {cpu_unit} | {cb or 0:.2f} {cpu_unit} | {cpu_ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_before_after", description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True, metavar="BINDIR", help="bin/ of the build before")
    p.add_argument("--after", default=os.path.dirname(sys.executable), metavar="BINDIR",
                   help="bin/ of the build after (default: this interpreter's)")
    p.add_argument("--device", action="append", choices=DEVICES, help="only these (repeatable)")
    p.add_argument("--runtime", type=float, default=3.0, help="seconds per build, case and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--pin", action="store_true",
                   help="back-ends on CPU 1, this driver on CPU 0 (the per-core comparison)")
    args = p.parse_args(argv)
    for d in (args.before, args.after):
        if not os.path.isfile(os.path.join(d, "vhost-user-blk")):
            p.error(f"{d}: no vhost-user-blk in it")
    cpu = 1 if args.pin else None
    if args.pin:
        os.sched_setaffinity(0, {0})
    runners = {"blk": _blk, "net": _net, "vsock": _vsock, "gpu": _gpu}
    rows = []
    with tempfile.TemporaryDirectory(prefix="bba-", dir="/dev/shm") as workdir:
        builds = [Build("after", args.after, workdir, cpu), Build("before", args.before, workdir, cpu)]
        try:
            for dev in args.device or DEVICES:
                rows += runners[dev](builds, args.runtime, args.rounds)
                print(f"{dev}: done", file=sys.stderr)
        finally:
            for b in builds:
                b.stop_all()
    print(_table(rows, "before", "after"))
    print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
          f"on {os.cpu_count()} CPUs; --runtime {args.runtime} --rounds {args.rounds}"
          f"{' --pin' if args.pin else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
