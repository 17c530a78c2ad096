"""The sandbox of the running vhost-user-blk: on by default, refuses, kills on execve."""
from __future__ import annotations

import os
import signal

import pytest

from backends_proc import start_blk
from vhost_user import sandbox
from vhost_user.backends.blk.driver import BlkDriver


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def _fd_targets(pid: int) -> list[str]:
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:
            pass  # closed meanwhile
    return out


def _io_round(sock: str) -> None:
    with BlkDriver.connect(sock, num_queues=2) as drv:
        drv.write(8, b"s" * 4096, queue=1)
        assert drv.read(8, 4096) == b"s" * 4096
        drv.flush()
        drv.discard(64, 8)
        drv.write_zeroes(72, 8)
        drv.fe.get_inflight_fd(128)


def test_sandbox_is_on_by_default_and_blk_serves_under_it(sockdir, shm_image):
    bp = start_blk(sockdir, "--num-queues", "2", image=shm_image(8 << 20))
    try:
        _io_round(bp.socket)
        _io_round(bp.socket)  # and a second front-end after the first left
        st = _status(bp.pid)
        assert st["NoNewPrivs"].strip() == "1"
        assert st["Seccomp"].strip() == "2"  # SECCOMP_MODE_FILTER
        assert "blk profile active" in bp.log()
        # io_uring operations would bypass seccomp: the event loop must not hold a ring.
        assert "anon_inode:[io_uring]" not in _fd_targets(bp.pid) and "io_uring" not in bp.log(), bp.log()[-2000:]
        assert bp.alive()
    finally:
        assert bp.stop() == 0, bp.log()[-3000:]


def test_no_sandbox_leaves_the_process_unconfined(sockdir, shm_image):
    bp = start_blk(sockdir, "--no-sandbox", image=shm_image(8 << 20))
    try:
        with BlkDriver.connect(bp.socket) as drv:
            assert drv.read(0, 512) == bytes(512)
        assert _status(bp.pid)["Seccomp"].strip() == "0"
        assert "profile active" not in bp.log()
    finally:
        bp.stop()


def test_sandboxed_blk_refuses_fork_socket_and_writes_and_dies_on_execve(sockdir, shm_image, monkeypatch):
    monkeypatch.setenv("VHOST_USER_SANDBOX_PROBE", "1")
    bp = start_blk(sockdir, "--num-queues", "2", image=shm_image(8 << 20))
    try:
        _io_round(bp.socket)
        os.kill(bp.pid, signal.SIGUSR2)
        rc = bp.proc.wait(20)
        log = bp.log()
        assert rc == -signal.SIGSYS, f"exit {rc}, expected death by SIGSYS:\n{log[-3000:]}"
        for what in ("fork", "socket(AF_INET)", "open for writing"):
            assert f"sandbox probe: {what} refused: EPERM" in log, log[-3000:]
        assert "ALLOWED" not in log and "execve ran" not in log
    finally:
        bp.stop()


def test_unknown_profile_is_refused_before_anything_changes():
    with pytest.raises(sandbox.SandboxError):
        sandbox.prepare("no-such-backend")
    assert _status(os.getpid())["Seccomp"].strip() == "0"


def test_a_profile_cannot_allow_a_deny_kill_syscall():
    with pytest.raises(ValueError, match="execve"):
        sandbox.register_profile("bad", {"execve", "read"})
    assert "bad" not in sandbox.PROFILES


def test_blk_profile_covers_the_io_the_engine_does():
    allowed = sandbox.profile_syscalls("blk")
    for name in ("preadv", "pwritev", "fallocate", "fdatasync", "recvmsg", "sendmsg", "accept4",
                 "eventfd2", "memfd_create", "mmap", "futex", "epoll_wait", "write"):
        assert name in allowed
    assert not allowed & sandbox.KILL_SYSCALLS


# -- net, vsock, gpu: the same evidence for each back-end's own profile -------------------

def _negotiate_and_run_queue(sock: str) -> None:
    from vhost_user.frontend import Frontend

    with Frontend(sock) as fe:
        fe.negotiate(0)
        fe.set_mem_table()
        fe.setup_queue(0, 64)
        fe.setup_queue(1, 64)
        assert fe.stop_queue(0) == 0


def _start(sockdir: str, name: str, *args: str):
    import sys

    from backends_proc import spawn

    sock = os.path.join(sockdir, f"{name}.sock")
    argv = [sys.executable, "-m", f"vhost_user.backends.{name}", "--socket", sock, "--log-level", "info",
            *args]
    return spawn(argv, sock, os.path.join(sockdir, f"{name}.log"))


_OTHER_BACKENDS = {
    "net": (),
    "vsock": ("--guest-cid", "3", "--uds-path", "{dir}/vsock.uds"),
    "gpu": ("--display", "png:{dir}/png"),
}


@pytest.mark.parametrize("name", sorted(_OTHER_BACKENDS))
def test_sandboxed_backend_serves_refuses_and_dies_on_execve(name, sockdir, monkeypatch):
    monkeypatch.setenv("VHOST_USER_SANDBOX_PROBE", "1")
    args = [a.replace("{dir}", sockdir) for a in _OTHER_BACKENDS[name]]
    bp = _start(sockdir, name, *args)
    try:
        _negotiate_and_run_queue(bp.socket)
        _negotiate_and_run_queue(bp.socket)  # and the next front-end
        if name == "vsock":  # the host side accepts and reads a CONNECT line while confined
            import socket as so

            s = so.socket(so.AF_UNIX, so.SOCK_STREAM)
            s.settimeout(10)
            s.connect(os.path.join(sockdir, "vsock.uds"))
            s.sendall(b"CONNECT 1234\n")
            s.close()
        st = _status(bp.pid)
        assert st["NoNewPrivs"].strip() == "1" and st["Seccomp"].strip() == "2", bp.log()[-2000:]
        assert f"{name} profile active" in bp.log()
        assert "anon_inode:[io_uring]" not in _fd_targets(bp.pid)
        assert bp.alive()
        os.kill(bp.pid, signal.SIGUSR2)
        rc = bp.proc.wait(20)
        log = bp.log()
        assert rc == -signal.SIGSYS, f"exit {rc}, expected death by SIGSYS:\n{log[-3000:]}"
        for what in ("fork", "socket(AF_INET)", "open for writing"):
            assert f"sandbox probe: {what} refused: EPERM" in log, log[-3000:]
        assert "ALLOWED" not in log and "execve ran" not in log
    finally:
        bp.stop()


def test_gpu_virgl_runs_unconfined_and_says_so(sockdir):
    from vhost_user.backends.gpu.virgl import virgl_unavailable_reason

    reason = virgl_unavailable_reason()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"virgl unavailable in CI: {reason}")
        pytest.skip(reason)
    bp = _start(sockdir, "gpu", "--virgl")
    try:
        _negotiate_and_run_queue(bp.socket)
        assert _status(bp.pid)["Seccomp"].strip() == "0"
        assert "sandbox: --virgl runs unconfined" in bp.log()
        assert "profile active" not in bp.log()
    finally:
        assert bp.stop() == 0, bp.log()[-3000:]
