"""Real-guest test harness: Debian's kernel + a busybox initramfs under QEMU.

The back-ends must be proven against a real Linux kernel's virtio drivers,
not only against our own front-end. This package fetches the distribution
kernel, builds a minimal initramfs around a test's shell script, boots it
under QEMU with vhost-user devices, and returns what the script printed.

pytest's ``pythonpath = ["tests"]`` makes it the top-level package
``harness``; load the plugin from tests/conftest.py with::

    pytest_plugins = ["harness.fixtures"]

and import it in tests as ``harness`` too (never ``tests.harness``: two
module copies would make ``pytest.raises(GuestError)`` miss). Mark guest
tests ``@pytest.mark.guest``.
"""

from .backend import BackendError, BackendProcess, qsd_blk_argv
from .initramfs import GUEST_MODULES, GUEST_TOOLS, LAYERS, Initramfs, build_initramfs
from .kernel import GuestKernel, GuestSetupError, fetch_kernel
from .qemu import GuestError, GuestResult, GuestVM, kvm_usable, qemu_binary_path, short_tempdir

__all__ = [
    "BackendError",
    "BackendProcess",
    "GUEST_MODULES",
    "GUEST_TOOLS",
    "GuestError",
    "GuestKernel",
    "GuestResult",
    "GuestSetupError",
    "GuestVM",
    "Initramfs",
    "LAYERS",
    "build_initramfs",
    "fetch_kernel",
    "kvm_usable",
    "qemu_binary_path",
    "qsd_blk_argv",
    "short_tempdir",
]
