"""Fixtures for vhost-user-net tests: the real back-end process with N ports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from backends_proc import wait_for_socket
from harness.backend import BackendProcess

NET = [sys.executable, "-m", "vhost_user.backends.net"]


class NetBackend(BackendProcess):
    """A running vhost-user-net with its sockets; `stats()` asks it for counters."""

    socks: list[str]

    def stats(self, timeout: float = 5.0) -> list[dict[str, int]]:
        """Per-port counters (SIGUSR1 makes the back-end log them as JSON)."""
        before = self.log().count(" stats {")
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = [l for l in self.log().splitlines() if " stats {" in l]
            if len(lines) > before:
                data = json.loads(lines[-1].split(" stats ", 1)[1])
                return list(data.values())
            time.sleep(0.05)
        raise AssertionError(f"no stats line in the log:\n{self.log()[-2000:]}")

    def wait_log(self, needle: str, timeout: float = 5.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log()
            if needle in text:
                return text
            time.sleep(0.05)
        raise AssertionError(f"{needle!r} not in back-end log:\n{self.log()[-3000:]}")


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
