"""A minimal writer for the kernel's initramfs format (cpio "newc", uncompressed).

Written in Python rather than driving ``cpio(1)`` so that the archive's
contents are exactly what the builder listed (no dependence on ``find``
order, host umask or file ownership) and so that a per-boot archive holding
only the test script can be produced in microseconds. The kernel unpacks
several archives concatenated in one initrd, later ones overriding earlier
ones; the harness relies on that to add the script to a cached base image.

The archive is left uncompressed: under TCG, decompressing in the guest
costs more than QEMU loading a few more megabytes into guest memory.
"""

from __future__ import annotations

import stat
from typing import BinaryIO

__all__ = ["CpioWriter"]


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


class CpioWriter:
    """Append newc entries to a binary stream; call :meth:`close` to write the trailer."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._ino = 1000
        self._dirs: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", nlink: int = 1,
               rdev: tuple[int, int] = (0, 0)) -> None:
        name = name.lstrip("/")
        encoded = name.encode() + b"\0"
        self._ino += 1
        fields = (self._ino, mode, 0, 0, nlink, 0, len(data), 0, 0, *rdev, len(encoded), 0)
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._out.write(header + encoded + _pad4(len(header) + len(encoded)))
        self._out.write(data + _pad4(len(data)))

    def mkdir(self, path: str, mode: int = 0o755) -> None:
        """Add ``path`` and its missing parents as directories."""
        parts = path.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            if sub and sub not in self._dirs:
                self._dirs.add(sub)
                self._entry(sub, stat.S_IFDIR | mode, nlink=2)

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """Add a regular file (parents created as needed)."""
        parent = path.strip("/").rpartition("/")[0]
        if parent:
            self.mkdir(parent)
        self._entry(path, stat.S_IFREG | mode, data)

    def symlink(self, path: str, target: str) -> None:
        """Add a symbolic link ``path`` -> ``target``."""
        parent = path.strip("/").rpartition("/")[0]
        if parent:
            self.mkdir(parent)
        self._entry(path, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        """Add a character device node (the kernel needs /dev/console before init runs)."""
        parent = path.strip("/").rpartition("/")[0]
        if parent:
            self.mkdir(parent)
        self._entry(path, stat.S_IFCHR | mode, rdev=(major, minor))

    def close(self) -> None:
        """Write the ``TRAILER!!!`` entry that ends one archive."""
        self._entry("TRAILER!!!", 0)
