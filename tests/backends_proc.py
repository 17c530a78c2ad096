"""Start real back-end processes for tests: ours and the peers (qemu-storage-daemon).

Tests talk to real processes over real sockets; these helpers only start them,
wait for their socket, and stop exactly the processes they started.
"""

from __future__ import annotations

import os
import subprocess
import sys

from harness.backend import BackendProcess, wait_for_socket
# One require_tool and one wait_for_socket for every test (require_tool skips
# on a developer machine, fails in CI); re-exported for the tests that import
# them from here.
from harness.fixtures import require_tool

__all__ = ["spawn", "start_blk", "start_qsd_blk", "require_tool", "wait_for_socket", "open_fds", "on_ram_fs"]


def on_ram_fs(path: str) -> bool:
    """Whether `path` is on tmpfs or hugetlbfs, where blk keeps preadv (a read fault
    through a mapping would allocate a hole's page): mapped-read tests need a disk."""
    out = subprocess.run(["stat", "-f", "-c", "%T", path], capture_output=True, text=True,
                         check=True).stdout.strip()
    return out in ("tmpfs", "hugetlbfs")


def open_fds() -> set[int]:
    """The fds this process has open now (for leak checks)."""
    return {int(x) for x in os.listdir("/proc/self/fd")}


def spawn(argv: list[str], sock: str, log_path: str, **kw) -> BackendProcess:
    """Start `argv` (Popen keywords in `kw`) with its output in a fresh `log_path`;
    return once `sock` exists (no probe connection: tests count the back-end's
    front-ends and log lines)."""
    open(log_path, "wb").close()
    return BackendProcess(argv, sock, log_path, probe_connect=False, **kw).start(timeout=20.0)


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
