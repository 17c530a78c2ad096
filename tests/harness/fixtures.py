"""pytest plugin: session fixtures for booting real Linux guests under QEMU.

Load it from tests/conftest.py (see tests/harness/__init__.py). Fixtures:

``qemu_binary``      path of qemu-system-x86_64 (session)
``guest_kernel``     :class:`GuestKernel`, downloaded and unpacked once (session)
``guest_initramfs``  :class:`Initramfs`, the cached base archive and layers (session)
``guest_vm``         factory ``guest_vm(**GuestVM kwargs) -> GuestVM``; every VM
                     it made is closed at test teardown (function)
``short_tmp``        a short directory under /tmp for Unix sockets (function)

Missing host tools skip the guest tests on a developer machine and fail
them when $CI is set: CI must never go green by skipping the only tests
that prove the back-ends against a real kernel.
"""

from __future__ import annotations

import os
import shutil

import pytest

from .initramfs import GUEST_TOOLS, Initramfs, build_initramfs
from .kernel import GuestSetupError, fetch_kernel
from .qemu import GuestVM, qemu_binary_path, short_tempdir

__all__ = ["require_tool", "guest_unavailable"]

_SBIN = ":/usr/local/sbin:/usr/sbin:/sbin"


def guest_unavailable(reason: str) -> None:
    """Skip with ``reason``, or fail when $CI is set (never returns)."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so this is a failure, not a skip)", pytrace=False)
    pytest.skip(reason)


def require_tool(name: str) -> str:
    """Path of host program ``name``; skip (developer) or fail (CI) if it is missing."""
    found = shutil.which(name, path=os.environ.get("PATH", "") + _SBIN)
    if not found:
        guest_unavailable(f"{name} not found; run tools/install-test-deps.sh")
    return found


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "guest: boots a real Linux guest under QEMU (slow)")


@pytest.fixture(scope="session")
def qemu_binary() -> str:
    path = qemu_binary_path()
    if not path or not os.access(path, os.X_OK):
        guest_unavailable("qemu-system-x86_64 not found; run tools/install-test-deps.sh")
    return path


@pytest.fixture(scope="session")
def guest_kernel():
    for tool in ("apt-get", "apt-cache", "dpkg-deb", "depmod"):
        require_tool(tool)
    try:
        return fetch_kernel()
    except GuestSetupError as exc:
        guest_unavailable(f"cannot fetch the guest kernel: {exc}")


@pytest.fixture(scope="session")
def guest_initramfs(guest_kernel) -> Initramfs:
    for tool in ("busybox", "ldd", *GUEST_TOOLS):
        require_tool(tool)
    try:
        return build_initramfs(guest_kernel)
    except GuestSetupError as exc:
        guest_unavailable(f"cannot build the guest initramfs: {exc}")


@pytest.fixture
def short_tmp():
    path = short_tempdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def guest_vm(qemu_binary, guest_kernel, guest_initramfs, tmp_path):
    vms: list[GuestVM] = []

    def make(**kwargs) -> GuestVM:
        vm = GuestVM(guest_kernel, guest_initramfs, tmp_path / f"vm{len(vms)}",
                     qemu=qemu_binary, **kwargs)
        vms.append(vm)
        return vm

    yield make
    for vm in vms:
        vm.close()
