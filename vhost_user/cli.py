"""Conventions every back-end program shares.

`--socket PATH` (alias `--socket-path`) or `--fd N` (an inherited listening
socket, as systemd socket activation hands over), `--print-capabilities`,
logging to stderr with `-v`/`--log-level`, no daemonizing, and a clean stop on
SIGTERM/SIGINT that removes the socket file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import signal
import socket
import sys
from importlib import resources
from typing import Callable

from vhost_user.device import VirtioDevice
from vhost_user.errors import VhostUserError
from vhost_user.server import DeviceServer, listen_unix

__all__ = [
    "base_parser", "run_backend", "serve_devices", "Endpoint", "endpoints", "parse_size",
    "inherited_listener", "description", "print_info", "setup_logging", "systemd_listen_fd",
]

log = logging.getLogger("vhost_user")


def parse_size(text: str) -> int:
    """'1G', '512M', '4096' -> bytes (binary units)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    suffix = t[-1] if t and t[-1] in units else ""
    number = t[: len(t) - len(suffix)]
    try:
        value = int(number) * units[suffix]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return value


def base_parser(prog: str, description: str, *, verbose_flag: bool = True,
                repeatable_endpoints: bool = False) -> argparse.ArgumentParser:
    """The shared options.

    verbose_flag=False leaves `-v` free (vhost-user-gpu's --virgl);
    repeatable_endpoints=True lets --socket/--fd repeat, one device each
    (vhost-user-net's ports); `endpoints(args)` reads them either way.
    """
    p = argparse.ArgumentParser(prog=prog, description=description)
    if repeatable_endpoints:
        where, action = p.add_argument_group("endpoints (repeatable)"), "append"
    else:
        where, action = p.add_mutually_exclusive_group(), "store"
    where.add_argument("-s", "--socket", "--socket-path", dest="socket", metavar="PATH",
                       action=action, help="listen on this Unix socket path")
    where.add_argument("-f", "--fd", type=int, metavar="N", action=action,
                       help="serve on an inherited listening socket fd (socket activation)")
    p.add_argument("-c", "--print-capabilities", action="store_true",
                   help="print the back-end capabilities as JSON and exit")
    p.add_argument("--print-description", action="store_true",
                   help="print a vhost-user.json description file (for /usr/share/qemu/vhost-user/) and exit")
    verbose = ("-v", "--verbose") if verbose_flag else ("--verbose",)
    p.add_argument(*verbose, action="count", default=0, help="more logging (repeatable)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                   help="logging level (default warning, -v info, -vv debug)")
    p.add_argument("--sandbox", action=argparse.BooleanOptionalAction, default=True,
                   help="after set-up, confine the process (no_new_privs + seccomp; default on)")
    return p


def inherited_listener(fd: int) -> socket.socket:
    """Adopt fd N as a listening Unix stream socket, refusing anything else."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise VhostUserError(f"--fd {fd}: not a socket ({exc.strerror})") from None
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise VhostUserError(f"--fd {fd}: not a Unix stream socket")
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.detach()
        raise VhostUserError(f"--fd {fd}: socket is not listening")
    os.set_inheritable(fd, False)
    return sock


def setup_logging(args) -> None:
    level = args.log_level or {0: "warning", 1: "info"}.get(args.verbose, "debug")
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def description(name: str) -> dict:
    """The shipped description file of back-end `name`, with its binary's real path.

    libvirt discovers back-ends through these files (QEMU's
    docs/interop/vhost-user.json); the path is only known once installed.
    """
    with resources.files("vhost_user.data").joinpath(f"{name}.json").open() as f:
        desc = json.load(f)
    found = shutil.which(desc["binary"])
    if found:
        desc["binary"] = os.path.abspath(found)
    return desc


def systemd_listen_fd() -> int | None:
    """fd 3 when systemd socket activation handed us exactly one socket."""
    if os.environ.get("LISTEN_PID") == str(os.getpid()) and os.environ.get("LISTEN_FDS") == "1":
        return 3
    return None


def endpoints(args) -> list["Endpoint"]:
    """The endpoints the command line names (paths, then fds), or systemd's socket.

    Empty when none is given: the caller prints its usage error.
    """
    def listed(value):
        return [] if value is None else value if isinstance(value, list) else [value]

    found = [Endpoint(path=p) for p in listed(args.socket)]
    found += [Endpoint(fd=f) for f in listed(args.fd)]
    if not found:
        fd = systemd_listen_fd()
        if fd is not None:
            found.append(Endpoint(fd=fd))
    return found


def print_info(args, capabilities: dict, name: str) -> int | None:
    """--print-capabilities / --print-description: print and return 0, else None."""
    if args.print_capabilities:
        print(json.dumps(capabilities, indent=2))
        return 0
    if args.print_description:
        print(json.dumps(description(name), indent=2))
        return 0
    return None


def run_backend(args, make_device: Callable[[], VirtioDevice], capabilities: dict,
                name: str) -> int:
    """Print capabilities or serve one device until SIGTERM/SIGINT; return the exit code.

    Capabilities are static so that printing them opens no image.
    """
    done = print_info(args, capabilities, name)
    if done is not None:
        return done
    setup_logging(args)
    found = endpoints(args)
    if not found:
        print("error: one of --socket PATH or --fd N is required", file=sys.stderr)
        return 2
    endpoint = found[0]
    sandbox = name.removeprefix("vhost-user-") if getattr(args, "sandbox", False) else None
    return serve_devices([(endpoint, make_device)], sandbox=sandbox)


def _confine(profile: str, loop: asyncio.AbstractEventLoop | None) -> str | None:
    """`--sandbox`: prepare (loop None), then confine after set-up; where the
    kernel or libseccomp can't, say so and go on. Returns the profile, or None."""
    from vhost_user import sandbox

    try:
        sandbox.prepare(profile) if loop is None else sandbox.apply(profile, loop)
    except sandbox.SandboxError as exc:
        log.warning("sandbox unavailable, running unconfined: %s", exc.strerror or exc)
        return None
    return profile


async def _serve_all(servers: list[DeviceServer]) -> None:
    await asyncio.gather(*(s.serve_forever() for s in servers))


class Endpoint:
    """Where one device listens: a socket path or an inherited fd."""

    def __init__(self, path: str | None = None, fd: int | None = None):
        if (path is None) == (fd is None):
            raise ValueError("an endpoint is a path or an fd")
        self.path, self.fd = path, fd

    def listen(self) -> socket.socket:
        return inherited_listener(self.fd) if self.fd is not None else listen_unix(self.path)

    def __str__(self) -> str:
        return self.path or f"fd {self.fd}"


def serve_devices(entries: list[tuple[Endpoint, Callable[[], VirtioDevice]]],
                  on_loop: Callable[[asyncio.AbstractEventLoop], None] | None = None,
                  sandbox: str | None = None) -> int:
    """Serve several devices in one process (net ports, vsock VMs) until SIGTERM/SIGINT.

    Any set-up error is printed as one line and gives exit code 1, after
    closing whatever was already opened. `on_loop` lets a back-end add its own
    tasks (a TAP reader, a capture writer) to the loop before serving.
    """
    servers: list[DeviceServer] = []
    devices: list[VirtioDevice] = []
    if sandbox is not None:
        sandbox = _confine(sandbox, None)  # before the loop exists: keeps libuv off io_uring
    # Signal handlers go in before any socket appears: a SIGTERM that arrives
    # while we set up must still stop us cleanly (and remove the sockets).
    loop = _new_loop()
    stop_requested = False

    def stop() -> None:
        nonlocal stop_requested
        stop_requested = True
        for server in servers:
            server.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    try:
        for endpoint, make_device in entries:
            device = make_device()
            devices.append(device)
            servers.append(DeviceServer(device, endpoint.listen(), path=endpoint.path))
            log.info("serving %s on %s", device.device_type, endpoint)
    except (VhostUserError, OSError, ValueError) as exc:
        for server in servers:
            server.close()
        for device in devices:
            device.close()
        loop.close()
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if stop_requested:
        stop()
    try:
        if on_loop is not None:
            on_loop(loop)
        if sandbox is not None:
            _confine(sandbox, loop)
        loop.run_until_complete(_serve_all(servers))
    finally:
        loop.close()
        for device in devices:
            device.close()
    log.info("stopped")
    return 0
