"""Start real back-end processes for tests: ours and the peers (qemu-storage-daemon).

Tests talk to real processes over real sockets; these helpers only start them,
wait for their socket, and stop exactly the processes they started.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

# One require_tool for every test (skip on a developer machine, fail in CI);
# re-exported here for the tests that import it from backends_proc.
from harness.fixtures import require_tool

__all__ = [
    "BackendProcess", "spawn", "start_blk", "start_qsd_blk", "require_tool", "wait_for_socket", "open_fds",
]


def open_fds() -> set[int]:
    """The fds this process has open now (for leak checks)."""
    return {int(x) for x in os.listdir("/proc/self/fd")}


def wait_for_socket(path: str, proc: subprocess.Popen, timeout: float = 20.0, log_path: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            return
        if proc.poll() is not None:
            tail = open(log_path, errors="replace").read()[-4000:] if log_path else ""
            raise RuntimeError(f"back-end exited with {proc.returncode} before listening:\n{tail}")
        time.sleep(0.02)
    raise TimeoutError(f"no socket at {path} after {timeout} s")


@dataclass
class BackendProcess:
    proc: subprocess.Popen
    socket: str
    log_path: str
    extra: dict = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def alive(self) -> bool:
        return self.proc.poll() is None


def spawn(argv: list[str], sock: str, log_path: str, **kw) -> BackendProcess:
    """Start `argv` with its output in `log_path`; return once `sock` exists."""
    log = open(log_path, "wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, **kw)
    log.close()
    bp = BackendProcess(proc, sock, log_path)
    try:
        wait_for_socket(sock, proc, log_path=log_path)
    except BaseException:
        bp.stop(signal.SIGKILL)
        raise
    return bp


def start_blk(workdir, *args: str, sock: str | None = None, image: str | None = None,
              name: str = "blk") -> BackendProcess:
    """Our vhost-user-blk, as a user runs it (the installed module), in `workdir`."""
    sock = sock or os.path.join(workdir, f"{name}.sock")
    argv = [sys.executable, "-m", "vhost_user.backends.blk", "--socket", sock, "-v"]
    if image:
        argv += ["--image", image]
    return spawn(argv + list(args), sock, os.path.join(workdir, f"{name}.log"))


def start_qsd_blk(workdir, image: str, *, num_queues: int = 1, writable: bool = True,
                  name: str = "qsd") -> BackendProcess:
    """qemu-storage-daemon's vhost-user-blk export, the peer we measure against."""
    qsd = require_tool("qemu-storage-daemon")
    sock = os.path.join(workdir, f"{name}.sock")
    argv = [
        qsd,
        "--blockdev", f"driver=file,node-name=file0,filename={image},cache.direct=off,aio=threads",
        "--export", f"type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,addr.path={sock},"
                    f"writable={'on' if writable else 'off'},num-queues={num_queues}",
    ]
    return spawn(argv, sock, os.path.join(workdir, f"{name}.log"))
