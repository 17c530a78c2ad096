"""`vhost-user-vsock`: the command line of rust-vmm's vhost-device-vsock, plus the suite's conventions.

One VM: `--guest-cid 3 --socket S --uds-path U [--groups a+b]`; several VMs
in one process (so they can reach each other): repeat
`--vm guest-cid=3,socket=S,uds-path=U,groups=a+b`. All VMs share one
router and one optional `--pcap` capture.

Host-initiated connections (`CONNECT <port>` on the uds path) are stream
sockets; guest-initiated ones to `<uds-path>_<port>` are stream or, for a
guest SEQPACKET socket, an AF_UNIX SOCK_SEQPACKET connection. Sibling VMs
may use either type. QEMU keeps the vsock event queue to itself; front-ends
that hand it over get a transport reset event after a reconnect.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from vhost_user import sandbox_fs
from vhost_user.cli import (
    CliError, UsageError, activated_endpoints, base_parser, endpoint_for, parse_fd, parse_size, print_info,
    run_main, serve_devices, setup_logging,
)

from .device import CAPABILITIES, DEFAULT_TX_BUFFER, VmOptions, VsockDevice
from .router import Router

log = logging.getLogger("vhost_user.backends.vsock")

_VM_KEYS = {"guest-cid", "socket", "fd", "uds-path", "groups", "tx-buffer-size", "queue-size"}
MAX_CID = 0xFFFFFFFE


def _cid(text: str) -> int:
    """A guest CID: 3..2^32-2 (0-2 are reserved, 2^32-1 is VMADDR_CID_ANY)."""
    try:
        cid = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"guest CID {text!r} is not a number") from None
    if not 3 <= cid <= MAX_CID:
        raise argparse.ArgumentTypeError(f"guest CID {cid} must be 3..{MAX_CID}")
    return cid


def _groups(text: str) -> frozenset:
    groups = frozenset(g for g in text.split("+") if g)
    if not groups:
        raise argparse.ArgumentTypeError(f"no group names in {text!r}")
    return groups


def parse_vm(text: str) -> dict:
    """`guest-cid=3,socket=/x,uds-path=/y,groups=a+b` -> dict (typed values)."""
    out: dict = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in _VM_KEYS:
            raise argparse.ArgumentTypeError(f"--vm: unknown or malformed item {item!r} "
                                             f"(keys: {', '.join(sorted(_VM_KEYS))})")
        if key == "guest-cid":
            out[key] = _cid(value)
        elif key == "fd":
            out[key] = parse_fd(value)
        elif key == "groups":
            out[key] = _groups(value)
        elif key in ("tx-buffer-size", "queue-size"):
            out[key] = parse_size(value)
        else:
            out[key] = value
    if "guest-cid" not in out:
        raise argparse.ArgumentTypeError("--vm needs guest-cid=")
    if ("socket" in out) == ("fd" in out):
        raise argparse.ArgumentTypeError("--vm needs one of socket= or fd=")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = base_parser("vhost-user-vsock", "vhost-user virtio-vsock back-end (hybrid vsock over Unix sockets)")
    p.epilog = ("Host programs connect to --uds-path and write 'CONNECT <port>\\n' (answer 'OK <host port>\\n'); "
                "a guest connecting to CID 2 port P reaches a program listening on <uds-path>_P.")
    p.add_argument("--guest-cid", type=_cid, help="the guest's context ID (>= 3)")
    p.add_argument("--uds-path", metavar="PATH",
                   help="host Unix socket: host programs CONNECT here; guests reach PATH_<port>")
    p.add_argument("--groups", type=_groups, default=frozenset({"default"}),
                   help="sibling-VM groups, '+'-separated (default: default)")
    p.add_argument("--tx-buffer-size", type=parse_size, default=DEFAULT_TX_BUFFER,
                   help="per-connection buffer advertised to the guest (buf_alloc, default 256K "
                        "like Linux's vsock; rust-vmm's vhost-device-vsock uses 64K)")
    p.add_argument("--queue-size", type=int, default=32768,
                   help="largest virtqueue size accepted, a power of two in 4..32768 (default 32768)")
    p.add_argument("--vm", type=parse_vm, action="append", default=[],
                   help="guest-cid=N,socket=PATH|fd=N|fd=NAME[,uds-path=PATH][,groups=a+b]"
                        "[,tx-buffer-size=N][,queue-size=N]; repeat for several VMs")
    p.add_argument("--pcap", metavar="FILE", help="capture every vsock packet (vsockmon pcap; '-' = stdout)")
    p.add_argument("--capture-buffer", type=parse_size, default=16 << 20, metavar="BYTES",
                   help="capture ring size (default 16M); when the writer falls behind, packets are "
                        "dropped from the capture, never from the data path")
    p.add_argument("--capture-snaplen", type=parse_size, default=None, metavar="BYTES",
                   help="bytes kept of each captured frame, headers included (default: all; "
                        "the original length is recorded)")
    return p


def _vm_options(args) -> list[tuple]:
    """(Endpoint, VmOptions) per VM; usage errors raise UsageError."""
    vms = []
    if args.guest_cid is not None:
        if args.socket is not None or args.fd is not None:
            endpoint = endpoint_for(path=args.socket, fd=args.fd)
        else:
            passed = activated_endpoints()  # systemd socket activation: exactly one socket
            if len(passed) != 1:
                raise UsageError("--guest-cid needs --socket PATH or --fd N")
            endpoint = passed[0]
        vms.append((endpoint, VmOptions(
            guest_cid=args.guest_cid, socket=args.socket, uds_path=args.uds_path, groups=args.groups,
            tx_buffer_size=args.tx_buffer_size, queue_size=args.queue_size)))
    elif args.socket is not None or args.fd is not None:
        raise UsageError("--socket/--fd need --guest-cid")
    for vm in args.vm:
        vms.append((endpoint_for(path=vm.get("socket"), fd=vm.get("fd")), VmOptions(
            guest_cid=vm["guest-cid"], socket=vm.get("socket"), uds_path=vm.get("uds-path"),
            groups=vm.get("groups", args.groups),
            tx_buffer_size=vm.get("tx-buffer-size", args.tx_buffer_size),
            queue_size=vm.get("queue-size", args.queue_size))))
    if not vms:
        raise UsageError("give --guest-cid with --socket, or one or more --vm")
    cids = [o.guest_cid for _, o in vms]
    if len(set(cids)) != len(cids):
        raise UsageError("two VMs share a guest CID")
    return vms


def _open_capture(args):
    """--pcap: the capture ring and its file (header written now, so a bad path fails at start)."""
    if not args.pcap:
        return None
    from .pcap import DEFAULT_SNAPLEN, Capture
    snaplen = DEFAULT_SNAPLEN if args.capture_snaplen is None else args.capture_snaplen
    if not 1 <= snaplen <= 262144:
        raise UsageError(f"--capture-snaplen {snaplen} must be 1..256K")
    if not 64 << 10 <= args.capture_buffer <= 1 << 30:
        raise UsageError(f"--capture-buffer {args.capture_buffer} must be 64K..1G")
    if args.pcap == "-" and sys.stdout.isatty():
        raise UsageError("--pcap - needs stdout to be a pipe or file")
    try:
        return Capture(args.pcap, ring_size=args.capture_buffer, snaplen=snaplen)
    except OSError as exc:
        raise CliError(args.pcap, exc.strerror or str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    return run_main(build_parser(), _main, argv)


def _main(args) -> int:
    done = print_info(args, CAPABILITIES, "vhost-user-vsock")
    if done is not None:
        return done
    setup_logging(args)
    vms = _vm_options(args)
    for _, opts in vms:  # guests connect to <uds-path>_<port> at run time
        if opts.uds_path is not None and args.sandbox:
            sandbox_fs.need(os.path.dirname(os.path.abspath(opts.uds_path)))
    capture = _open_capture(args)
    router = Router()

    def factory(opts: VmOptions):
        return lambda: VsockDevice(opts, router, capture)

    try:
        return serve_devices([(endpoint, factory(opts)) for endpoint, opts in vms],
                             # the writer thread starts once the sandbox is on (it holds no
                             # path: the file was opened above)
                             on_loop=(lambda loop: capture.start()) if capture else None,
                             sandbox="vsock" if args.sandbox else None, args=args,
                             label=lambda d, e: f"cid {d.guest_cid} ({e})",
                             extra_counters=(lambda: {"capture": capture.stats()}) if capture else None)
    finally:
        if capture is not None:
            try:
                capture.close()
            except OSError as exc:
                log.error("--pcap %s: %s", args.pcap, exc.strerror or exc)


if __name__ == "__main__":
    sys.exit(main())
