"""Conventions every back-end program shares.

Options: `--socket PATH` (alias `--socket-path`) or `--fd N`, an inherited
Unix socket that is either listening (serve front-ends in turn, as systemd
socket activation hands over) or already connected (one front-end, as
libvirt and crosvm hand over: serve that session, exit 0 when it ends);
`--print-capabilities`, `--print-description`, `-V/--version`, `--pidfile`,
logging to stderr with `-v`/`--log-level`, no daemonizing.

Signals: SIGTERM, SIGINT and SIGHUP stop cleanly and remove the socket files
that are still ours; SIGUSR1 logs one `stats {...}` JSON line of counters. A
back-end may give SIGHUP its own meaning (`signals=`: blk re-reads its image's
size).

systemd: with LISTEN_FDS, an endpoint given as `--socket PATH` (or vsock's
`socket=PATH`) is served on the inherited socket whose FileDescriptorName is
PATH or that is bound to PATH; `--fd NAME` (vsock `fd=NAME`) picks the one
named NAME; with no endpoint on the command line every inherited socket is
one (net: one port each). READY=1 goes to NOTIFY_SOCKET once all listen.

Errors: bad input after parsing is one line `PROGRAM: error: WHAT: reason`
and exit status 1, WHAT being the path (or fd) at fault; usage errors,
including an option value a device rejects, go through argparse (exit 2).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import stat
import sys
import sysconfig
from importlib import metadata
from typing import Callable

from vhost_user import daemon, devices
from vhost_user.device import VirtioDevice
from vhost_user.errors import VhostUserError
from vhost_user.server import DeviceServer, listen_unix

__all__ = [
    "base_parser", "run_main", "run_backend", "serve_devices", "Endpoint", "endpoints", "endpoint_for",
    "parse_size", "adopt_fd", "description", "print_info", "setup_logging", "CliError", "UsageError",
    "error_text", "report_error", "version", "enter_fs_sandbox",
]

log = logging.getLogger("vhost_user")
PACKAGE = "vhost-user-backends"


# -- errors ---------------------------------------------------------------------------
class CliError(Exception):
    """Bad input found after parsing: `WHAT: reason`, exit status 1."""

    def __init__(self, what: str, reason: str):
        super().__init__(f"{what}: {reason}")
        self.what, self.reason = what, reason


class UsageError(Exception):
    """A command-line mistake found after parsing; run_main hands it to parser.error (exit 2)."""


def error_text(exc: BaseException) -> str:
    """The `WHAT: reason` part of an error line (an OSError names its file)."""
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or exc}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


def report_error(prog: str, exc: BaseException | str) -> int:
    """Print `PROG: error: WHAT: reason` to stderr; return 1 (the exit status)."""
    text = exc if isinstance(exc, str) else error_text(exc)
    print(f"{prog}: error: {text}", file=sys.stderr)
    return 1


def run_main(parser: argparse.ArgumentParser, body: Callable[[argparse.Namespace], int],
             argv: list[str] | None = None) -> int:
    """Parse `argv`, run `body(args)`, and turn every expected failure into one line.

    UsageError goes through parser.error (usage and exit 2); CliError,
    OSError and VhostUserError become `PROG: error: ...` and exit 1.
    """
    args = parser.parse_args(argv)
    try:
        return body(args)
    except UsageError as exc:
        parser.error(str(exc))
    except (CliError, OSError, VhostUserError) as exc:
        log.debug("failed", exc_info=True)
        return report_error(parser.prog, exc)
    return 2  # not reached: parser.error exits


# -- parsing ----------------------------------------------------------------------------
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


POLL_US_MAX = 100_000


def parse_poll_us(text: str) -> int:
    """--poll-us: whole microseconds, 0 to POLL_US_MAX."""
    try:
        value = int(text, 10)
    except ValueError:
        value = -1
    if not 0 <= value <= POLL_US_MAX:
        raise argparse.ArgumentTypeError(f"{text}: must be 0..{POLL_US_MAX} microseconds")
    return value


def parse_fd(text: str) -> int | str:
    """`--fd` value: a file descriptor number, or the name of a systemd-passed socket."""
    if text.isdigit():
        return int(text)
    if not text or text.lstrip("-").isdigit() or ":" in text:
        raise argparse.ArgumentTypeError(f"not a file descriptor or socket name: {text!r}")
    return text


def version() -> str:
    """The installed distribution's version."""
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        return "unknown"


def base_parser(prog: str, description: str, *, verbose_flag: bool = True,
                repeatable_endpoints: bool = False) -> argparse.ArgumentParser:
    """The shared options.

    verbose_flag=False leaves `-v` free (vhost-user-gpu's --virgl);
    repeatable_endpoints=True lets --socket/--fd repeat, one device each
    (vhost-user-net's ports); `endpoints(args)` reads them either way.
    """
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.set_defaults(prog_name=prog)
    if repeatable_endpoints:
        where, action = p.add_argument_group("endpoints (repeatable)"), "append"
    else:
        where, action = p.add_mutually_exclusive_group(), "store"
    where.add_argument("-s", "--socket", "--socket-path", dest="socket", metavar="PATH",
                       action=action, help="listen on this Unix socket path")
    where.add_argument("-f", "--fd", type=parse_fd, metavar="N", action=action,
                       help="serve on an inherited Unix socket: listening (serve front-ends in turn) "
                            "or connected (serve that one, then exit); or the LISTEN_FDNAMES name "
                            "of a systemd-passed socket")
    p.add_argument("-c", "--print-capabilities", action="store_true",
                   help="print the back-end capabilities as JSON and exit")
    p.add_argument("--print-description", action="store_true",
                   help="print a vhost-user.json description file (for /usr/share/qemu/vhost-user/) and exit")
    p.add_argument("-V", "--version", action="version", version=f"{prog} {version()}")
    p.add_argument("--pidfile", metavar="PATH",
                   help="create and lock PATH, write our pid once serving, remove it on stop")
    verbose = ("-v", "--verbose") if verbose_flag else ("--verbose",)
    p.add_argument(*verbose, action="count", default=0, help="more logging (repeatable)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                   help="logging level (default warning, -v info, -vv debug)")
    p.add_argument("--poll-us", type=parse_poll_us, default=0, metavar="N",
                   help="after a batch, each queue worker polls its ring for N microseconds "
                        "before sleeping on the guest's kick: fewer kicks and wake-ups at the "
                        "cost of a CPU spinning meanwhile (0 to %d; default 0, never)" % POLL_US_MAX)
    p.add_argument("--sandbox", action=argparse.BooleanOptionalAction, default=True,
                   help="after set-up, confine the process (no_new_privs + seccomp; default on)")
    p.add_argument("--sandbox-fs", choices=["namespace", "chroot", "none"], default="namespace",
                   help="with --sandbox, after set-up switch to a private read-only root: a mount "
                        "(and, unprivileged, user) namespace, an empty chroot, or none "
                        "(default namespace, falling back to chroot, then none)")
    return p


def setup_logging(args) -> None:
    level = args.log_level or {0: "warning", 1: "info"}.get(args.verbose, "debug")
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


# -- endpoints ------------------------------------------------------------------------------
def adopt_fd(fd: int) -> tuple[socket.socket, bool]:
    """Adopt inherited fd N as a Unix stream socket: (socket, connected).

    A listening socket serves front-ends in turn; a connected one (a socket
    pair end, as libvirt and crosvm pass) is one front-end. Anything else is
    refused with a CliError naming the fd.
    """
    what = f"--fd {fd}"
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise CliError(what, f"not an open file descriptor ({exc.strerror})") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise CliError(what, "not a socket")
    sock = socket.socket(fileno=fd)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise CliError(what, "not a Unix stream socket")
    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        connected = False
    else:
        try:
            sock.getpeername()
        except OSError:
            sock.detach()
            raise CliError(what, "socket is neither listening nor connected") from None
        connected = True
    os.set_inheritable(fd, False)
    return sock, connected


class Endpoint:
    """Where one device serves: a socket path we bind, or an inherited fd.

    `label` names an fd endpoint in logs and stats (the path systemd bound
    for us, or the fd's name).
    """

    def __init__(self, path: str | None = None, fd: int | None = None, label: str | None = None):
        if (path is None) == (fd is None):
            raise ValueError("an endpoint is a path or an fd")
        self.path, self.fd, self.label = path, fd, label

    def listen(self) -> tuple[socket.socket, bool]:
        """The socket to serve and whether it is one connected front-end."""
        if self.fd is not None:
            return adopt_fd(self.fd)
        return listen_unix(self.path), False

    def __str__(self) -> str:
        return self.path or self.label or f"fd {self.fd}"


_claimed: set[int] = set()


def _bound_path(fd: int) -> str | None:
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return None
    try:
        name = sock.getsockname()
    except OSError:
        name = None
    finally:
        sock.detach()
    return name if isinstance(name, str) and name else None


def endpoint_for(path: str | None = None, fd: int | str | None = None) -> Endpoint:
    """An Endpoint for `--socket PATH` or `--fd N|NAME`, taking systemd's sockets into account.

    A PATH that systemd already listens on (an inherited socket named PATH,
    or bound to PATH) is served on that socket; it is systemd's file, so we
    never unlink it. `--fd NAME` selects the inherited socket named NAME.
    """
    passed = [(f, n) for f, n in daemon.listen_fds() if f not in _claimed]
    if path is not None:
        for f, name in passed:
            bound = _bound_path(f)
            if name == path or (bound and os.path.abspath(bound) == os.path.abspath(path)):
                _claimed.add(f)
                return Endpoint(fd=f, label=path)
        return Endpoint(path=path)
    if isinstance(fd, str):
        for f, name in passed:
            if name == fd:
                _claimed.add(f)
                return Endpoint(fd=f, label=name)
        raise UsageError(f"--fd {fd}: no socket of that name in LISTEN_FDNAMES")
    if fd is None:
        raise ValueError("endpoint_for needs a path or an fd")
    _claimed.add(fd)
    return Endpoint(fd=fd)


def activated_endpoints() -> list[Endpoint]:
    """Every systemd-passed socket not claimed yet, in fd order."""
    found = []
    for f, name in daemon.listen_fds():
        if f not in _claimed:
            _claimed.add(f)
            found.append(Endpoint(fd=f, label=_bound_path(f) or (name if name != "unknown" else None)))
    return found


def endpoints(args, *, single: bool = False) -> list[Endpoint]:
    """The endpoints the command line names (paths, then fds), or systemd's sockets.

    Empty when none is given: the caller reports its usage error. `single`:
    the back-end serves one device, so several systemd sockets are a usage error.
    """
    def listed(value):
        return [] if value is None else value if isinstance(value, list) else [value]

    found = [endpoint_for(path=p) for p in listed(args.socket)]
    found += [endpoint_for(fd=f) for f in listed(args.fd)]
    if not found:
        found = activated_endpoints()
        if single and len(found) > 1:
            raise UsageError(f"LISTEN_FDS: {len(found)} sockets passed, this back-end serves one "
                             "(select one with --fd NAME or --socket PATH)")
    for f, name in daemon.listen_fds():
        if f not in _claimed:
            log.warning("LISTEN_FDS: fd %d (%s) is not used by any endpoint", f, name)
    return found


# -- information --------------------------------------------------------------------------
def _program_path(name: str) -> str | None:
    """The absolute path of the program running now, as a VMM can start it.

    The console script we run as (sys.argv[0]); under `python -m`, the
    console script this interpreter's installation put in its scripts
    directory. Never a PATH lookup, which may find another install.
    """
    argv0 = sys.argv[0] if sys.argv else ""
    if argv0 and not argv0.endswith(".py") and argv0 != "-c" and os.access(argv0, os.X_OK) \
            and os.path.isfile(argv0):
        return os.path.realpath(argv0)
    for where in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        candidate = os.path.join(where, name) if where else ""
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return os.path.realpath(candidate)
    return None


def description(name: str) -> dict:
    """The description file of back-end `name` (its device spec), with the running program's path.

    libvirt starts vhost-user-gpu (and virtiofsd) from these files (QEMU's
    docs/interop/vhost-user.json); the path is only known at run time.
    """
    desc = devices.by_program(name).description_file()
    found = _program_path(desc["binary"])
    if found is None:
        print(f"{name}: warning: cannot tell this program's absolute path; "
              f"\"binary\" left as {desc['binary']!r}", file=sys.stderr)
    else:
        desc["binary"] = found
    return desc


def print_info(args, capabilities: dict, name: str) -> int | None:
    """--print-capabilities / --print-description: print and return 0, else None."""
    if args.print_capabilities:
        print(json.dumps(capabilities, indent=2))
        return 0
    if args.print_description:
        print(json.dumps(description(name), indent=2))
        return 0
    return None


# -- serving ----------------------------------------------------------------------------------
def run_backend(args, make_device: Callable[[], VirtioDevice], capabilities: dict,
                name: str, *, sandbox_profile: str | None = None,
                signals: dict[int, Callable[[VirtioDevice], object]] | None = None) -> int:
    """Print capabilities or serve one device until stopped; return the exit code.

    Capabilities are static so that printing them opens no image. The sandbox
    profile defaults to the device's name in its spec (backends/<dev>/spec.py).
    `signals` (see serve_devices) gives a signal a device action instead of stopping.
    """
    done = print_info(args, capabilities, name)
    if done is not None:
        return done
    setup_logging(args)
    found = endpoints(args, single=True)
    if not found:
        raise UsageError("one of --socket PATH or --fd N is required")
    profile = sandbox_profile or devices.by_program(name).name
    sandbox = profile if getattr(args, "sandbox", False) else None
    return serve_devices([(found[0], make_device)], sandbox=sandbox, args=args, signals=signals)


def enter_fs_sandbox(args) -> str:
    """The early, single-threaded half of `--sandbox-fs` (vhost_user.sandbox_fs.enter);
    a back-end whose set-up starts threads calls it first. Returns the mode in effect."""
    from vhost_user import sandbox_fs

    if not getattr(args, "sandbox", False):
        return "none"
    return sandbox_fs.enter(getattr(args, "sandbox_fs", "none"))


def _confine(profile: str, loop: asyncio.AbstractEventLoop | None) -> str | None:
    """`--sandbox`: prepare (loop None), then confine after set-up (file system, then
    seccomp); where the kernel or libseccomp can't, say so and go on. Returns the
    profile, or None."""
    from vhost_user import sandbox, sandbox_fs

    if loop is None:
        try:
            sandbox.prepare(profile)
        except sandbox.SandboxError as exc:
            log.warning("sandbox unavailable, running without seccomp: %s", exc.strerror or exc)
        return profile  # the file-system sandbox still applies after set-up
    try:
        f = sandbox.build(profile)  # reads /proc/self/fd: before the root goes away
    except sandbox.SandboxError as exc:  # said at prepare time already
        log.debug("no seccomp filter: %s", exc.strerror or exc)
        f = None
    try:
        log.info("sandbox-fs: %s", sandbox_fs.confine())
    except OSError as exc:
        log.warning("sandbox-fs: cannot switch root, the host's file system stays visible: %s",
                    exc.strerror or exc)
    if f is None:
        return None
    try:
        sandbox.apply(profile, loop, f)
    except sandbox.SandboxError as exc:
        log.warning("sandbox unavailable, running unconfined: %s", exc.strerror or exc)
        return None
    return profile


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _make(make_device: Callable[[], VirtioDevice]) -> VirtioDevice:
    """make_device(), with a rejected option value (message naming `--option`) a usage error."""
    try:
        return make_device()
    except (VhostUserError, ValueError) as exc:
        if str(exc).startswith("--"):
            raise UsageError(str(exc)) from None
        raise


async def _serve_all(servers: list[DeviceServer]) -> None:
    await asyncio.gather(*(s.serve_forever() for s in servers))


StatsLabel = Callable[[VirtioDevice, Endpoint], str]


def serve_devices(entries: list[tuple[Endpoint, Callable[[], VirtioDevice]]],
                  on_loop: Callable[[asyncio.AbstractEventLoop], None] | None = None,
                  sandbox: str | None = None, *, args=None, label: StatsLabel | None = None,
                  extra_counters: Callable[[], dict] | None = None,
                  signals: dict[int, Callable[[VirtioDevice], object]] | None = None) -> int:
    """Serve several devices in one process (net ports, vsock VMs) until stopped.

    A set-up error is one line and exit code 1, after closing whatever was
    already opened; an option a device rejects raises UsageError. `on_loop`
    lets a back-end add its own tasks (a TAP reader, a capture writer) before
    serving. `args` gives the program name and `--pidfile`; `label` names a
    device in the SIGUSR1 line (default: its endpoint) and `extra_counters`
    adds entries to it. `signals` maps a signal to an action run on every
    device (in place of stopping, for SIGHUP). Returns 0 once every server is done: stopped by a
    signal, or each connected `--fd` front-end gone.
    """
    prog = getattr(args, "prog_name", None) or "vhost-user"
    servers: list[DeviceServer] = []
    devices: list[VirtioDevice] = []
    pidfile: daemon.PidFile | None = None
    if sandbox is not None:
        enter_fs_sandbox(args)  # while single-threaded: the devices may start threads
        sandbox = _confine(sandbox, None)  # before the loop exists: keeps libuv off io_uring
    # Signal handlers go in before any socket appears: a SIGTERM that arrives
    # while we set up must still stop us cleanly (and remove the sockets).
    loop = _new_loop()

    def stop() -> None:
        for server in servers:
            server.stop()

    def dump() -> None:
        out: dict = {}
        for (endpoint, _), device, server in zip(entries, devices, servers):
            entry = dict(device.counters())
            entry.update(server.counters())
            out[label(device, endpoint) if label else str(endpoint)] = entry
        if extra_counters is not None:
            out.update(extra_counters())
        log.warning("stats %s", json.dumps(out, default=str))

    # Plain handlers that queue the action on the loop, for the whole life of the
    # process: a signal before the loop runs waits in the queue, one while it runs
    # wakes it (uvloop's self-pipe runs these handlers). One path, so a signal is
    # acted on once: loop.add_signal_handler plus a replay of early signals acted
    # twice on one raised as the loop started.
    def device_action(action: Callable[[VirtioDevice], object]) -> Callable[[], None]:
        def run() -> None:
            for device in devices:
                action(device)
        return run

    actions: dict[int, Callable[[], None]] = {
        signal.SIGTERM: stop, signal.SIGINT: stop, signal.SIGHUP: stop, signal.SIGUSR1: dump,
    }
    actions.update({sig: device_action(fn) for sig, fn in (signals or {}).items()})

    def on_signal(signum: int, _frame) -> None:
        try:
            loop.call_soon_threadsafe(actions[signum])
        except RuntimeError:  # closed, and close_all not yet back: on the way out anyway
            pass

    for sig in actions:
        signal.signal(sig, on_signal)

    def close_all() -> None:
        for server in servers:
            server.close()
        for device in devices:
            device.close()
        if pidfile is not None:
            pidfile.remove()
        loop.close()
        for sig in actions:  # no loop to queue on: a signal acts as it would without us
            signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)

    try:
        pidfile = daemon.PidFile(args.pidfile) if getattr(args, "pidfile", None) else None
        for endpoint, make_device in entries:
            device = _make(make_device)
            device.poll_us = getattr(args, "poll_us", 0) or 0
            devices.append(device)
            sock, connected = endpoint.listen()
            servers.append(DeviceServer(device, sock, path=endpoint.path, connected=connected))
            log.info("serving %s on %s%s", device.device_type, endpoint,
                     " (one connected front-end)" if connected else "")
        if on_loop is not None:
            on_loop(loop)
    except UsageError:
        close_all()
        raise
    except (CliError, VhostUserError, OSError, ValueError) as exc:
        close_all()
        return report_error(prog, exc)
    try:
        if pidfile is not None:
            pidfile.write()
        daemon.notify("READY=1")
        log.info("ready")
        if sandbox is not None:
            _confine(sandbox, loop)
        loop.run_until_complete(_serve_all(servers))
    finally:
        daemon.notify("STOPPING=1")
        close_all()
    log.info("stopped")
    return 0
