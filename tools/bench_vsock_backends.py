#!/usr/bin/env python3
"""Side-by-side vsock benchmark: several vhost-user-vsock back-end executables, one driver.

Each back-end is any program with vhost-device-vsock's command line
(`--guest-cid --socket --uds-path`): ours, an older build of ours, or
rust-vmm's vhost-device-vsock where installed. All are driven by the same
built-in front-end (`vhost-user-bench vsock`, C driver loop) and host
programs; runs alternate (A, B, A, B, ...) with a fresh back-end each, so
drift on the machine hits all alike. The report gives MB/s per round and
each back-end's ratio to the first one. For a back-end that logs the
SIGUSR1 stats line (ours), a run under `--pcap` also reports how many
frames the capture kept and dropped (`capture` entry).

    python3 tools/bench_vsock_backends.py --backend new=vhost-user-vsock \\
        --backend old=/tmp/oldvenv/bin/vhost-user-vsock [--runtime 3] [--rounds 2] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time

from vhost_user.backends.vsock.bench import run_vsock_bench


def _start(cmd: list[str], workdir: str) -> tuple[subprocess.Popen, str, str]:
    sock, uds = os.path.join(workdir, "vm.sock"), os.path.join(workdir, "vm.vsock")
    for path in (sock, uds):
        if os.path.exists(path):
            os.unlink(path)
    with open(os.path.join(workdir, "backend.log"), "wb") as log:
        proc = subprocess.Popen(cmd + ["--guest-cid", "3", "--socket", sock, "--uds-path", uds],
                                stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 20
    while not (os.path.exists(sock) and os.path.exists(uds)):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{shlex.join(cmd)} did not come up")
        time.sleep(0.05)
    return proc, sock, uds


def _capture_stats(proc: subprocess.Popen, workdir: str) -> dict | None:
    """The `capture` entry of the back-end's SIGUSR1 stats line, None without one."""
    proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        with open(os.path.join(workdir, "backend.log"), errors="replace") as f:
            lines = [line for line in f if " stats {" in line]
        if lines:
            return json.loads(lines[-1].split(" stats ", 1)[1]).get("capture")
        time.sleep(0.05)
    return None


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _print_ceilings(results: dict, load_before: tuple, load_after: tuple) -> None:
    """The ceilings measured in this run and the machine's load around it, so a
    table can be read against what the machine could do while it ran."""
    memcpy = [r["memcpy_mb_s"] for runs in results.values() for r in runs]
    sock: dict[int, list[float]] = {}
    for (_, _, size), runs in results.items():
        sock.setdefault(size, []).extend(r["unix_socket_mb_s"] for r in runs)
    parts = [f"memcpy {min(memcpy):.0f}-{max(memcpy):.0f} MB/s"] if memcpy else []
    parts += [f"unix socket pair at {size // 1024} KiB {min(v):.0f}-{max(v):.0f} MB/s"
              for size, v in sorted(sock.items())]
    print("ceilings: " + "; ".join(parts) + f"; load average {load_before[0]:.2f} before, "
          f"{load_after[0]:.2f} after ({os.cpu_count()} CPUs)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", action="append", required=True, metavar="LABEL=COMMAND",
                   help="a back-end to compare (the first is the reference)")
    p.add_argument("--runtime", type=float, default=3.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--write-size", type=int, action="append")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    backends = [(label, shlex.split(cmd)) for label, _, cmd in (b.partition("=") for b in args.backend)]
    sizes = tuple(args.write_size or (4096, 65536))
    results: dict[tuple[str, str, int], list[dict]] = {}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="vsb-", dir="/tmp") as workdir:
        for rnd in range(args.rounds):
            for label, cmd in backends:
                proc, sock, uds = _start(cmd, workdir)
                try:
                    reports = run_vsock_bench(sock, uds, write_sizes=sizes, runtime=args.runtime,
                                              pid=proc.pid)
                    cap = _capture_stats(proc, workdir)
                    if cap:
                        print(f"round {rnd + 1} {label:8} capture: {cap['frames']} frames kept, "
                              f"{cap['frames_dropped']} dropped", file=sys.stderr)
                finally:
                    _stop(proc)
                for r in reports:
                    results.setdefault((label, r["direction"], r["write_size"]), []).append(r)
                    print(f"round {rnd + 1} {label:8} {r['direction']:13} {r['write_size']:>6}: "
                          f"{r['mb_s']:8.1f} MB/s, {r['backend_mb_per_cpu_s'] or 0:6.0f} MB per back-end "
                          f"CPU-s", file=sys.stderr)
    ref = backends[0][0]
    _print_ceilings(results, load_before, os.getloadavg())
    if args.markdown:
        print("| direction | write | back-end | MB/s per round | ratio to " + ref
              + " | MB per back-end CPU-s | % of unix socket pair | % of memcpy |")
        print("|---|---|---|---|---|---|---|---|")
    for (label, direction, size), runs in results.items():
        mb = [r["mb_s"] for r in runs]
        ratio = sum(mb) / sum(x["mb_s"] for x in results[(ref, direction, size)])
        cpu = [r["backend_mb_per_cpu_s"] or 0 for r in runs]
        sock_pct = 100 * sum(r["ratio_to_unix_socket"] for r in runs) / len(runs)
        mem_pct = 100 * sum(r["ratio_to_memcpy"] for r in runs) / len(runs)
        if args.markdown:
            print(f"| {direction} | {size // 1024} KiB | {label} | {' / '.join(f'{x:.0f}' for x in mb)} | "
                  f"{ratio:.2f}x | {' / '.join(f'{x:.0f}' for x in cpu)} | {sock_pct:.0f} % | {mem_pct:.1f} % |")
        else:
            print(f"{direction:13} {size:>6} {label:8} {' / '.join(f'{x:.0f}' for x in mb)} MB/s "
                  f"ratio {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
