#!/usr/bin/env python3
"""vhost-user-net against DPDK's vhost PMD, both driven by DPDK's virtio-user.

The front-end is not ours: one `dpdk-testpmd` with two `net_virtio_user`
ports (one per back-end port) in `mac` forwarding mode, started with
`--tx-first`, so a burst of frames per port circulates through the back-end
in both directions and every frame is unicast (each port's source MAC is its
own, its destination the other port's: a learning switch learns both from
the first burst). The loop is closed: a frame is only sent again once it has
come back, so neither back-end drops by design and the figure is what the
back-end forwards on its core, not what it drops.

Back-ends, each on CPU 1 (the generator's forwarding lcore is CPU 0):
  - vhost-user-net with two ports (`python3 -m vhost_user.backends.net`),
  - dpdk-testpmd with two `net_vhost` ports in `io` forwarding mode,
  - with `--before DIR`, also vhost-user-net imported from DIR (an older
    build installed with `pip install --no-deps --target DIR .`),
  - with `--compare ARGS`, also vhost-user-net run with those extra options.
They take turns in slices (`--rounds`, alternating, every frame size); the
ones not measured are SIGSTOPped (testpmd busy-polls). Frames per second are
testpmd's own RX counters of the two virtio-user ports over the slice; the
back-end's CPU time comes from /proc over the same window (testpmd's
includes its busy polling). Before each round, with every back-end stopped,
tools/cacheline_pingpong.c measures how long a cache line takes to move
between the two CPUs: on a shared VM that moves several-fold from one
minute to the next (the machine's fast and slow states in BENCHMARKS.md),
and the rates with it.

    python3 tools/bench_net_virtio_user.py [--runtime 5] [--rounds 3] [--frame-size 64 ...]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PY = sys.executable
MAC0, MAC1 = "02:00:00:00:00:01", "02:00:00:00:00:02"
TICK = os.sysconf("SC_CLK_TCK")


def _cpu(pid: int) -> float:
    """User + system seconds of every thread of pid."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def _spawn(argv, *, env=None, log=None) -> subprocess.Popen:
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=log or subprocess.DEVNULL,
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _wait_socks(socks, proc, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not all(os.path.exists(s) for s in socks):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the back-end did not create {', '.join(socks)}")
        time.sleep(0.1)
    time.sleep(0.3)


def _stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGCONT)
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


class Backend:
    def __init__(self, label: str, argv: list[str], socks: list[str], env=None, log=None):
        self.label, self.socks = label, socks
        self.proc = _spawn(["taskset", "-c", "1", *argv], env=env, log=log)
        _wait_socks(socks, self.proc)

    def pause(self, stop: bool) -> None:
        os.killpg(self.proc.pid, signal.SIGSTOP if stop else signal.SIGCONT)


def _generator_argv(socks, size: int, prefix: str) -> list[str]:
    return [
        "stdbuf", "-oL", "taskset", "-c", "0", "dpdk-testpmd",
        "--lcores", "0@0,1@0", "--no-huge", "-m", "512", "--no-pci", "--file-prefix", prefix,
        "--vdev", f"net_virtio_user0,path={socks[0]},queues=1,queue_size=256,mac={MAC0}",
        "--vdev", f"net_virtio_user1,path={socks[1]},queues=1,queue_size=256,mac={MAC1}",
        "--", "--forward-mode=mac", "--tx-first", "--burst=256", f"--txpkts={size}",
        f"--eth-peer=0,{MAC1}", f"--eth-peer=1,{MAC0}", "--auto-start",
        "--stats-period", "1", "--total-num-mbufs=8192",
    ]


def _pingpong_tool(tmp: Path) -> Path | None:
    """tools/cacheline_pingpong.c built in tmp; None without a C compiler."""
    cc = shutil.which("cc") or shutil.which("gcc")
    src = Path(__file__).with_name("cacheline_pingpong.c")
    exe = tmp / "pingpong"
    if not cc or not src.is_file():
        return None
    built = subprocess.run([cc, "-O2", "-pthread", str(src), "-o", str(exe)], capture_output=True)
    return exe if built.returncode == 0 else None


def _cacheline_ns(exe: Path | None) -> float | None:
    """Nanoseconds per cache-line transfer between CPU 0 and CPU 1, or None."""
    if exe is None:
        return None
    try:
        out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60).stdout
    except subprocess.TimeoutExpired:
        return None
    m = re.match(r"([\d.]+) ns per cache-line", out)
    return float(m.group(1)) if m else None


def run_slice(backend: Backend, size: int, runtime: float, prefix: str) -> dict:
    """Start the virtio-user generator on backend, measure runtime seconds, stop it."""
    gen = subprocess.Popen(_generator_argv(backend.socks, size, prefix), stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    samples: list[tuple[float, int, float]] = []   # (time, rx packets of both ports, cpu)
    counts: dict[int, int] = {}
    port = [0]
    tail: list[str] = []

    def reader():
        for line in gen.stdout:
            tail.append(line)
            del tail[:-20]
            m = re.search(r"NIC statistics for port (\d+)", line)
            if m:
                port[0] = int(m.group(1))
            m = re.search(r"RX-packets:\s*(\d+)", line)
            if m:
                counts[port[0]] = int(m.group(1))
                if port[0] == 1 and 0 in counts:
                    samples.append((time.monotonic(), counts[0] + counts[1], _cpu(backend.proc.pid)))

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    # warm-up: the ports come up and the first bursts go round
    while len(samples) < 3 and time.monotonic() < deadline and gen.poll() is None:
        time.sleep(0.1)
    first = len(samples) - 1
    time.sleep(runtime)
    _stop(gen)
    t.join(5)
    if first < 0 or len(samples) - 1 <= first:
        raise RuntimeError(f"the generator on {backend.label} printed no statistics:\n" + "".join(tail))
    (t0, n0, c0), (t1, n1, c1) = samples[first], samples[-1]
    frames = n1 - n0
    return {"backend": backend.label, "frame": size, "seconds": t1 - t0, "frames": frames,
            "pps": frames / (t1 - t0), "cpu_ns_per_frame": (c1 - c0) * 1e9 / frames if frames else None}


def _summary(results: list[dict], labels: list[str], sizes) -> list[str]:
    out = ["| frame | " + " | ".join(labels) + " | " +
           " | ".join(f"{l} / {labels[-1]}" for l in labels[:-1]) + " |",
           "|---" * (1 + 2 * len(labels) - 1) + "|"]
    for size in sizes:
        cells, rates = [], []
        for label in labels:
            rs = [r for r in results if r["backend"] == label and r["frame"] == size]
            frames = sum(r["frames"] for r in rs)
            secs = sum(r["seconds"] for r in rs)
            cpu = [r["cpu_ns_per_frame"] for r in rs if r["cpu_ns_per_frame"]]
            pps = frames / secs if secs else 0
            rates.append(pps)
            gbit = pps * size * 8 / 1e9
            cells.append(f"{pps / 1e6:.2f} Mpps ({gbit:.2f} Gbit/s), "
                         f"{sum(cpu) / len(cpu):.0f} ns CPU/frame" if cpu else "-")
        ratios = [f"{r / rates[-1]:.2f}" if rates[-1] else "-" for r in rates[:-1]]
        out.append(f"| {size} B | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    # A slice's rate can differ several-fold from the next one's (the machine
    # is shared): the median slice beside the mean of the whole run.
    for size in sizes:
        meds = []
        for label in labels:
            rs = [r["pps"] for r in results if r["backend"] == label and r["frame"] == size]
            meds.append(statistics.median(rs) if rs else 0.0)
        ratios = [f"{m / meds[-1]:.2f}" if meds[-1] else "-" for m in meds[:-1]]
        out.append(f"| {size} B median slice | " + " | ".join(f"{m / 1e6:.2f} Mpps" for m in meds)
                   + " | " + " | ".join(ratios) + " |")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bench_net_virtio_user", description=__doc__.split("\n\n")[0])
    ap.add_argument("--runtime", type=float, default=5.0, help="seconds per slice")
    ap.add_argument("--rounds", type=int, default=3, help="slices per back-end and frame size")
    ap.add_argument("--frame-size", type=int, action="append",
                    help="Ethernet frame bytes without CRC (repeatable; default 64 and 1500)")
    ap.add_argument("--before", metavar="DIR", action="append", default=[],
                    help="also measure vhost-user-net imported from DIR (repeatable)")
    ap.add_argument("--compare", metavar="ARGS", action="append", default=[],
                    help="also measure vhost-user-net with these extra options (repeatable; "
                         "e.g. --poll-us=20)")
    ap.add_argument("--json", action="store_true", help="print every slice as JSON too")
    args = ap.parse_args(argv)
    sizes = args.frame_size or [64, 1500]
    for prog in ("dpdk-testpmd", "taskset", "stdbuf"):
        if not shutil.which(prog):
            print(f"bench_net_virtio_user: error: {prog}: not installed "
                  f"(tools/install-test-deps.sh installs it)", file=sys.stderr)
            return 2
    for d in args.before:
        if not (Path(d) / "vhost_user").is_dir():
            print(f"bench_net_virtio_user: error: {d}: no vhost_user package there", file=sys.stderr)
            return 2
    tmp = Path(tempfile.mkdtemp(prefix="bench-net-vu-"))
    backends: list[Backend] = []
    try:
        log = open(tmp / "backends.log", "w")

        def net(label: str, name: str, *extra: str, env=None) -> None:
            socks = [str(tmp / f"{name}-a.sock"), str(tmp / f"{name}-b.sock")]
            backends.append(Backend(label, [PY, "-m", "vhost_user.backends.net", "--socket",
                                            socks[0], "--socket", socks[1], *extra],
                                    socks, env=env, log=log))

        for i, d in enumerate(args.before):
            net(f"vhost-user-net ({Path(d).name})", f"old{i}",
                env=dict(os.environ, PYTHONPATH=str(Path(d).resolve())))
        net("vhost-user-net", "now")
        for i, extra in enumerate(args.compare):
            net(f"vhost-user-net {extra}", f"c{i}", *extra.split())
        socks = [str(tmp / "t0.sock"), str(tmp / "t1.sock")]
        backends.append(Backend("dpdk-vhost", [
            "dpdk-testpmd", "-l", "0-1", "--main-lcore", "0", "--no-huge", "-m", "1024", "--no-pci",
            "--file-prefix", f"bnvu-vh{os.getpid()}",
            "--vdev", f"net_vhost0,iface={socks[0]},queues=1",
            "--vdev", f"net_vhost1,iface={socks[1]},queues=1",
            "--", "--forward-mode=io", "--auto-start", "--total-num-mbufs=8192"], socks, log=log))
        labels = [b.label for b in backends]
        print(f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
        results = []
        pingpong, lines = _pingpong_tool(tmp), []
        for rnd in range(args.rounds):
            for b in backends:
                b.pause(True)
            ns = _cacheline_ns(pingpong)
            if ns is not None:
                lines.append(ns)
                print(f"round {rnd + 1}: a cache line moves between CPU 0 and CPU 1 in {ns:.0f} ns",
                      flush=True)
            for size in sizes:
                for b in backends:
                    for o in backends:
                        o.pause(o is not b)
                    r = run_slice(b, size, args.runtime, f"bnvu-gen{os.getpid()}")
                    results.append(r)
                    print(f"round {rnd + 1} {size} B {b.label}: {r['pps'] / 1e6:.2f} Mpps, "
                          f"{r['cpu_ns_per_frame'] or 0:.0f} ns CPU/frame", flush=True)
        for b in backends:
            b.pause(False)
        print(f"load average after: {os.getloadavg()[0]:.2f}")
        print("cache line per round: " + (", ".join(f"{ns:.0f}" for ns in lines) + " ns" if lines
                                         else "not measured (no C compiler)"))
        print()
        print("\n".join(_summary(results, labels, sizes)))
        if args.json:
            print(json.dumps(results, indent=1))
        return 0
    finally:
        for b in backends:
            _stop(b.proc)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
