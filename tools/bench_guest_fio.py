#!/usr/bin/env python3
"""Guest fio benchmark: our vhost-user-blk against qemu-storage-daemon under a real Linux guest.

Both back-ends serve the same raw image in /dev/shm (filled with random
data, page-cached on the host). Each run boots the test harness's guest
(tests/harness/) with QEMU as the front-end and runs, inside the guest, fio
with libaio and O_DIRECT: 4k random reads at iodepth 32, then 1 MiB
sequential reads. Runs are interleaved (ours, qsd, ours, qsd, ...) and the
report gives medians and ratios.

Under TCG (what these machines run) every guest instruction is emulated, so
the guest's CPU, not the back-end, sets the pace: expect ratios near 1. The
back-end's CPU time per request (utime+stime from /proc, sampled at guest
markers around each fio job) is the figure that still tells the back-ends
apart.

    python3 tools/bench_guest_fio.py [--runtime 5] [--rounds 2] [--size-mb 256] [--markdown]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from harness.backend import BackendProcess, qsd_blk_argv  # noqa: E402
from harness.initramfs import build_initramfs  # noqa: E402
from harness.kernel import fetch_kernel  # noqa: E402
from harness.qemu import GuestVM, kvm_usable  # noqa: E402

from vhost_user.frontend.bench import process_cpu_seconds  # noqa: E402

#: (key, label, fio arguments, block size)
JOBS = [
    ("rr", "4k randread QD32", "--rw=randread --bs=4k --iodepth=32", 4096),
    ("seq", "1M seq read QD8", "--rw=read --bs=1m --iodepth=8", 1 << 20),
]


@dataclass
class JobResult:
    iops: float
    mbps: float
    cpu_us_per_req: float


def ours_argv(image: str, sock: str) -> list[str]:
    return [sys.executable, "-m", "vhost_user.backends.blk", "--socket", sock,
            "--image", image, "--num-queues", "1"]


def qsd_argv(image: str, sock: str) -> list[str]:
    qsd = shutil.which("qemu-storage-daemon")
    if not qsd:
        raise SystemExit("qemu-storage-daemon is not installed (tools/install-test-deps.sh)")
    return qsd_blk_argv(image, sock, 1, qsd=qsd)


BACKENDS = {"ours": ours_argv, "qsd": qsd_argv}


def guest_script(runtime: float) -> str:
    lines = ["vhu_wait_dev /dev/vda || exit 1"]
    for key, _, args, _ in JOBS:
        lines += [
            f"vhu_mark {key}-begin",
            f"fio --name={key} --filename=/dev/vda --ioengine=libaio --direct=1 {args} "
            f"--runtime={runtime} --time_based --output-format=terse --terse-version=3 "
            f"> /tmp/{key}.out || exit 2",
            f"vhu_mark {key}-end",
            # terse v3: 5 error, 6 read KiB, 7 read KiB/s, 8 read IOPS
            f"echo \"{key} $(grep '^3;' /tmp/{key}.out | cut -d';' -f5-8)\"",
        ]
    return "\n".join(lines) + "\n"


def run_once(name: str, image: str, workdir: Path, kernel, initramfs, runtime: float
             ) -> dict[str, JobResult]:
    """Boot one guest against a fresh back-end ``name``; return results per job."""
    sockdir = Path(tempfile.mkdtemp(prefix="vhu-bg-", dir="/tmp"))
    sock = sockdir / "blk.sock"
    backend = BackendProcess(BACKENDS[name](image, str(sock)), sock, workdir / f"{name}.log")
    vm = GuestVM(kernel, initramfs, workdir / "vm", cpus=1)
    try:
        backend.start()
        vm.add_vhost_user_blk(sock, num_queues=1)
        vm.start(guest_script(runtime))
        cpu = {}
        for key, *_ in JOBS:
            for edge in ("begin", "end"):
                vm.wait_for_marker(f"{key}-{edge}", timeout=120 + 2 * runtime)
                cpu[key, edge] = process_cpu_seconds(backend.pid)
        result = vm.wait(timeout=60)
    finally:
        vm.close()
        backend.stop()
        shutil.rmtree(sockdir, ignore_errors=True)
    out = {}
    for key, label, _, bs in JOBS:
        line = next(x for x in result.lines if x.startswith(key + " "))
        error, read_kib, kib_s, iops = line.split(" ", 1)[1].split(";")
        if error != "0":
            raise SystemExit(f"{name}: fio {label} failed (error {error})")
        requests = int(read_kib) * 1024 / bs
        cpu_s = cpu[key, "end"] - cpu[key, "begin"]
        out[key] = JobResult(iops=float(iops), mbps=int(kib_s) * 1024 / 1e6,
                             cpu_us_per_req=cpu_s * 1e6 / max(requests, 1))
    return out


def fill_image(path: str, size_mb: int) -> None:
    with open(path, "wb") as handle:  # fully allocated: reads hit real pages
        chunk = os.urandom(1 << 20)
        for _ in range(size_mb):
            handle.write(chunk)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runtime", type=float, default=5.0, help="seconds per fio job")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (ours, qsd)")
    ap.add_argument("--size-mb", type=int, default=256, help="image size in MiB")
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = ap.parse_args()

    kernel = fetch_kernel()
    initramfs = build_initramfs(kernel)
    accel = os.environ.get("VHOST_USER_TEST_ACCEL") or ("kvm" if kvm_usable(kernel, initramfs)
                                                        else "tcg")
    shm = tempfile.mkdtemp(prefix="vu-gbench-", dir="/dev/shm")
    work = Path(tempfile.mkdtemp(prefix="vu-gbench-"))
    image = os.path.join(shm, "disk.img")
    runs: dict[str, list[dict[str, JobResult]]] = {name: [] for name in BACKENDS}
    try:
        fill_image(image, args.size_mb)
        for rnd in range(args.rounds):
            for name in BACKENDS:
                res = run_once(name, image, work / f"{name}{rnd}", kernel, initramfs, args.runtime)
                runs[name].append(res)
                print(f"round {rnd + 1} {name}: " + ", ".join(
                    f"{k} {r.iops:,.0f} IOPS {r.mbps:.1f} MB/s {r.cpu_us_per_req:.1f} µs/req"
                    for k, r in res.items()), file=sys.stderr)
    finally:
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)

    print(f"accel={accel}, guest 1 vCPU, 1 queue, {args.rounds} rounds of "
          f"{args.runtime:g} s per job, medians")
    if args.markdown:
        print("| case | ours IOPS | qsd IOPS | IOPS ratio | ours MB/s | qsd MB/s "
              "| ours CPU µs/req | qsd CPU µs/req | CPU ratio |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for key, label, _, _ in JOBS:
        def med(name: str, field: str) -> float:
            return statistics.median(getattr(r[key], field) for r in runs[name])
        o, p = med("ours", "iops"), med("qsd", "iops")
        oc, pc = med("ours", "cpu_us_per_req"), med("qsd", "cpu_us_per_req")
        cells = [label, f"{o:,.0f}", f"{p:,.0f}", f"{o / p:.2f}x",
                 f"{med('ours', 'mbps'):.1f}", f"{med('qsd', 'mbps'):.1f}",
                 f"{oc:.1f}", f"{pc:.1f}", f"{oc / pc:.2f}x"]
        print("| " + " | ".join(cells) + " |" if args.markdown else "  ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
