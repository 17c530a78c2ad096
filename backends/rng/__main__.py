"""`vhost-user-rng`: serve a virtio-rng (entropy) device to a VMM."""

from __future__ import annotations

import sys

from vhost_user.cli import UsageError, base_parser, run_backend, run_main

from .device import CAPABILITIES, RngDevice, RngOptions


def build_parser():
    p = base_parser("vhost-user-rng", "vhost-user virtio-rng (entropy) back-end")
    p.add_argument("--rng-source", metavar="PATH",
                   help="read entropy from PATH instead of the kernel's getrandom()")
    p.add_argument("--max-bytes", type=int, default=0,
                   help="rate limit: at most this many bytes per --period (default 0: no limit)")
    p.add_argument("--period", type=int, default=1000, metavar="MS",
                   help="rate-limit period in milliseconds (default 1000)")
    p.add_argument("--queue-size", type=int, default=32768,
                   help="largest virtqueue size accepted, a power of two in 4..32768 (default 32768)")
    return p


def _main(args) -> int:
    if args.max_bytes < 0:
        raise UsageError(f"--max-bytes {args.max_bytes}: must be 0 (no limit) or more")
    if not 1 <= args.period <= 3_600_000:
        raise UsageError(f"--period {args.period}: must be 1..3600000 milliseconds")

    def make_device() -> RngDevice:
        return RngDevice(RngOptions(queue_size=args.queue_size, source=args.rng_source,
                                    max_bytes=args.max_bytes, period_ms=args.period))

    return run_backend(args, make_device, CAPABILITIES, "vhost-user-rng")


def main(argv: list[str] | None = None) -> int:
    return run_main(build_parser(), _main, argv)


if __name__ == "__main__":
    sys.exit(main())
