"""Fixtures for the data-plane tests (memory, virtqueue, blk engine)."""
from __future__ import annotations

import os

import pytest

from ringlayout import GuestRam


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


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
