"""Fixtures for vhost-user-net tests: the real back-end process with N ports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from backends_proc import wait_for_socket
from harness.backend import BackendProcess

NET = [sys.executable, "-m", "vhost_user.backends.net"]


class NetBackend(BackendProcess):
    """A running vhost-user-net with its sockets; `stats()` asks it for counters."""

    socks: list[str]

    def stats(self, timeout: float = 5.0) -> list[dict[str, int]]:
        """Per-port counters (SIGUSR1 makes the back-end log them as JSON)."""
        return list(self.log_stats(timeout).values())


def start_net(workdir: str, ports: int = 2, *args: str, prefix: list[str] | None = None,
              stdout=None) -> NetBackend:
    socks = [os.path.join(workdir, f"p{i}.sock") for i in range(ports)]
    argv = list(prefix or []) + NET + [a for s in socks for a in ("--socket", s)] + ["-v", *args]
    log_path = os.path.join(workdir, "net.log")
    log = open(log_path, "wb")
    proc = subprocess.Popen(argv, stdout=stdout or log, stderr=log)
    log.close()
    bp = NetBackend.adopt(proc, socks[0] if socks else "", log_path)
    bp.socks = socks
    try:
        for s in socks:
            wait_for_socket(s, proc, log_path=log_path)
    except BaseException:
        bp.stop(signal.SIGKILL)
        raise
    return bp


@pytest.fixture
def net_backend(sockdir):
    """Factory: start_net(ports, *args) in a socket dir; stopped at the end."""
    started: list[NetBackend] = []

    def make(ports: int = 2, *args: str, **kw) -> NetBackend:
        bp = start_net(sockdir, ports, *args, **kw)
        started.append(bp)
        return bp

    yield make
    for bp in started:
        bp.stop()
