"""The sandbox of each running back-end: on by default, a private read-only root
(--sandbox-fs), seccomp; refuses, kills on execve, and still serves through the
built-in front-end."""
from __future__ import annotations

import os
import signal
import time

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


def _mountinfo(pid: int) -> list[list[str]]:
    with open(f"/proc/{pid}/mountinfo") as f:
        return [line.split() for line in f]


def _assert_private_root(pid: int, log: str, kind: str = "mount namespace") -> None:
    """The process sees a read-only tmpfs root of its own: no /etc, its own mount ns."""
    assert os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
    root = [m for m in _mountinfo(pid) if m[4] == "/"]
    assert len(root) == 1, root
    fstype = root[0][root[0].index("-") + 1]
    assert fstype == "tmpfs" and "ro" in root[0][5].split(","), root
    assert not os.path.exists(f"/proc/{pid}/root/etc/passwd")
    assert f"sandbox-fs: namespace ({kind}" in log, log[-2000:]


def _io_round(sock: str) -> None:
    with BlkDriver.connect(sock, num_queues=2) as drv:
        drv.write(8, b"s" * 4096, queue=1)
        assert drv.read(8, 4096) == b"s" * 4096
        drv.flush()
        drv.discard(64, 8)
        drv.write_zeroes(72, 8)
        drv.fe.get_inflight_fd(128)


def _assert_confined(bp, profile: str) -> None:
    """NO_NEW_PRIVS and a seccomp filter are on, the log names the `profile`, and the
    process has a private root."""
    st = _status(bp.pid)
    assert st["NoNewPrivs"].strip() == "1" and st["Seccomp"].strip() == "2", bp.log()[-2000:]  # SECCOMP_MODE_FILTER
    assert f"{profile} profile active" in bp.log()
    _assert_private_root(bp.pid, bp.log())


def _probe_and_expect_sigsys(bp) -> None:
    """SIGUSR2 makes a back-end under VHOST_USER_SANDBOX_PROBE=1 try what its sandbox
    forbids: each try is refused and the last one, execve, kills it with SIGSYS."""
    os.kill(bp.pid, signal.SIGUSR2)
    rc = bp.proc.wait(20)
    log = bp.log()
    assert rc == -signal.SIGSYS, f"exit {rc}, expected death by SIGSYS:\n{log[-3000:]}"
    for what in ("fork", "socket(AF_INET)", "open for writing"):
        assert f"sandbox probe: {what} refused: EPERM" in log, log[-3000:]
    assert "sandbox probe: read /etc/passwd refused: ENOENT" in log, log[-3000:]
    assert "ALLOWED" not in log and "execve ran" not in log


def test_sandbox_is_on_by_default_and_blk_serves_under_it(sockdir, shm_image):
    pidfile = os.path.join(sockdir, "blk.pid")
    bp = start_blk(sockdir, "--num-queues", "2", "--pidfile", pidfile, image=shm_image(8 << 20))
    try:
        _io_round(bp.socket)
        _io_round(bp.socket)  # and a second front-end after the first left
        _assert_confined(bp, "blk")
        # io_uring operations would bypass seccomp: the event loop must not hold a ring.
        assert "anon_inode:[io_uring]" not in _fd_targets(bp.pid) and "io_uring" not in bp.log(), bp.log()[-2000:]
        assert bp.running
    finally:
        assert bp.stop() == 0, bp.log()[-3000:]
    # removed at exit through directory fds: the paths are not in the private root
    assert not os.path.exists(bp.socket) and not os.path.exists(pidfile), os.listdir(sockdir)



def _threads_named(pid: int, name: str) -> list[int]:
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                if f.read().strip() == name:
                    out.append(int(tid))
        except FileNotFoundError:
            pass  # ended meanwhile
    return out


def test_sandboxed_blk_starts_its_io_threads_confined_and_serves_large_requests(sockdir, shm_image):
    """The I/O pool is created when a queue starts, after confinement: clone, futex and
    the threads' stacks must be allowed, and the new threads carry the filter."""
    image = shm_image(8 << 20)
    bp = start_blk(sockdir, "--io-threads", "2", image=image)
    try:
        data = os.urandom(1 << 20)  # the driver's largest request
        with BlkDriver.connect(bp.socket) as drv:
            drv.write(24, data, split=3)
            assert drv.read(24, len(data), split=2) == data
            deadline = time.monotonic() + 10
            while len(pool := _threads_named(bp.pid, "blk-io")) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)  # each thread names itself once it runs
            assert len(pool) == 2, bp.log()[-2000:]
            for tid in pool:
                with open(f"/proc/{bp.pid}/task/{tid}/status") as f:
                    assert "Seccomp:\t2" in f.read()
        with open(image, "rb") as f:
            f.seek(24 * 512)
            assert f.read(len(data)) == data
        assert "blk profile active" in bp.log() and bp.running
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
        _probe_and_expect_sigsys(bp)
    finally:
        bp.stop()


def test_sandbox_fs_none_keeps_the_host_root_and_seccomp(sockdir, shm_image):
    bp = start_blk(sockdir, "--sandbox-fs", "none", "--num-queues", "2", image=shm_image(8 << 20))
    try:
        _io_round(bp.socket)
        assert _status(bp.pid)["Seccomp"].strip() == "2"
        assert os.readlink(f"/proc/{bp.pid}/ns/mnt") == os.readlink("/proc/self/ns/mnt")
        assert os.path.exists(f"/proc/{bp.pid}/root/etc/passwd")
        assert "sandbox-fs: none" in bp.log()
    finally:
        assert bp.stop() == 0, bp.log()[-3000:]


def _require_root(what: str) -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail(f"{what} needs root in CI")
        pytest.skip(f"{what} needs root")


def test_sandbox_fs_chroot_leaves_an_empty_removed_root(sockdir, shm_image, monkeypatch):
    _require_root("chroot")
    monkeypatch.setenv("VHOST_USER_SANDBOX_PROBE", "1")
    bp = start_blk(sockdir, "--sandbox-fs", "chroot", "--num-queues", "2", image=shm_image(8 << 20))
    try:
        _io_round(bp.socket)
        assert os.readlink(f"/proc/{bp.pid}/root").endswith("(deleted)")
        assert os.listdir(f"/proc/{bp.pid}/root") == []
        assert "sandbox-fs: chroot" in bp.log()
        os.kill(bp.pid, signal.SIGUSR2)
        assert bp.proc.wait(20) == -signal.SIGSYS, bp.log()[-3000:]
        assert "sandbox probe: read /etc/passwd refused: ENOENT" in bp.log()
        assert "sandbox probe: / holds []" in bp.log()
    finally:
        bp.stop()


def _readable_install(become: list[str], stage: str) -> dict:
    """An environment in which `become` + this interpreter imports the installed package.

    Where the install is private to root (a Python under a mode-700 /root, as on the
    CI machine), the package and the few modules it needs from site-packages are
    copied into `stage`, which the unprivileged user can read, and put on PYTHONPATH."""
    import shutil
    import subprocess
    import sys

    import _cffi_backend
    import vhost_user

    env = dict(os.environ)
    probe = become + [sys.executable, "-c", "import vhost_user.backends.blk"]
    if subprocess.run(probe, capture_output=True, cwd="/", env=env).returncode == 0:
        return env
    os.makedirs(stage)
    shutil.copytree(os.path.dirname(vhost_user.__file__), os.path.join(stage, "vhost_user"))
    shutil.copy(_cffi_backend.__file__, stage)
    for root, dirs, files in os.walk(stage):
        os.chmod(root, 0o755)
        for name in files:
            os.chmod(os.path.join(root, name), 0o644)
    env["PYTHONPATH"] = stage
    assert subprocess.run(probe, capture_output=True, cwd="/", env=env).returncode == 0
    return env


def test_unprivileged_blk_confines_itself_in_a_user_namespace(sockdir, shm_image):
    """As an unprivileged user (uid 65534 here) the mount namespace comes with a user
    namespace that maps our own uid and gid; the disk still works."""
    import shutil
    import sys

    from backends_proc import spawn

    setpriv = shutil.which("setpriv")
    if setpriv is None or os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("setpriv (util-linux) and root are needed in CI")
        pytest.skip("needs setpriv and root to become an unprivileged user")
    work = os.path.join(sockdir, "nobody")
    os.mkdir(work)
    image = shm_image(8 << 20)
    for path in (work, image, os.path.dirname(image)):
        os.chown(path, 65534, 65534)
    os.chmod(sockdir, 0o755)
    sock = os.path.join(work, "u.sock")
    become = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
    argv = become + [sys.executable, "-m", "vhost_user.backends.blk", "--socket", sock,
                     "--image", image, "--num-queues", "2", "--log-level", "info"]
    bp = spawn(argv, sock, os.path.join(sockdir, "u.log"), cwd="/",
               env=_readable_install(become, os.path.join(sockdir, "site")))
    try:
        _io_round(bp.socket)
        assert os.readlink(f"/proc/{bp.pid}/ns/user") != os.readlink("/proc/self/ns/user")
        with open(f"/proc/{bp.pid}/uid_map") as f:
            assert f.read().split() == ["65534", "65534", "1"]
        _assert_private_root(bp.pid, bp.log(), "user+mount namespace")
    finally:
        assert bp.stop() == 0, bp.log()[-3000:]
    assert not os.path.exists(sock)


def test_unknown_profile_is_refused_before_anything_changes():
    with pytest.raises(sandbox.SandboxError):
        sandbox.prepare("no-such-backend")
    assert _status(os.getpid())["Seccomp"].strip() == "0"


def test_the_core_names_no_device_profile():
    """Each back-end states its own profile in backends/<dev>/sandbox.py; the core
    module holds none until a device registers it."""
    import subprocess
    import sys

    code = ("from vhost_user import sandbox; print(sorted(sandbox.PROFILES), sorted(sandbox.CONDITIONAL));"
            "import vhost_user.backends.vsock.device, vhost_user.backends.gpu.device;"
            "print(sorted(sandbox.PROFILES), sorted(sandbox.CONDITIONAL))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["[] []", "['gpu', 'gpu-virgl', 'vsock'] ['vsock']"]


def test_a_profile_cannot_allow_a_deny_kill_syscall():
    with pytest.raises(ValueError, match="execve"):
        sandbox.register_profile("bad", {"execve", "read"})
    assert "bad" not in sandbox.PROFILES


def test_blk_profile_covers_the_io_the_engine_does():
    import vhost_user.backends.blk.device  # noqa: F401 (its folder states its profile)

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


def _vsock_guest_reaches_host_port(sock: str, uds: str) -> None:
    """The guest connects to CID 2 port 5000: the back-end connects to `<uds>_5000`,
    a path it can reach only because its directory is kept in the private root."""
    import socket as so

    from vhost_user.backends.vsock.driver import VsockDriver

    host = so.socket(so.AF_UNIX, so.SOCK_STREAM)
    host.bind(f"{uds}_5000")
    host.listen(1)
    host.settimeout(10)
    try:
        with VsockDriver.attach(sock) as drv:
            conn = drv.connect(5000)
            peer, _ = host.accept()
            with peer:
                conn.send(b"ping from the guest")
                peer.settimeout(10)
                assert peer.recv(64) == b"ping from the guest"
                peer.sendall(b"pong")
                assert conn.recv_exact(4) == b"pong"
            conn.close()
    finally:
        host.close()


def _gpu_frame_reaches_png(sock: str, directory: str) -> None:
    from vhost_user.backends.gpu.driver import GpuDriver

    assert not os.listdir(directory)  # nothing drawn before confinement
    with GpuDriver.connect(sock, display=False) as drv:
        drv.setup_frame(1, 64, 48)
        assert drv.frame_cycles(1, 64, 48, 2) == 0
    with open(os.path.join(directory, "scanout-0.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("name", sorted(_OTHER_BACKENDS))
def test_sandboxed_backend_serves_refuses_and_dies_on_execve(name, sockdir, monkeypatch):
    monkeypatch.setenv("VHOST_USER_SANDBOX_PROBE", "1")
    args = [a.replace("{dir}", sockdir) for a in _OTHER_BACKENDS[name]]
    bp = _start(sockdir, name, *args)
    try:
        if name == "gpu":  # png:DIR files are made after confinement, under its dir fd
            _gpu_frame_reaches_png(bp.socket, os.path.join(sockdir, "png"))
        else:
            _negotiate_and_run_queue(bp.socket)
        _negotiate_and_run_queue(bp.socket)  # and the next front-end
        if name == "vsock":  # the host side accepts and reads a CONNECT line while confined
            import socket as so

            s = so.socket(so.AF_UNIX, so.SOCK_STREAM)
            s.settimeout(10)
            s.connect(os.path.join(sockdir, "vsock.uds"))
            s.sendall(b"CONNECT 1234\n")
            s.close()
            _vsock_guest_reaches_host_port(bp.socket, os.path.join(sockdir, "vsock.uds"))
        _assert_confined(bp, name)
        assert "anon_inode:[io_uring]" not in _fd_targets(bp.pid)
        assert bp.running
        _probe_and_expect_sigsys(bp)
    finally:
        bp.stop()


def _virgl_red_frame(sock: str) -> None:
    """A 3D context clears a 3D resource red; the display listener must get red pixels
    (the first frame drawn after confinement)."""
    import struct

    import numpy as np

    from vhost_user.backends.gpu.commands import CtrlHeader, CtrlType as T, Rect
    from vhost_user.backends.gpu.commands3d import CtxCreate, CtxResource, ResourceCreate3d, Submit3d
    from vhost_user.backends.gpu.display_protocol import GpuRequest as G
    from vhost_user.backends.gpu.driver import DRIVER_FEATURES, GpuDriver

    def f32(v: float) -> int:
        return struct.unpack("<I", struct.pack("<f", v))[0]

    def cmd0(cmd: int, obj: int, length: int) -> int:
        return cmd | obj << 8 | length << 16

    words = [cmd0(1, 8, 5), 1, 5, 2, 0, 0,                           # CREATE_OBJECT SURFACE 1 on res 5
             cmd0(5, 0, 3), 1, 0, 1,                                 # SET_FRAMEBUFFER_STATE
             cmd0(7, 0, 8), 4, *(f32(c) for c in (1.0, 0.0, 0.0, 1.0)), 0, 0, 0]  # CLEAR red
    with GpuDriver.connect(sock, features=DRIVER_FEATURES | 1) as drv:
        hdr = lambda t, **kw: CtrlHeader(t, ctx_id=1, **kw)  # noqa: E731
        for cmd in (CtxCreate(hdr(T.CMD_CTX_CREATE), b"sandbox"), ResourceCreate3d(5, 2, 2, 0b1010, 32, 24),
                    CtxResource(hdr(T.CMD_CTX_ATTACH_RESOURCE), 5),
                    Submit3d(struct.pack(f"<{len(words)}I", *words), hdr(T.CMD_SUBMIT_3D))):
            assert CtrlHeader.unpack(drv.command(cmd.pack())).type == T.RESP_OK_NODATA
        assert drv.set_scanout(0, 5, Rect(0, 0, 32, 24)) == T.RESP_OK_NODATA
        assert drv.flush(5, Rect(0, 0, 32, 24)) == T.RESP_OK_NODATA
        assert drv.listener.wait_for(G.UPDATE, 1)
        assert np.all(drv.listener.rgb(0) == np.array([255, 0, 0], np.uint8))


def test_gpu_virgl_is_confined_after_the_renderer_is_up_and_still_renders(sockdir, monkeypatch):
    from vhost_user.backends.gpu.virgl import virgl_unavailable_reason

    reason = virgl_unavailable_reason()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"virgl unavailable in CI: {reason}")
        pytest.skip(reason)
    monkeypatch.setenv("VHOST_USER_SANDBOX_PROBE", "1")
    bp = _start(sockdir, "gpu", "--virgl")
    try:
        _virgl_red_frame(bp.socket)
        _virgl_red_frame(bp.socket)  # a second front-end: a new context, a new frame
        _assert_confined(bp, "gpu-virgl")
        assert bp.running
        _probe_and_expect_sigsys(bp)
    finally:
        bp.stop()
