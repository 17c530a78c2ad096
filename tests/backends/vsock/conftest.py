"""Fixtures for the vsock tests: the real `vhost-user-vsock` process."""

from __future__ import annotations

import os

import pytest

from vsock_proc import start_vsock


@pytest.fixture
def vsock_proc(sockdir):
    """Factory: start a vsock back-end; every one started is stopped at the end."""
    started = []

    def make(*args: str, wait_for: str, name: str = "vsock"):
        bp = start_vsock(sockdir, *args, wait_for=wait_for, name=name)
        started.append(bp)
        return bp

    yield make
    for bp in started:
        bp.stop()


@pytest.fixture
def one_vm(sockdir, vsock_proc):
    """A single VM (CID 3) with a uds path; yields (process, socket, uds path)."""
    sock = os.path.join(sockdir, "vm3.sock")
    uds = os.path.join(sockdir, "vm3.vsock")
    bp = vsock_proc("--guest-cid", "3", "--socket", sock, "--uds-path", uds, wait_for=sock)
    yield bp, sock, uds
