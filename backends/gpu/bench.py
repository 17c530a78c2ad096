"""`vhost-user-bench gpu`: full-frame updates, as a guest's 2D driver sends them.

A cycle is one full-frame update of the scanout. In `transfer` mode (what every
back-end takes) it is TRANSFER_TO_HOST_2D from the resource's scattered guest
pages and RESOURCE_FLUSH; in `blob` mode the scanout is a guest blob
(SET_SCANOUT_BLOB) and a cycle is the RESOURCE_FLUSH alone, which reads the
guest's pages itself. Every back-end gets its own driver and display listener
(QEMU's side, which receives each UPDATE); they take turns in slices so
machine noise hits them alike.
"""
from __future__ import annotations

import json
import sys
import time
from typing import Callable, NamedTuple

from vhost_user.frontend.bench import process_cpu_seconds

from .driver import BLOB_FEATURES, DRIVER_FEATURES, GpuDriver

__all__ = ["add_arguments", "run", "run_gpu_bench", "MODES"]



class _Mode(NamedTuple):
    name: str          # what a cycle is, in the report line
    features: int      # what the driver acks
    setup: Callable    # GpuDriver method: the frame shown
    cycle: Callable    # GpuDriver method: one update cycle; returns errors


_MODES = {
    "transfer": _Mode("transfer+flush", DRIVER_FEATURES, GpuDriver.setup_frame,
                      GpuDriver.frame_cycles),
    "blob": _Mode("blob flush", BLOB_FEATURES, GpuDriver.setup_blob_frame,
                  GpuDriver.flush_cycles),
}
MODES = tuple(_MODES)


def add_arguments(p) -> None:
    """The options of `vhost-user-bench gpu`."""
    p.add_argument("--socket", "-s", action="append", required=True,
                   help="back-end socket (repeat to compare back-ends in the same run)")
    p.add_argument("--pid", type=int, action="append", help="back-end pid per --socket (CPU time)")
    p.add_argument("--label", action="append", help="name per --socket")
    p.add_argument("--mode", action="append", choices=MODES,
                   help="per --socket: transfer (TRANSFER_TO_HOST_2D + RESOURCE_FLUSH, the "
                        "default) or blob (a guest-blob scanout; RESOURCE_FLUSH alone)")
    p.add_argument("--width", type=int, default=1920)
    p.add_argument("--height", type=int, default=1080)
    p.add_argument("--runtime", type=float, default=5.0, help="seconds per back-end")
    p.add_argument("--rounds", type=int, default=5, help="alternate the back-ends this often")
    p.add_argument("--json", action="store_true", help="print the reports as JSON")


def run_gpu_bench(sockets: list[str], *, pids=None, labels=None, modes=None, width: int = 1920,
                  height: int = 1080, runtime: float = 5.0, rounds: int = 5) -> list[dict]:
    """Full-frame update cycles/s per back-end, each in its mode (default `transfer`).

    Every back-end gets its own driver and display listener (QEMU's side, which
    receives each UPDATE); the back-ends take turns in `rounds` slices so that
    machine noise hits them alike.
    """

    pids = list(pids or []) + [None] * len(sockets)
    labels = list(labels or []) + [f"backend{i}" for i in range(len(sockets))]
    modes = list(modes or []) + ["transfer"] * len(sockets)
    runs = [_MODES[m] for m in modes]
    ram = -(-(width * height * 4 + (32 << 20)) // (2 << 20)) * (2 << 20)
    drivers = []
    try:
        for path in sockets:
            mode = runs[len(drivers)]
            drv = GpuDriver.connect(path, outputs=[(width, height)], ram_size=ram,
                                    features=mode.features)
            drivers.append(drv)
            mode.setup(drv, 1, width, height)
        stats = [{"label": labels[i], "mode": modes[i], "cycles": 0, "errors": 0,
                  "elapsed_s": 0.0, "cpu_s": 0.0} for i in range(len(sockets))]
        for _ in range(rounds):
            for i, drv in enumerate(drivers):
                cpu0 = process_cpu_seconds(pids[i]) if pids[i] else 0.0
                t0 = time.monotonic()
                while time.monotonic() - t0 < runtime / rounds:
                    stats[i]["errors"] += runs[i].cycle(drv, 1, width, height, 1)
                    stats[i]["cycles"] += 1
                stats[i]["elapsed_s"] += time.monotonic() - t0
                stats[i]["cpu_s"] += (process_cpu_seconds(pids[i]) - cpu0) if pids[i] else 0.0
    finally:
        for drv in drivers:
            drv.close()
    for i, st in enumerate(stats):
        st["cycles_per_s"] = st["cycles"] / st["elapsed_s"]
        st["mb_s"] = st["cycles_per_s"] * width * height * 4 / 1e6
        st["cpu_ms_per_cycle"] = (st["cpu_s"] / st["cycles"] * 1e3) if pids[i] and st["cycles"] else None
        st["ratio_to_first"] = st["cycles_per_s"] / stats[0]["cycles_per_s"]
    return stats


def run(args) -> int:
    """Run `vhost-user-bench gpu` with its parsed options; the exit code."""
    if args.mode and len(args.mode) > len(args.socket):
        print("vhost-user-bench: error: --mode: one per --socket at most", file=sys.stderr)
        return 2
    stats = run_gpu_bench(args.socket, pids=args.pid, labels=args.label, modes=args.mode,
                          width=args.width, height=args.height, runtime=args.runtime,
                          rounds=args.rounds)
    for st in stats:
        if args.json:
            print(json.dumps(st))
            continue
        cpu = f"  backend cpu {st['cpu_ms_per_cycle']:.2f} ms/cycle" if st["cpu_ms_per_cycle"] else ""
        print(f"{st['label']}: {args.width}x{args.height} {_MODES[st['mode']].name} {st['cycles_per_s']:.1f} "
              f"cycles/s ({st['mb_s']:.0f} MB/s, x{st['ratio_to_first']:.2f}) errors "
              f"{st['errors']}{cpu}")
    return 0 if all(st["errors"] == 0 for st in stats) else 1
