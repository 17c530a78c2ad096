"""Start our vhost-user-gpu or QEMU's, as real processes on real sockets."""

from __future__ import annotations

import os
import sys

import pytest

from backends_proc import require_tool, spawn
from harness.backend import BackendProcess

QEMU_GPU = "/usr/lib/qemu/vhost-user-gpu"


def start_gpu(workdir: str, which: str, *args: str, name: str = "gpu") -> BackendProcess:
    """`which` is "ours" or "qemu"; extra args go to our back-end only."""
    sock = os.path.join(workdir, f"{name}-{which}.sock")
    log_path = os.path.join(workdir, f"{name}-{which}.log")
    if which == "qemu":
        argv = [require_tool(QEMU_GPU), "--socket-path", sock]
    else:
        argv = [sys.executable, "-m", "vhost_user.backends.gpu", "--socket-path", sock,
                "--verbose", *args]
    return spawn(argv, sock, log_path)


@pytest.fixture
def gpu_backend(sockdir):
    """Factory: start_gpu in a per-test directory; stops every process it started."""
    started: list[BackendProcess] = []

    def make(which: str = "ours", *args: str) -> BackendProcess:
        bp = start_gpu(sockdir, which, *args)
        started.append(bp)
        return bp

    yield make
    for bp in started:
        bp.stop()
