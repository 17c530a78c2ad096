"""Shared fixtures. Back-end processes are real; see tests/backends_proc.py."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from ringlayout import GuestRam

# Back-ends are spawned as `python -m vhost_user...` from the repo root, where the
# partial source folder vhost_user/ would shadow the installed package (protocol/
# and backends/ are mapped into it only by the install). Safe-path mode keeps the
# current directory off sys.path in every child Python.
os.environ["PYTHONSAFEPATH"] = "1"

# The real-guest harness (tests/harness/): kernel, initramfs, GuestVM fixtures.
pytest_plugins = ["harness.fixtures"]


@pytest.fixture
def sockdir():
    """A short directory for Unix sockets (paths are limited to 107 bytes)."""
    d = tempfile.mkdtemp(prefix="vu-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def shm_image():
    """Factory for sparse raw images in /dev/shm (tmpfs supports hole punching)."""
    made = []

    def make(size: int = 64 << 20, name: str = "disk.img") -> str:
        d = tempfile.mkdtemp(prefix="vu-img-", dir="/dev/shm")
        path = os.path.join(d, name)
        with open(path, "wb") as f:
            f.truncate(size)
        made.append(d)
        return path

    yield make
    for d in made:
        shutil.rmtree(d, ignore_errors=True)


# -- the data-plane tests (memory, virtqueue, the devices' C engines) ------------------------
@pytest.fixture
def fd_check():
    """Fail the test if it leaks file descriptors."""
    before = len(os.listdir("/proc/self/fd"))
    yield
    after = len(os.listdir("/proc/self/fd"))
    assert after == before, f"fd leak: {before} -> {after}"


@pytest.fixture
def ram():
    r = GuestRam([(0, 4 << 20)])
    yield r
    r.close()


@pytest.fixture
def eventfd():
    made = []

    def make() -> int:
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        made.append(fd)
        return fd

    yield make
    for fd in made:
        try:
            os.close(fd)
        except OSError:
            pass
