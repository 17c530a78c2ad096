"""`vhost-user-bench`: drive any vhost-user back-end through the built-in front-end.

The runner knows no device: every device whose spec (backends/<dev>/spec.py,
found through vhost_user.devices) names a bench module gets a sub-command,
`vhost-user-bench <dev> ...`, whose options and run come from that module
(`add_arguments(parser)`, `run(args) -> exit code`). The per-request driver
work runs in C (vhost_user.frontend.driver_ring), one thread per queue with
the GIL released, so the numbers measure the back-end and not Python. This
module also holds what every bench measures the same way: a back-end's CPU
time from /proc and the machine's memcpy ceiling.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

from vhost_user import devices
from vhost_user.cli import report_error, version
from vhost_user.errors import VhostUserError

__all__ = ["process_cpu_seconds", "memcpy_mb_s", "benches", "main"]


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of a process and all its threads, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def memcpy_mb_s(size: int = 64 << 20, rounds: int = 5) -> float:
    """The machine's memcpy bandwidth (best of `rounds` copies of `size` bytes), the ceiling
    for any copy-based data path."""
    import numpy as np

    src = np.ones(size, dtype=np.uint8)
    dst = np.empty_like(src)
    best = 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = max(best, size / (time.perf_counter() - t0) / 1e6)
    return best


def benches() -> dict[str, tuple[str, str]]:
    """device name -> (bench module, one-line summary), for every device that has a bench."""
    return {name: (spec.bench, spec.summary or f"benchmark a {spec.program} back-end")
            for name, spec in devices.specs().items() if spec.bench}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vhost-user-bench", description=__doc__.splitlines()[0])
    p.add_argument("-V", "--version", action="version", version=f"vhost-user-bench {version()}")
    sub = p.add_subparsers(dest="device", required=True)
    for name, (module, summary) in benches().items():
        one = sub.add_parser(name, help=summary, description=summary)
        importlib.import_module(module).add_arguments(one)
        one.set_defaults(bench_module=module)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one benchmark; a back-end that is missing or misbehaves is one error line (exit 1)."""
    args = _parser().parse_args(argv)
    try:
        return importlib.import_module(args.bench_module).run(args)
    except (OSError, VhostUserError) as exc:
        if isinstance(exc, OSError) and exc.filename is None and isinstance(args.socket, str):
            exc = OSError(exc.errno, exc.strerror or str(exc), args.socket)
        elif not isinstance(exc, OSError) and isinstance(getattr(args, "socket", None), str):
            exc = f"{args.socket}: {exc}"
        return report_error("vhost-user-bench", exc)


if __name__ == "__main__":
    sys.exit(main())
