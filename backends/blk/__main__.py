"""`vhost-user-blk`: serve a disk image (or an in-memory disk) to a VMM."""

from __future__ import annotations

import sys

from vhost_user.cli import base_parser, parse_size, run_backend

from .device import CAPABILITIES, BlkDevice, BlkOptions


def build_parser():
    p = base_parser("vhost-user-blk", "vhost-user virtio-blk back-end")
    p.add_argument("--image", "--blk-file", "-b", dest="image", metavar="PATH",
                   help="raw image file or block device (default: an in-memory disk)")
    p.add_argument("--size", type=parse_size, default=1 << 30,
                   help="size of the in-memory disk (default 1G)")
    p.add_argument("--num-queues", type=int, default=1, help="number of request queues")
    p.add_argument("--queue-size", type=int, default=256, help="largest queue size accepted")
    p.add_argument("--read-only", "-r", action="store_true", help="serve the disk read-only")
    p.add_argument("--serial", default="", help="serial number returned by GET_ID (≤ 20 bytes)")
    p.add_argument("--logical-block-size", type=int, default=512, help="logical block size in bytes")
    p.add_argument("--direct", action="store_true", help="open the image with O_DIRECT")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def make_device() -> BlkDevice:
        return BlkDevice(BlkOptions(
            image=args.image, size=args.size, num_queues=args.num_queues,
            queue_size=args.queue_size, read_only=args.read_only, serial=args.serial,
            logical_block_size=args.logical_block_size, direct=args.direct,
        ))

    return run_backend(args, make_device, CAPABILITIES, "vhost-user-blk")


if __name__ == "__main__":
    sys.exit(main())
