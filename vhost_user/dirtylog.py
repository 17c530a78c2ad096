"""Dirty page logging for live migration: the bitmap of SET_LOG_BASE.

Theory of operation
-------------------
While QEMU migrates a guest it shares a bitmap with the back-end
(VHOST_USER_PROTOCOL_F_LOG_SHMFD: SET_LOG_BASE carries a memfd, its size and
offset), acks VHOST_F_LOG_ALL in SET_FEATURES and sets VHOST_VRING_F_LOG on
every ring (SET_VRING_ADDR, with the used ring's guest-physical address).
From then on every guest page the back-end writes must have its bit set
again, or the destination keeps the stale copy. The marking is in C
(csrc/dirtylog.c), inside vr_push: the used ring and each completed chain's
writable bytes, whatever the device.

A `DirtyLog` is one validated mapping of the front-end's fd plus the
immutable `struct vr_log` the queues point at. Queues swap pointers while
they run, so a replaced log cannot be unmapped until no worker can hold it:
`DirtyLogs` keeps every log (and every SET_LOG_FD eventfd) of a session
until the session ends, after its queues stopped. A migration sends one log
per memory layout, a few KiB each.
"""

from __future__ import annotations

import mmap
import os
import stat
from typing import Any

from vhost_user._native import ffi
from vhost_user.errors import RemoteProtocolError
from vhost_user.memory import GuestMemory
from vhost_user.protocol import VHOST_LOG_PAGE

__all__ = ["DirtyLog", "DirtyLogs", "log_size_for"]

_PAGES_PER_BYTE = 8


def log_size_for(memory: GuestMemory) -> int:
    """Bytes of bitmap that cover every guest-physical page of `memory`.

    QEMU rounds up to whole 64-bit words (vhost_get_log_size); any size at
    least this large is accepted.
    """
    end = max((r.gpa + r.size for r in memory.regions), default=0)
    pages = -(-end // VHOST_LOG_PAGE)
    return -(-pages // _PAGES_PER_BYTE)


class DirtyLog:
    """One mapping of a log fd and the `struct vr_log` over it (read-only once built)."""

    def __init__(self, mapping: mmap.mmap, call_fd: int = -1) -> None:
        self.mapping = mapping
        self.size = len(mapping)
        self.call_fd = call_fd
        self._buf = ffi.from_buffer("uint8_t[]", mapping, require_writable=True)
        self._native = ffi.new("struct vr_log *")
        self._native.base = self._buf
        self._native.size = self.size
        self._native.call_fd = call_fd

    @classmethod
    def from_fd(cls, fd: int, size: int, offset: int, memory: GuestMemory,
                call_fd: int = -1) -> DirtyLog:
        """Map `size` bytes of `fd` at `offset` after checking them (the fd stays the caller's).

        Refused, with the reason: an fd that is not a regular file or memfd,
        a region past the file's end, or one smaller than the guest memory.
        """
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RemoteProtocolError("SET_LOG_BASE fd is not a memfd or regular file",
                                      recoverable=True)
        if size <= 0 or offset < 0 or offset % mmap.ALLOCATIONGRANULARITY:
            raise RemoteProtocolError(f"SET_LOG_BASE size {size} offset {offset} invalid",
                                      recoverable=True)
        if offset + size > st.st_size:
            raise RemoteProtocolError(
                f"SET_LOG_BASE region {offset}+{size} beyond the fd's {st.st_size} bytes",
                recoverable=True)
        need = log_size_for(memory)
        if size < need:
            raise RemoteProtocolError(
                f"SET_LOG_BASE log of {size} bytes is smaller than the {need} the guest memory needs",
                recoverable=True)
        return cls(mmap.mmap(fd, size, offset=offset), call_fd)

    def with_call_fd(self, call_fd: int) -> DirtyLog:
        """The same bitmap with a new SET_LOG_FD eventfd."""
        return DirtyLog(self.mapping, call_fd)

    @property
    def native(self) -> Any:
        """The `struct vr_log *` a queue points at (only for Virtqueue)."""
        return self._native

    def release(self) -> None:
        ffi.release(self._buf)


class DirtyLogs:
    """A session's dirty-log state: the current log, whether LOG_ALL is on, and everything to close."""

    def __init__(self) -> None:
        self.current: DirtyLog | None = None
        self._logs: list[DirtyLog] = []
        self._fds: list[int] = []
        self._call_fd = -1

    def set_base(self, fd: int, size: int, offset: int, memory: GuestMemory) -> DirtyLog:
        """SET_LOG_BASE: map and validate a new log (takes `fd`, closing it)."""
        try:
            new = DirtyLog.from_fd(fd, size, offset, memory, self._call_fd)
        finally:
            os.close(fd)
        self._logs.append(new)
        self.current = new
        return new

    def set_call_fd(self, fd: int) -> None:
        """SET_LOG_FD: the eventfd kicked after a batch of log writes (taken, closed at the end)."""
        self._fds.append(fd)
        self._call_fd = fd
        if self.current is not None:
            self.current = self.current.with_call_fd(fd)
            self._logs.append(self.current)

    def close(self) -> None:
        """Unmap every log and close every fd; only once no queue points at them."""
        mappings = {id(log.mapping): log.mapping for log in self._logs}
        for log in self._logs:
            log.release()
        for mapping in mappings.values():
            mapping.close()
        for fd in self._fds:
            os.close(fd)
        self._logs, self._fds, self.current, self._call_fd = [], [], None, -1
