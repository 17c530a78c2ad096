"""`vhost-user-net`: vhost-user-net ports joined by a learning switch, plus TAP and pcap."""

from __future__ import annotations

import argparse
import sys

from vhost_user import cli
from vhost_user.cli import base_parser, parse_size, serve_devices
from vhost_user.errors import VhostUserError

from .capture import PcapWriter
from .device import CAPABILITIES, NetOptions, NetSwitchPorts
from .monitor import StatsMonitor
from .tap import TapPort


def build_parser() -> argparse.ArgumentParser:
    # One process serves several ports: --socket and --fd may repeat.
    p = base_parser("vhost-user-net", "vhost-user virtio-net back-end with a built-in L2 switch",
                    repeatable_endpoints=True)
    p.add_argument("--num-queues", type=int, default=1, help="rx/tx queue pairs per port (default 1)")
    p.add_argument("--queue-size", type=int, default=1024, help="largest queue size accepted")
    p.add_argument("--tap", action="append", default=[], metavar="NAME",
                   help="add a TAP port (created when missing); repeatable")
    p.add_argument("--pcap", metavar="FILE", help="capture every switched frame ('-' = stdout)")
    p.add_argument("--capture-buffer", type=parse_size, default=16 << 20,
                   help="capture ring size; frames are dropped from the capture when full")
    p.add_argument("--mac-ageing", type=float, default=300.0, metavar="SECONDS",
                   help="forget a learnt MAC address after this long (default 300)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    done = cli.print_info(args, CAPABILITIES, "vhost-user-net")
    if done is not None:
        return done
    cli.setup_logging(args)
    endpoints = cli.endpoints(args)
    if not endpoints:
        print("error: give --socket PATH or --fd N (repeatable)", file=sys.stderr)
        return 2
    if args.pcap == "-" and sys.stdout.isatty():
        print("error: --pcap - needs stdout to be a pipe or file", file=sys.stderr)
        return 2
    ports = NetSwitchPorts(capture_bytes=args.capture_buffer if args.pcap else 0,
                           ageing_s=args.mac_ageing)
    opts = NetOptions(num_queue_pairs=args.num_queues, queue_size=args.queue_size)
    taps: list[TapPort] = []
    writer = None
    try:
        for name in args.tap:
            taps.append(TapPort(ports.switch, name))
        if args.pcap:
            out = sys.stdout.buffer if args.pcap == "-" else open(args.pcap, "wb")
            writer = PcapWriter(ports.switch, out)
    except (VhostUserError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    def on_loop(loop) -> None:
        named = [(f"port {d.port} ({e})", (lambda d=d: d.stats)) for d, e in zip(ports.devices, endpoints)]
        named += [(f"tap {t.name}", (lambda t=t: t.stats)) for t in taps]
        StatsMonitor(named, [d.check_queues for d in ports.devices]).attach(loop)
        if writer is not None:
            writer.start()
        for tap in taps:
            tap.start()

    try:
        return serve_devices([(e, lambda: ports.new_device(opts)) for e in endpoints], on_loop=on_loop,
                             sandbox="net" if args.sandbox else None)
    finally:
        for tap in taps:
            tap.close()
        if writer is not None:
            writer.stop()
            if writer.out is not sys.stdout.buffer:
                writer.out.close()


if __name__ == "__main__":
    sys.exit(main())
