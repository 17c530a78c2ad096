"""`vhost-user-net`: vhost-user-net ports joined by a learning switch, plus TAP and pcap.

Ports: `--socket PATH` / `--fd N` (repeatable) with the global `--mtu`, and
`--port socket=PATH|fd=N[,mac=MAC][,mtu=N]` (repeatable) for a port of its
own. `--mac` names the MAC of the one port given. A port's default MAC is
derived from its socket path (stable across restarts, locally administered,
unicast).
"""

from __future__ import annotations

import argparse
from dataclasses import replace
import math
import sys

from vhost_user import cli
from vhost_user.cli import (
    CliError, UsageError, base_parser, endpoint_for, parse_fd, parse_size, run_main, serve_devices,
)
from vhost_user.errors import VhostUserError

from .capture import PcapWriter
from .device import CAPABILITIES, MAX_MTU, MIN_MTU, NetOptions, NetSwitchPorts, default_mac
from .monitor import StatsMonitor
from .tap import TapPort


MAX_AGEING_S = 10 * 365 * 86400


def _ageing(text: str) -> float:
    """--mac-ageing: seconds, 0 to ten years (the switch keeps nanoseconds in 64 bits)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or not 0 <= value <= MAX_AGEING_S:
        raise argparse.ArgumentTypeError(f"{text}: must be 0..{MAX_AGEING_S} seconds")
    return value


def parse_mac(text: str) -> bytes:
    """--mac / mac=: six hex octets separated by ':' or '-', a unicast address."""
    parts = text.replace("-", ":").split(":")
    try:
        if len(parts) != 6 or not all(1 <= len(x) <= 2 for x in parts):
            raise ValueError
        mac = bytes(int(x, 16) for x in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a MAC address: {text!r}") from None
    if mac[0] & 1:
        raise argparse.ArgumentTypeError(f"{text}: a port's MAC must be unicast")
    return mac


def parse_mtu(text: str) -> int:
    try:
        mtu = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"MTU {text!r} is not a number") from None
    if not MIN_MTU <= mtu <= MAX_MTU:
        raise argparse.ArgumentTypeError(f"MTU {mtu} must be {MIN_MTU}..{MAX_MTU}")
    return mtu


_PORT_KEYS = {"socket": str, "fd": parse_fd, "mac": parse_mac, "mtu": parse_mtu}


def parse_port(text: str) -> dict:
    """`socket=/x,mac=02:..,mtu=9000` (or fd=N) -> dict of typed values."""
    out: dict = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in _PORT_KEYS:
            raise argparse.ArgumentTypeError(f"--port: unknown or malformed item {item!r} "
                                             f"(keys: {', '.join(sorted(_PORT_KEYS))})")
        out[key] = _PORT_KEYS[key](value)
    if ("socket" in out) == ("fd" in out):
        raise argparse.ArgumentTypeError("--port needs one of socket= or fd=")
    return out


def build_parser() -> argparse.ArgumentParser:
    # One process serves several ports: --socket and --fd may repeat.
    p = base_parser("vhost-user-net", "vhost-user virtio-net back-end with a built-in L2 switch",
                    repeatable_endpoints=True)
    p.add_argument("--num-queues", type=int, default=1, help="rx/tx queue pairs per port (default 1)")
    p.add_argument("--queue-size", type=int, default=32768,
                   help="largest virtqueue size accepted, a power of two in 4..32768 (default 32768)")
    p.add_argument("--port", type=parse_port, action="append", default=[],
                   metavar="socket=PATH|fd=N[,mac=MAC][,mtu=N]",
                   help="a port with its own MAC and MTU; repeatable")
    p.add_argument("--mac", type=parse_mac,
                   help="MAC address of the port (one port only; else --port ...,mac=); "
                        "default: derived from the socket path")
    p.add_argument("--mtu", type=parse_mtu,
                   help=f"MTU of every port without its own ({MIN_MTU}..{MAX_MTU}; offered as "
                        "VIRTIO_NET_F_MTU, enforced by the switch; default 1500 once negotiated)")
    p.add_argument("--tap", action="append", default=[], metavar="NAME",
                   help="add a TAP port (created when missing); repeatable")
    p.add_argument("--pcap", metavar="FILE", help="capture every switched frame ('-' = stdout)")
    p.add_argument("--capture-buffer", type=parse_size, default=16 << 20,
                   help="capture ring size; frames are dropped from the capture when full")
    p.add_argument("--mac-ageing", type=_ageing, default=300.0, metavar="SECONDS",
                   help="forget a learnt MAC address after this long (default 300)")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_main(build_parser(), _main, argv)


def _open_capture(path: str):
    """--pcap FILE: open it and write the pcap header now, so a bad path fails at start."""
    try:
        return sys.stdout.buffer if path == "-" else open(path, "wb")
    except OSError as exc:
        raise CliError(path, exc.strerror or str(exc)) from None


def _main(args) -> int:
    done = cli.print_info(args, CAPABILITIES, "vhost-user-net")
    if done is not None:
        return done
    cli.setup_logging(args)
    endpoints = cli.endpoints(args) if (args.socket or args.fd or not args.port) else []
    port_opts = [dict(mtu=args.mtu) for _ in endpoints]
    for spec in args.port:
        endpoints.append(endpoint_for(path=spec.get("socket"), fd=spec.get("fd")))
        port_opts.append(dict(mtu=spec.get("mtu", args.mtu), mac=spec.get("mac")))
    if not endpoints:
        raise UsageError("give --socket PATH or --fd N (repeatable)")
    if args.mac is not None:
        if len(endpoints) != 1:
            raise UsageError("--mac names one port's MAC; use --port socket=PATH,mac=MAC for several")
        port_opts[0]["mac"] = args.mac
    macs = [o.get("mac") or default_mac(str(e)) for o, e in zip(port_opts, endpoints)]
    if len(set(macs)) != len(macs):
        raise UsageError("two ports have the same MAC address")
    if args.pcap == "-" and sys.stdout.isatty():
        raise UsageError("--pcap - needs stdout to be a pipe or file")
    cli.enter_fs_sandbox(args)  # before the pcap writer's thread starts
    ports = NetSwitchPorts(capture_bytes=args.capture_buffer if args.pcap else 0,
                           ageing_s=args.mac_ageing)
    opts = NetOptions(num_queue_pairs=args.num_queues, queue_size=args.queue_size)
    taps: list[TapPort] = []
    writer = None
    monitor: list[StatsMonitor] = []
    try:
        for name in args.tap:
            try:
                taps.append(TapPort(ports.switch, name))
            except VhostUserError as exc:  # a bad name is a usage error; a failed set-up is not
                if str(exc).startswith("--"):
                    raise UsageError(str(exc)) from None
                raise
        if args.pcap:
            writer = PcapWriter(ports.switch, _open_capture(args.pcap))
            try:
                writer.start()  # the header: /proc/version and full disks fail here, not later
            except OSError as exc:
                raise CliError(args.pcap, exc.strerror or str(exc)) from None

        def on_loop(loop) -> None:
            named = [(f"port {d.port} ({e})", (lambda d=d: d.stats)) for d, e in zip(ports.devices, endpoints)]
            named += [(f"tap {t.name}", (lambda t=t: t.stats)) for t in taps]
            monitor.append(StatsMonitor(named, [d.check_queues for d in ports.devices]))
            monitor[0].attach(loop)
            for tap in taps:
                tap.start()

        def tap_counters() -> dict:
            # SIGUSR1 (one handler, serve_devices'): log drop increases first, then the line.
            if monitor:
                monitor[0].check()
            out = {f"tap {t.name}": t.stats for t in taps}
            if writer is not None:  # frames the capture ring had no room for (the switch never waits)
                out["capture"] = {"frames_dropped": writer.dropped}
            return out

        return serve_devices([(e, lambda m=m, o=o: ports.new_device(replace(opts, mac=m, mtu=o["mtu"])))
                              for e, m, o in zip(endpoints, macs, port_opts)], on_loop=on_loop,
                             sandbox="net" if args.sandbox else None, args=args,
                             label=lambda d, e: f"port {d.port} ({e})", extra_counters=tap_counters)
    finally:
        for tap in taps:
            tap.close()
        if writer is not None:
            writer.stop()
            if writer.out is not sys.stdout.buffer:
                try:
                    writer.out.close()
                except OSError:
                    pass


if __name__ == "__main__":
    sys.exit(main())
