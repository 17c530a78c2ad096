#!/usr/bin/env python3
"""Every side-by-side benchmark of BENCHMARKS.md in one run, ours against the peer.

Runs, in turn, each comparison whose peer is installed here: blk against
qemu-storage-daemon (both of its aio modes, and an image on a disk file
system where our reads copy from its mapping, beside --no-mmap), net against DPDK testpmd's vhost
PMD (one core each, the others stopped during a slice), gpu against QEMU's
vhost-user-gpu, vsock against the Unix socket pair ceiling, packed against split
virtqueues, and the 4k syscall floor; with --guests also the real-guest fio and
vsock runs (slow, TCG). Every section prints its own command, its table with
ratios, and the load average before and after. A section whose peer is missing
says which program it needs and is skipped; the run goes on.

    python3 tools/bench_all.py [--quick] [--only NAME ...] [--list] [--guests]

From the repository root after the README's first command (peers from the
README's second command: tools/install-test-deps.sh).
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
QEMU_GPU = "/usr/lib/qemu/vhost-user-gpu"


def _tool(name: str, *args: str) -> list[str]:
    return [PY, str(ROOT / "tools" / name), *args]


def _wait_socks(socks, procs, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not all(os.path.exists(s) for s in socks):
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            raise RuntimeError(f"a back-end did not create {', '.join(map(str, socks))}")
        time.sleep(0.1)
    time.sleep(0.3)


def _stop(procs) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def _spawn(argv, *, cpu: int | None = None, log=None) -> subprocess.Popen:
    if cpu is not None and shutil.which("taskset") and (os.cpu_count() or 1) > 1:
        argv = ["taskset", "-c", str(cpu), *argv]
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=log or subprocess.DEVNULL,
                            stderr=subprocess.STDOUT, start_new_session=True)


def net_vs_testpmd(runtime: float, rounds: int) -> int:
    """Two vhost-user ports each: ours on core 1, testpmd (io forwarding) on 0-1."""
    d = Path(tempfile.mkdtemp(prefix="vhu-bench-net-"))
    ours_s = [d / "a.sock", d / "b.sock"]
    tp_s = [d / "t0.sock", d / "t1.sock"]
    with open(d / "testpmd.log", "wb") as log:
        testpmd = _spawn(["dpdk-testpmd", "-l", "0-1", "--no-huge", "-m", "1024", "--no-pci",
                          "--file-prefix", f"vhunet{os.getpid()}",
                          "--vdev", f"net_vhost0,iface={tp_s[0]},queues=1",
                          "--vdev", f"net_vhost1,iface={tp_s[1]},queues=1",
                          "--", "--forward-mode=io", "--auto-start", "--total-num-mbufs=8192"],
                         log=log)
    ours = _spawn(["vhost-user-net", "--socket", str(ours_s[0]), "--socket", str(ours_s[1])], cpu=1)
    try:
        _wait_socks(ours_s + tp_s, [testpmd, ours])
        argv = ["vhost-user-bench", "net",
                "--pair", f"{ours_s[0]},{ours_s[1]}", "--pid", str(ours.pid), "--label", "vhost-user-net",
                "--pair", f"{tp_s[0]},{tp_s[1]}", "--pid", str(testpmd.pid), "--label", "dpdk-testpmd",
                "--runtime", str(runtime), "--rounds", str(rounds), "--pause-others"]
        if shutil.which("taskset") and (os.cpu_count() or 1) > 1:
            argv = ["taskset", "-c", "0", *argv]
        print("$ " + " ".join(argv), flush=True)
        return subprocess.call(argv)
    finally:
        _stop([ours, testpmd])
        shutil.rmtree(d, ignore_errors=True)


def gpu_vs_qemu(runtime: float, rounds: int) -> int:
    """Full-frame updates: transfer + flush through QEMU's vhost-user-gpu and ours, and
    ours again showing a guest blob (flush alone; QEMU's back-end has no blobs)."""
    d = Path(tempfile.mkdtemp(prefix="vhu-bench-gpu-"))
    qs, os_, bs = d / "qemu.sock", d / "ours.sock", d / "blob.sock"
    qemu = _spawn([QEMU_GPU, "-s", str(qs)])
    ours = _spawn(["vhost-user-gpu", "-s", str(os_)])
    blob = _spawn(["vhost-user-gpu", "-s", str(bs)])
    try:
        _wait_socks([qs, os_, bs], [qemu, ours, blob])
        argv = ["vhost-user-bench", "gpu"]
        for sock, proc, label, mode in ((qs, qemu, "qemu", "transfer"),
                                        (os_, ours, "ours", "transfer"),
                                        (bs, blob, "ours-blob", "blob")):
            argv += ["--socket", str(sock), "--pid", str(proc.pid), "--label", label,
                     "--mode", mode]
        argv += ["--runtime", str(runtime), "--rounds", str(rounds)]
        print("$ " + " ".join(argv), flush=True)
        return subprocess.call(argv)
    finally:
        _stop([blob, ours, qemu])
        shutil.rmtree(d, ignore_errors=True)


def sections(quick: bool) -> list[tuple[str, tuple[str, ...], object]]:
    """(name, programs the section needs, argv or callable(runtime, rounds))."""
    rt, rounds = ("1", "1") if quick else ("3", "2")
    size = str((64 if quick else 512) << 20)
    return [
        ("blk-qsd", ("qemu-storage-daemon",),
         _tool("bench_blk_vs_qsd.py", "--runtime", rt, "--rounds", rounds, "--size", size,
               "--markdown")),
        ("blk-qsd-io_uring", ("qemu-storage-daemon",),
         _tool("bench_blk_vs_qsd.py", "--runtime", rt, "--rounds", rounds, "--size", size,
               "--qsd-aio", "io_uring", "--markdown")),
        ("blk-qsd-disk-file", ("qemu-storage-daemon",),
         _tool("bench_blk_vs_qsd.py", "--runtime", rt, "--rounds", rounds, "--size", size,
               "--dir", "/var/tmp", "--compare=--no-mmap", "--case", "4k randread QD32",
               "--case", "4k randread QD128", "--case", "1M seq read QD8", "--markdown")),
        ("blk-poll", ("qemu-storage-daemon",),
         _tool("bench_blk_vs_qsd.py", "--runtime", rt, "--rounds", rounds, "--size", size,
               "--dir", "/var/tmp", "--compare=--poll-us=50", "--case", "4k randread QD1",
               "--case", "4k randread QD32", "--case", "4k randwrite QD32", "--case", "1M seq read QD8",
               "--markdown")),
        ("net-testpmd", ("dpdk-testpmd",), net_vs_testpmd),
        ("net-virtio-user", ("dpdk-testpmd",),
         _tool("bench_net_virtio_user.py", "--runtime", rt, "--rounds", rounds)),
        ("gpu-qemu", (QEMU_GPU,), gpu_vs_qemu),
        ("vsock", (),
         _tool("bench_vsock_backends.py", "--backend", "ours=vhost-user-vsock",
               "--backend", "ours-pcap=vhost-user-vsock --pcap /dev/null",
               "--runtime", rt, "--rounds", rounds, "--markdown")),
        ("packed-split", (), _tool("bench_packed_vs_split.py", "--runtime", "1" if quick else "2",
                                   "--rounds", "1" if quick else "3", "--markdown")),
        ("syscall-floor", (), _tool("syscall_floor.py")),
        ("guest-fio", ("qemu-system-x86_64", "qemu-storage-daemon"),
         _tool("bench_guest_fio.py", "--runtime", rt, "--rounds", rounds, "--markdown")),
        ("guest-vsock", ("qemu-system-x86_64",),
         [PY, str(ROOT / "tests" / "integration" / "bench_guest_vsock.py"),
          "--runtime-mb", "16" if quick else "64"]),
    ]


GUEST_SECTIONS = {"guest-fio", "guest-vsock"}


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench_all.py", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 s runs, 1 round: a smoke run")
    ap.add_argument("--only", action="append", metavar="NAME", help="run only these sections")
    ap.add_argument("--guests", action="store_true", help="also the real-guest runs (slow)")
    ap.add_argument("--list", action="store_true", help="print the sections and exit")
    args = ap.parse_args(argv)
    table = sections(args.quick)
    names = [name for name, _, _ in table]
    for name in args.only or ():
        if name not in names:
            ap.error(f"no section {name!r} (sections: {', '.join(names)})")
    if args.list:
        for name, needs, _ in table:
            print(f"{name}: needs {', '.join(needs) or 'nothing but this package'}")
        return 0
    rt, rounds = (1.0, 1) if args.quick else (5.0, 3)
    failed, skipped = [], []
    for name, needs, run in table:
        if args.only and name not in args.only:
            continue
        if not args.only and name in GUEST_SECTIONS and not args.guests:
            continue
        print(f"\n## {name}\n", flush=True)
        missing = [n for n in needs if not shutil.which(n) and not os.access(n, os.X_OK)]
        if missing:
            print(f"skipped: {', '.join(missing)} not installed (tools/install-test-deps.sh)")
            skipped.append(name)
            continue
        print(f"load average before: {_load()}", flush=True)
        if callable(run):
            rc = run(rt, rounds)
        else:
            print("$ " + " ".join(run), flush=True)
            rc = subprocess.call(run, cwd=ROOT)
        print(f"load average after: {_load()}", flush=True)
        if rc != 0:
            failed.append(name)
    print(f"\n{len(failed)} section(s) failed{': ' + ', '.join(failed) if failed else ''}; "
          f"{len(skipped)} skipped{': ' + ', '.join(skipped) if skipped else ''}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
