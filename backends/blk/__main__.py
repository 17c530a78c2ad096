"""`vhost-user-blk`: serve a disk image (or an in-memory disk) to a VMM.

SIGHUP does not stop it (SIGTERM and SIGINT do): it re-reads the image's
size, so a disk grown (or shrunk) on the host resizes under a running guest.
"""

from __future__ import annotations

import signal
import sys

from vhost_user.cli import UsageError, base_parser, parse_size, run_backend, run_main

from .device import CAPABILITIES, BlkDevice, BlkOptions, default_io_threads
from .engine import MAX_IO_THREADS
from .request import SECTOR_SIZE

DEFAULT_SIZE = 1 << 30


def build_parser():
    p = base_parser("vhost-user-blk", "vhost-user virtio-blk back-end")
    p.add_argument("--image", "--blk-file", "-b", dest="image", metavar="PATH",
                   help="raw image file or block device (default: an in-memory disk)")
    p.add_argument("--size", type=parse_size,
                   help="size of the in-memory disk (default 1G; a multiple of 512; not with --image)")
    p.add_argument("--num-queues", type=int, default=1, help="number of request queues")
    p.add_argument("--queue-size", type=int, default=32768,
                   help="largest virtqueue size accepted, a power of two in 4..32768 (default 32768)")
    p.add_argument("--read-only", "-r", action="store_true", help="serve the disk read-only")
    p.add_argument("--serial", default="", help="serial number returned by GET_ID (≤ 20 bytes)")
    p.add_argument("--logical-block-size", type=int, default=512, help="logical block size in bytes")
    p.add_argument("--direct", action="store_true", help="open the image with O_DIRECT")
    p.add_argument("--io-threads", type=int, default=None, metavar="N",
                   help="I/O threads per queue that share reads and writes of 128 KiB or more "
                        f"(0..{MAX_IO_THREADS}; 0 = the queue's worker does all I/O; "
                        "default min(4, CPUs))")
    p.add_argument("--no-mmap", dest="map_reads", action="store_false",
                   help="read the image with preadv instead of copying from a read-only "
                        "mapping of it (the default, except with --direct)")
    return p


def _disk_size(args) -> int:
    """--size: the in-memory disk only, whole sectors."""
    if args.size is None:
        return DEFAULT_SIZE
    if args.image is not None:
        raise UsageError("--size sets the in-memory disk's size; with --image the image's size is used")
    if args.size < SECTOR_SIZE or args.size % SECTOR_SIZE:
        raise UsageError(f"--size {args.size}: not a whole number of {SECTOR_SIZE}-byte sectors")
    return args.size


def _io_threads(args) -> int:
    if args.io_threads is None:
        return default_io_threads()
    if not 0 <= args.io_threads <= MAX_IO_THREADS:
        raise UsageError(f"--io-threads {args.io_threads}: not in 0..{MAX_IO_THREADS}")
    return args.io_threads


def _main(args) -> int:
    size = _disk_size(args)
    io_threads = _io_threads(args)

    def make_device() -> BlkDevice:
        return BlkDevice(BlkOptions(
            image=args.image, size=size, num_queues=args.num_queues,
            queue_size=args.queue_size, read_only=args.read_only, serial=args.serial,
            logical_block_size=args.logical_block_size, direct=args.direct,
            io_threads=io_threads, map_reads=args.map_reads,
        ))

    # SIGHUP: re-read the image's size and tell the front-end (online resize).
    return run_backend(args, make_device, CAPABILITIES, "vhost-user-blk",
                       signals={signal.SIGHUP: BlkDevice.resize})


def main(argv: list[str] | None = None) -> int:
    return run_main(build_parser(), _main, argv)


if __name__ == "__main__":
    sys.exit(main())
