"""Socket activation and readiness exactly as systemd hands them over.

A small wrapper puts the test's listening sockets on fds 3, 4, ..., sets
LISTEN_PID to its own pid, LISTEN_FDS and LISTEN_FDNAMES, and execs the real
back-end (so LISTEN_PID is the back-end's pid, as systemd arranges); the
test's datagram socket is NOTIFY_SOCKET. The README's .socket/.service pair is
read from README.md and run this way.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from harness.backend import BackendProcess
from vhost_user.backends.gpu.commands import CtrlType as T
from vhost_user.backends.blk.driver import BlkDriver
from vhost_user.backends.gpu.driver import GpuDriver
from vhost_user.backends.net.driver import NetDriver
from vhost_user.backends.vsock.driver import VsockDriver

README = Path(__file__).resolve().parents[2] / "README.md"

# Moves the fds named on its command line to 3, 4, ... and execs the rest, with
# LISTEN_PID = its own pid (the exec keeps it), as systemd's service manager does.
WRAPPER = r"""
import fcntl, os, sys
n, names, rest = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
src, argv = [int(x) for x in rest[:n]], rest[n:]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in src]
for fd in src:
    os.close(fd)
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)
    os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(n))
if names:
    os.environ["LISTEN_FDNAMES"] = names
os.execvp(argv[0], argv)
"""


def listener(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(8)
    return s


class Notify:
    """NOTIFY_SOCKET: a path, or an abstract name written '@name'."""

    def __init__(self, sockdir: str, abstract: bool = False):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"vu-notify-{uuid.uuid4().hex}"
            self.sock.bind("\0" + name)
            self.env = "@" + name
        else:
            self.env = os.path.join(sockdir, "notify")
            self.sock.bind(self.env)
        self.sock.settimeout(30)

    def next(self) -> str:
        return self.sock.recv(4096).decode()

    def close(self) -> None:
        self.sock.close()


def activate(argv: list[str], sockets: list[socket.socket], log_path: str, *, names: str = "",
             notify: Notify | None = None, env: dict | None = None) -> BackendProcess:
    env = dict(os.environ if env is None else env)
    if notify is not None:
        env["NOTIFY_SOCKET"] = notify.env
    fds = [s.fileno() for s in sockets]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", WRAPPER, str(len(fds)), names, *map(str, fds), *argv],
                                pass_fds=fds, env=env, stdout=log, stderr=subprocess.STDOUT)
    for s in sockets:
        s.close()
    return BackendProcess.adopt(proc, "", log_path)


def module(prog: str) -> list[str]:
    return [sys.executable, "-m", f"vhost_user.backends.{prog.removeprefix('vhost-user-')}"]


def readme_units() -> dict[str, str]:
    """The README's unit files, by name (the '# /etc/systemd/system/NAME' line above each)."""
    units = {}
    for block in re.findall(r"```ini\n(.*?)```", README.read_text(), re.S):
        first, _, body = block.partition("\n")
        units[os.path.basename(first.removeprefix("# ").strip())] = body
    return units


def unit_values(body: str, key: str) -> list[str]:
    return [line.split("=", 1)[1].strip() for line in body.splitlines() if line.startswith(key + "=")]


def test_readme_socket_and_service_units_run_as_systemd_runs_them(sockdir):
    units = readme_units()
    sock_unit, service = units["vhost-user-net.socket"], units["vhost-user-net.service"]
    assert unit_values(service, "Type") == ["notify"]
    here = lambda text: text.replace("/run/vhost-user", sockdir)  # noqa: E731
    paths = [here(p) for p in unit_values(sock_unit, "ListenStream")]
    prog, *args = here(unit_values(service, "ExecStart")[0]).split()
    listeners = [listener(p) for p in paths]
    inodes = [os.stat(p).st_ino for p in paths]
    notify = Notify(sockdir)
    bp = activate(module(os.path.basename(prog)) + args, listeners, os.path.join(sockdir, "net.log"),
                  names=":".join(["vhost-user-net.socket"] * len(paths)), notify=notify)
    pidfile = here("/run/vhost-user/net.pid")
    try:
        assert notify.next() == "READY=1", bp.log()
        assert open(pidfile).read() == f"{bp.pid}\n"
        a, b = NetDriver.connect(paths[0]), NetDriver.connect(paths[1])
        try:
            b.fill_rx()
            frame = b"\xff" * 6 + b"\x52\x54\x00\x00\x00\x0b" + b"\x08\x00" + bytes(range(46))
            a.send(frame)
            assert [f for _, f in b.recv()] == [frame]
        finally:
            a.close()
            b.close()
        assert [os.stat(p).st_ino for p in paths] == inodes   # served on systemd's sockets, not re-bound
    finally:
        code = bp.stop()
    assert code == 0, bp.log()
    assert notify.next() == "STOPPING=1"
    notify.close()
    assert all(os.path.exists(p) for p in paths), "the back-end unlinked systemd's socket files"
    assert not os.path.exists(pidfile)


def test_net_ports_match_passed_sockets_by_path_not_by_order(sockdir):
    paths = [os.path.join(sockdir, f"p{i}.sock") for i in range(2)]
    listeners = [listener(p) for p in reversed(paths)]   # fd 3 is p1, fd 4 is p0
    notify = Notify(sockdir, abstract=True)
    bp = activate(module("net") + ["--socket", paths[0], "--socket", paths[1], "-v"], listeners,
                  os.path.join(sockdir, "net.log"), notify=notify)
    try:
        assert notify.next() == "READY=1", bp.log()
        with NetDriver.connect(paths[0]) as drv:
            drv.send(b"", raw=bytes(12))   # a runt from the port served on p0
            drv.wait_tx()
            bp.proc.send_signal(signal.SIGUSR1)
            text = bp.wait_log(" stats {")
        stats = json.loads(text.split(" stats ", 1)[1].splitlines()[0])
        assert stats[f"port 0 ({paths[0]})"]["tx_runt"] == 1
        assert stats[f"port 1 ({paths[1]})"]["tx_runt"] == 0
    finally:
        assert bp.stop() == 0, bp.log()
        notify.close()


def test_fdnames_select_vsock_vms(sockdir):
    pa, pb = os.path.join(sockdir, "a.sock"), os.path.join(sockdir, "b.sock")
    notify = Notify(sockdir, abstract=True)
    bp = activate(module("vsock") + ["--vm", "guest-cid=3,fd=vm-a", "--vm", "guest-cid=4,fd=vm-b", "-v"],
                  [listener(pb), listener(pa)], os.path.join(sockdir, "vsock.log"),
                  names="vm-b:vm-a", notify=notify)
    try:
        assert notify.next() == "READY=1", bp.log()
        with VsockDriver.attach(pa) as drv:
            assert drv.cid == 3
        with VsockDriver.attach(pb) as drv:
            assert drv.cid == 4
    finally:
        assert bp.stop() == 0, bp.log()
        notify.close()


@pytest.mark.parametrize("prog", ["vhost-user-blk", "vhost-user-gpu"])
def test_single_passed_socket_serves_without_socket_option(prog, sockdir):
    path = os.path.join(sockdir, "one.sock")
    notify = Notify(sockdir, abstract=True)
    extra = ["--size", "8M", "-v"] if prog == "vhost-user-blk" else ["--verbose"]
    bp = activate(module(prog) + extra, [listener(path)], os.path.join(sockdir, "one.log"),
                  names="one", notify=notify)
    try:
        assert notify.next() == "READY=1", bp.log()
        if prog == "vhost-user-blk":
            with BlkDriver.connect(path) as drv:
                drv.write(0, b"s" * 512)
                assert drv.read(0, 512) == b"s" * 512
        else:
            with GpuDriver.connect(path) as drv:
                assert drv.create_2d(1, 4, 4) == T.RESP_OK_NODATA
    finally:
        assert bp.stop() == 0, bp.log()
        notify.close()


def test_two_passed_sockets_for_a_one_device_back_end_is_a_usage_error(sockdir):
    socks = [listener(os.path.join(sockdir, f"{i}.sock")) for i in range(2)]
    bp = activate(module("blk"), socks, os.path.join(sockdir, "blk.log"))
    assert bp.proc.wait(30) == 2
    assert "vhost-user-blk: error: LISTEN_FDS: 2 sockets passed" in bp.log()


def test_listen_pid_of_another_process_is_ignored(sockdir):
    """A child that inherits systemd's variables must not take the sockets as its own."""
    s = listener(os.path.join(sockdir, "x.sock"))
    env = dict(os.environ, LISTEN_PID=str(os.getpid()), LISTEN_FDS="1")
    out = subprocess.run(module("blk"), pass_fds=(s.fileno(),), env=env, capture_output=True, text=True)
    s.close()
    assert out.returncode == 2
    assert out.stderr.splitlines()[-1] == "vhost-user-blk: error: one of --socket PATH or --fd N is required"


def test_ready_is_sent_once_the_socket_listens(sockdir):
    """Without activation the back-end binds its path; READY=1 means a VMM can connect now."""
    path = os.path.join(sockdir, "late.sock")
    notify = Notify(sockdir)
    log_path = os.path.join(sockdir, "late.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(module("blk") + ["--socket", path, "--size", "8M"],
                                env=dict(os.environ, NOTIFY_SOCKET=notify.env), stdout=log,
                                stderr=subprocess.STDOUT)
    bp = BackendProcess.adopt(proc, path, log_path)
    try:
        assert notify.next() == "READY=1", bp.log()
        with BlkDriver.connect(path) as drv:   # no waiting for the file: it listens already
            assert drv.read(0, 512) == bytes(512)
    finally:
        assert bp.stop() == 0
        notify.close()
