"""The process conventions every back-end program shares, run as the real programs.

`--fd` with a connected socket (libvirt's and crosvm's socket pair) on all four
back-ends, driven through real I/O by the built-in front-end; `-V`;
`--print-description`'s binary; SIGHUP and SIGUSR1; never taking over a live
socket and unlinking only our own socket file; `--pidfile`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import sysconfig
from importlib import metadata

import pytest

from backends_proc import spawn
from harness.backend import BackendProcess
from vhost_user.backends.gpu.commands import CtrlType as T
from vhost_user.backends.blk.driver import BlkDriver
from vhost_user.backends.gpu.driver import GpuDriver
from vhost_user.backends.net.driver import NetDriver
from vhost_user.backends.vsock.driver import VsockDriver
from vsock_proc import host_connect, read_line

PROGRAMS = {
    "vhost-user-blk": "vhost_user.backends.blk",
    "vhost-user-net": "vhost_user.backends.net",
    "vhost-user-vsock": "vhost_user.backends.vsock",
    "vhost-user-gpu": "vhost_user.backends.gpu",
    "vhost-user-rng": "vhost_user.backends.rng",
}
# What each back-end needs besides its endpoint.
EXTRA = {"vhost-user-blk": ["--size", "8M"], "vhost-user-net": [], "vhost-user-vsock": ["--guest-cid", "3"],
         "vhost-user-gpu": [], "vhost-user-rng": []}
VERBOSE = {"vhost-user-gpu": "--verbose"}


def argv_of(prog: str) -> list[str]:
    return [sys.executable, "-m", PROGRAMS[prog]]


def start(prog: str, sockdir: str, *args: str, name: str = "b") -> BackendProcess:
    sock = os.path.join(sockdir, f"{name}.sock")
    argv = argv_of(prog) + ["--socket", sock, VERBOSE.get(prog, "-v"), *EXTRA[prog], *args]
    return spawn(argv, sock, os.path.join(sockdir, f"{name}.log"))


# -- --fd with a connected socket --------------------------------------------------------
def _connected(prog: str, sockdir: str, *args: str, pairs: int = 1):
    """Start `prog` with --fd on one end of `pairs` socket pairs; return (proc, our ends, log)."""
    ours, theirs = zip(*(socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(pairs)))
    log_path = os.path.join(sockdir, "fd.log")
    fds = [a for s in theirs for a in ("--fd", str(s.fileno()))]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv_of(prog) + fds + [VERBOSE.get(prog, "-v"), *args],
                                pass_fds=[s.fileno() for s in theirs], stdout=log, stderr=subprocess.STDOUT)
    for s in theirs:
        s.close()
    return proc, list(ours), log_path


def _exit_code_after_close(proc: subprocess.Popen, log_path: str) -> int:
    try:
        return proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError("the back-end kept running after its only front-end hung up:\n"
                             + open(log_path, errors="replace").read()[-3000:])


def test_blk_serves_a_connected_fd_and_exits_0_when_it_closes(sockdir):
    proc, (sock,), log = _connected("vhost-user-blk", sockdir, "--size", "8M")
    with BlkDriver.connect(sock) as drv:
        drv.write(16, b"c" * 4096)
        assert drv.read(16, 4096) == b"c" * 4096
    assert _exit_code_after_close(proc, log) == 0


def test_net_serves_connected_fds_as_ports_and_exits_0_when_both_close(sockdir):
    proc, (s0, s1), log = _connected("vhost-user-net", sockdir, pairs=2)
    a, b = NetDriver.connect(s0), NetDriver.connect(s1)
    try:
        b.fill_rx()
        frame = b"\xff" * 6 + b"\x52\x54\x00\x00\x00\x0a" + b"\x08\x00" + bytes(range(46))
        a.send(frame)
        assert [f for _, f in b.recv()] == [frame]
    finally:
        a.close()
        b.close()
    assert _exit_code_after_close(proc, log) == 0


def test_vsock_serves_a_connected_fd_and_exits_0_when_it_closes(sockdir):
    uds = os.path.join(sockdir, "vm.vsock")
    proc, (sock,), log = _connected("vhost-user-vsock", sockdir, "--guest-cid", "5", "--uds-path", uds)
    with VsockDriver.attach(sock) as drv:
        assert drv.cid == 5
        drv.listen(1234)
        h, _ = host_connect(uds, 1234, extra=b"over a socket pair")
        g = drv.accept(1234)
        assert read_line(h).startswith(b"OK ")
        assert g.recv_exact(18) == b"over a socket pair"
        g.send(b"back")
        assert h.recv(4) == b"back"
        h.close()
    assert _exit_code_after_close(proc, log) == 0


def test_gpu_serves_a_connected_fd_and_exits_0_when_it_closes(sockdir):
    """libvirt starts vhost-user-gpu with one end of a socket pair as --fd."""
    proc, (sock,), log = _connected("vhost-user-gpu", sockdir)
    with GpuDriver.connect(sock) as drv:
        assert drv.create_2d(1, 4, 4) == T.RESP_OK_NODATA
    assert _exit_code_after_close(proc, log) == 0


def test_fd_of_an_unconnected_socket_is_refused(sockdir):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    fd = s.fileno()
    try:
        out = subprocess.run(argv_of("vhost-user-blk") + ["--fd", str(fd)], pass_fds=(fd,),
                             capture_output=True, text=True)
    finally:
        s.close()
    assert out.returncode == 1
    assert out.stderr == f"vhost-user-blk: error: --fd {fd}: socket is neither listening nor connected\n"


# -- -V and --print-description -----------------------------------------------------------
@pytest.mark.parametrize("prog", [*PROGRAMS, "vhost-user-bench"])
def test_version_prints_program_and_version(prog):
    module = PROGRAMS.get(prog, "vhost_user.frontend.bench")
    for flag in ("-V", "--version"):
        out = subprocess.run([sys.executable, "-m", module, flag], capture_output=True, text=True)
        assert (out.returncode, out.stdout, out.stderr) == \
            (0, f"{prog} {metadata.version('vhost-user-backends')}\n", "")


def _console_script(prog: str) -> str:
    for where in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        path = os.path.join(where, prog)
        if os.access(path, os.X_OK):
            return path
    pytest.fail(f"{prog}: no console script beside this interpreter (is the package installed?)")


@pytest.mark.parametrize("prog", ["vhost-user-blk", "vhost-user-gpu"])
def test_print_description_names_the_running_program_not_a_path_lookup(prog, tmp_path):
    """Another `prog` first on PATH must not end up in the description."""
    decoy = tmp_path / prog
    decoy.write_text("#!/bin/sh\nexit 0\n")
    decoy.chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}")
    script = _console_script(prog)
    for argv in ([script], argv_of(prog)):
        out = subprocess.run(argv + ["--print-description"], capture_output=True, text=True, env=env,
                             cwd=tmp_path, check=True)
        binary = json.loads(out.stdout)["binary"]
        assert binary == os.path.realpath(script), argv
        caps = subprocess.run([binary, "--print-capabilities"], capture_output=True, text=True, check=True)
        assert json.loads(caps.stdout)["type"] == json.loads(out.stdout)["type"]


# -- signals ---------------------------------------------------------------------------------
# vhost-user-blk gives SIGHUP its own meaning: re-read the image's size (online resize).
SIGHUP_STOPS = [p for p in PROGRAMS if p != "vhost-user-blk"]


@pytest.mark.parametrize("prog", SIGHUP_STOPS)
def test_sighup_stops_cleanly_and_removes_the_socket(prog, sockdir):
    bp = start(prog, sockdir)
    assert bp.stop(signal.SIGHUP) == 0, bp.log()
    assert not os.path.exists(bp.socket)
    assert "Traceback" not in bp.log()


def test_sighup_to_blk_resizes_instead_of_stopping(sockdir):
    bp = start("vhost-user-blk", sockdir)
    try:
        bp.proc.send_signal(signal.SIGHUP)
        bp.wait_log("resize:")
        with BlkDriver.connect(bp.socket) as drv:
            drv.read(0, 512)
        assert bp.running
    finally:
        assert bp.stop() == 0, bp.log()


def _stats_lines(text: str) -> list[dict]:
    return [json.loads(line.split(" stats ", 1)[1]) for line in text.splitlines() if " stats {" in line]


@pytest.mark.parametrize("prog", PROGRAMS)
def test_sigusr1_logs_one_json_line_of_counters_and_keeps_serving(prog, sockdir):
    bp = start(prog, sockdir)
    try:
        bp.proc.send_signal(signal.SIGUSR1)
        text = bp.wait_log(" stats {")
        (stats,) = _stats_lines(text)
        (entry,) = stats.values()
        assert bp.socket in next(iter(stats))
        assert entry["sessions"] == 0 and entry["connected"] is False
        bp.proc.send_signal(signal.SIGUSR1)
        bp.wait_log(" stats {", count=2)
        assert bp.running
    finally:
        assert bp.stop() == 0


# The loop runs, serve_devices has not yet handed it the signals: a SIGUSR1 raised then
# reaches both the plain handler and uvloop's self-pipe. It once dumped twice.
_SIGNAL_IN_THE_GAP = """
import os, signal, sys
from vhost_user import cli
real = cli.serve_devices
def serve_devices(entries, on_loop=None, **kw):
    def hook(loop):
        if on_loop is not None:
            on_loop(loop)
        loop.call_soon(os.kill, os.getpid(), signal.SIGUSR1)
        loop.call_later(1.0, os.kill, os.getpid(), signal.SIGTERM)
    return real(entries, on_loop=hook, **kw)
cli.serve_devices = serve_devices
from vhost_user.backends.rng.__main__ import main
sys.exit(main(["--socket", sys.argv[1]]))
"""


def test_a_signal_as_the_loop_starts_is_acted_on_once(sockdir):
    out = subprocess.run([sys.executable, "-c", _SIGNAL_IN_THE_GAP, os.path.join(sockdir, "gap.sock")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert len(_stats_lines(out.stderr)) == 1, out.stderr


def test_poll_us_takes_requests_without_kicks_and_counts_them(sockdir):
    """--poll-us: a request the driver submits while the worker polls needs no wake-up."""
    bp = start("vhost-user-blk", sockdir, "--poll-us", "100000")
    try:
        with BlkDriver.connect(bp.socket) as drv:
            for i in range(20):  # each one right after the last completed: inside the 0.1 s poll
                drv.write(8 * i, b"p" * 4096)
            bp.proc.send_signal(signal.SIGUSR1)
            (stats,) = _stats_lines(bp.wait_log(" stats {"))
        queue = stats[bp.socket]["queues"]["0"]
        assert queue["requests"] >= 20 and queue["polled"] > 0, queue
    finally:
        assert bp.stop() == 0


@pytest.mark.parametrize("prog", PROGRAMS)
def test_every_program_serves_with_poll_us(prog, sockdir):
    bp = start(prog, sockdir, "--poll-us", "50")
    try:
        assert bp.running
    finally:
        assert bp.stop() == 0


def test_sigusr1_line_has_per_queue_counters_of_the_running_session(sockdir):
    bp = start("vhost-user-blk", sockdir)
    try:
        with BlkDriver.connect(bp.socket) as drv:
            for i in range(3):
                drv.write(8 * i, b"q" * 4096)
            bp.proc.send_signal(signal.SIGUSR1)
            (stats,) = _stats_lines(bp.wait_log(" stats {"))
        entry = stats[bp.socket]
        assert entry["connected"] is True
        assert entry["queues"]["0"]["requests"] >= 3
    finally:
        assert bp.stop() == 0


def test_vsock_sigusr1_shows_the_device_drop_counters(sockdir):
    bp = start("vhost-user-vsock", sockdir)
    try:
        bp.proc.send_signal(signal.SIGUSR1)
        (stats,) = _stats_lines(bp.wait_log(" stats {"))
        (entry,) = stats.values()
        assert {"dropped", "rst_sent", "connections"} <= set(entry)
    finally:
        assert bp.stop() == 0


def test_net_sigusr1_is_one_handler_with_drop_lines_and_port_names(sockdir):
    """net's own drop lines (StatsMonitor) still come, from the same SIGUSR1 as the JSON line."""
    bp = start("vhost-user-net", sockdir)
    try:
        with NetDriver.connect(bp.socket) as drv:
            drv.send(b"", raw=bytes(12))   # a header and no frame: a runt, counted and logged
            drv.wait_tx()
            bp.proc.send_signal(signal.SIGUSR1)
            text = bp.wait_log(" stats {")
        (stats,) = _stats_lines(text)
        assert list(stats) == [f"port 0 ({bp.socket})"]
        assert stats[f"port 0 ({bp.socket})"]["tx_runt"] == 1
        assert "1 runt frame(s)" in text.split(" stats {")[0]
    finally:
        assert bp.stop() == 0


# -- never take over a live socket; unlink only our own --------------------------------------
@pytest.mark.parametrize("prog", PROGRAMS)
def test_a_live_socket_is_never_taken_over(prog, sockdir):
    first = start(prog, sockdir)
    try:
        out = subprocess.run(argv_of(prog) + ["--socket", first.socket, *EXTRA[prog]],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 1
        assert out.stderr == f"{prog}: error: {first.socket}: another back-end is serving {first.socket}\n"
        assert first.running
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(first.socket)   # still the first one's socket
        s.close()
    finally:
        assert first.stop() == 0


def test_a_live_socket_busy_with_a_front_end_is_not_taken_over(sockdir):
    """The probe must not block when the live back-end's backlog is full."""
    first = start("vhost-user-blk", sockdir)
    waiting = []
    try:
        with BlkDriver.connect(first.socket):
            for _ in range(8):   # fill the backlog while the first session runs
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
                try:
                    s.connect(first.socket)
                except BlockingIOError:
                    s.close()
                    break
                waiting.append(s)
            out = subprocess.run(argv_of("vhost-user-blk") + ["--socket", first.socket],
                                 capture_output=True, text=True, timeout=60)
        assert out.returncode == 1 and "another back-end is serving" in out.stderr
    finally:
        for s in waiting:
            s.close()
        assert first.stop() == 0


def test_a_stale_socket_file_is_replaced(sockdir):
    path = os.path.join(sockdir, "b.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()   # the file stays, nobody listens: what a killed back-end leaves
    bp = start("vhost-user-blk", sockdir)
    try:
        bp.wait_log("ready")   # the path existed before: wait for the back-end, not the file
        with BlkDriver.connect(path) as drv:
            assert drv.read(0, 512) == bytes(512)
    finally:
        assert bp.stop() == 0


def test_stopping_unlinks_only_a_socket_file_that_is_still_ours(sockdir):
    first = start("vhost-user-blk", sockdir, name="a")
    os.rename(first.socket, first.socket + ".moved")   # someone else now owns the name...
    second = spawn(argv_of("vhost-user-blk") + ["--socket", first.socket, "-v"], first.socket,
                   os.path.join(sockdir, "second.log"))
    try:
        assert first.stop() == 0
        assert os.path.exists(first.socket), "the first back-end removed the second one's socket"
        with BlkDriver.connect(first.socket) as drv:
            assert drv.read(0, 512) == bytes(512)
    finally:
        assert second.stop() == 0
    assert not os.path.exists(first.socket)


# -- --pidfile -----------------------------------------------------------------------------------
@pytest.mark.parametrize("prog", PROGRAMS)
def test_pidfile_written_when_ready_locked_and_removed_on_stop(prog, sockdir):
    pidfile = os.path.join(sockdir, "b.pid")
    bp = start(prog, sockdir, "--pidfile", pidfile)
    try:
        bp.wait_log("ready")
        with open(pidfile) as f:
            assert f.read() == f"{bp.pid}\n"
        other = os.path.join(sockdir, "other.sock")
        out = subprocess.run(argv_of(prog) + ["--socket", other, "--pidfile", pidfile, *EXTRA[prog]],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 1
        assert out.stderr == f"{prog}: error: {pidfile}: locked by running process {bp.pid}\n"
        assert not os.path.exists(other)
    finally:
        assert bp.stop() == 0
    assert not os.path.exists(pidfile)


def test_stale_pidfile_of_a_dead_process_is_taken_over(sockdir):
    pidfile = os.path.join(sockdir, "b.pid")
    with open(pidfile, "w") as f:
        f.write("999999\n")   # no lock held: the process that wrote it is gone
    bp = start("vhost-user-blk", sockdir, "--pidfile", pidfile)
    try:
        bp.wait_log("ready")
        assert open(pidfile).read() == f"{bp.pid}\n"
    finally:
        assert bp.stop() == 0


@pytest.mark.parametrize("prog", sorted(PROGRAMS))
def test_an_impossible_queue_size_is_a_usage_error(prog, tmp_path):
    """Every back-end with --queue-size refuses 3 the same way: usage, exit 2, one line."""
    helptext = subprocess.run(argv_of(prog) + ["--help"], capture_output=True, text=True).stdout
    if "--queue-size" not in helptext:
        pytest.skip(f"{prog} has no --queue-size (its queue sizes are fixed)")
    r = subprocess.run(argv_of(prog) + ["--socket", str(tmp_path / "q.sock"), *EXTRA[prog],
                                        "--queue-size", "3"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.splitlines()[-1] == \
        f"{prog}: error: --queue-size 3 must be a power of two in 4..32768", r.stderr
    assert not (tmp_path / "q.sock").exists()
