"""The front-end's side of a live migration: dirty logging as QEMU drives it.

When a migration starts QEMU (hw/virtio/vhost.c) sizes a bitmap for the
guest's memory map, shares it as a memfd (SET_LOG_BASE), acks
VHOST_F_LOG_ALL in SET_FEATURES and sets VHOST_VRING_F_LOG on every ring
with the used ring's guest-physical address (SET_VRING_ADDR) while the
device keeps running. It then reads and clears the bitmap at each pass and
re-sends the pages whose bit came back. `DirtyLog` does the same on a
`Frontend`, so a test can see which pages a back-end marks; it drives
qemu-storage-daemon just as it drives ours.

`save_device_state` / `load_device_state` are crosvm's snapshot and restore
of a suspended device (SET_DEVICE_STATE_FD through a pipe, CHECK_DEVICE_STATE).
"""

from __future__ import annotations

import mmap
import os

from vhost_user.frontend.connection import Frontend, FrontendError
from vhost_user.protocol import (
    VHOST_F_LOG_ALL,
    VHOST_LOG_PAGE,
    VHOST_VRING_F_LOG,
    DeviceStateTransfer,
    FrontendRequest as R,
    ProtocolFeature as PF,
    U64,
    VringAddress,
)

__all__ = ["DirtyLog", "qemu_log_size", "save_device_state", "load_device_state"]

_CHUNK = VHOST_LOG_PAGE * 64  # one 64-bit word of the bitmap


def qemu_log_size(ram) -> int:
    """Bitmap bytes QEMU shares for `ram` (vhost_get_log_size: whole u64 words)."""
    end = max(r.gpa + r.size for r in ram.regions)
    return ((end - 1) // _CHUNK + 1) * 8


class DirtyLog:
    """Dirty logging on one front-end: `start`, `pages`, `clear`, `stop`, `close`."""

    def __init__(self, fe: Frontend, size: int | None = None) -> None:
        if not fe.has_protocol_feature(PF.LOG_SHMFD):
            raise FrontendError("the back-end did not offer LOG_SHMFD: QEMU refuses to migrate")
        if not fe.backend_features & (1 << VHOST_F_LOG_ALL):
            raise FrontendError("the back-end did not offer VHOST_F_LOG_ALL: QEMU refuses to migrate")
        self.fe = fe
        self.size = qemu_log_size(fe.ram) if size is None else size
        self._fd = os.memfd_create("vhost-log", os.MFD_CLOEXEC)
        os.ftruncate(self._fd, self.size)
        self.bitmap = mmap.mmap(self._fd, self.size)

    def start(self) -> None:
        """SET_LOG_BASE, SET_FEATURES with LOG_ALL, SET_VRING_ADDR with the log flag."""
        # QEMU reads the u64 answer and ignores its value: libvhost-user echoes
        # the size, we answer 0 (1 when refused).
        self.answer = self.fe.set_log_base(self._fd, self.size)
        self._set(True)

    def stop(self) -> None:
        """Migration over (or cancelled): LOG_ALL and the ring flags off again."""
        self._set(False)

    def _set(self, on: bool) -> None:
        fe = self.fe
        log_all = 1 << VHOST_F_LOG_ALL
        fe.features = fe.features | log_all if on else fe.features & ~log_all
        fe.call(R.SET_FEATURES, U64(fe.features))
        for q in fe.queues.values():
            ring = q.ring
            fe.call(R.SET_VRING_ADDR, VringAddress(
                q.index, VHOST_VRING_F_LOG if on else 0, fe.ram.uaddr(ring.desc_gpa),
                fe.ram.uaddr(ring.used_gpa), fe.ram.uaddr(ring.avail_gpa),
                ring.used_gpa if on else 0))

    def pages(self) -> set[int]:
        """Guest page numbers (gpa // 4096) whose bit is set."""
        data = bytes(self.bitmap)
        return {i * 8 + b for i, byte in enumerate(data) if byte for b in range(8) if byte >> b & 1}

    def clear(self) -> None:
        """What QEMU does after it copied the dirty pages."""
        self.bitmap[:] = bytes(self.size)

    def close(self) -> None:
        self.bitmap.close()
        os.close(self._fd)


def save_device_state(fe: Frontend) -> bytes:
    """crosvm's snapshot of a suspended device: SET_DEVICE_STATE_FD (SAVE, STOPPED)
    with a pipe's write end, read to EOF, then CHECK_DEVICE_STATE."""
    rd, wr = os.pipe2(os.O_CLOEXEC)
    try:
        reply = fe.call(R.SET_DEVICE_STATE_FD, DeviceStateTransfer(0, 0), fds=(wr,))
        os.close(wr)
        wr = -1
        _check_transfer_reply(reply.payload.value)
        chunks = []
        while chunk := os.read(rd, 1 << 20):
            chunks.append(chunk)
    finally:
        os.close(rd)
        if wr >= 0:
            os.close(wr)
    _check_state(fe)
    return b"".join(chunks)


def load_device_state(fe: Frontend, data: bytes) -> None:
    """crosvm's restore, before the device is woken: the state through a pipe's
    read end (LOAD, STOPPED), then CHECK_DEVICE_STATE."""
    rd, wr = os.pipe2(os.O_CLOEXEC)
    try:
        reply = fe.call(R.SET_DEVICE_STATE_FD, DeviceStateTransfer(1, 0), fds=(rd,))
        os.close(rd)
        rd = -1
        _check_transfer_reply(reply.payload.value)
        view = memoryview(data)
        while view:
            view = view[os.write(wr, view):]
    finally:
        os.close(wr)
        if rd >= 0:
            os.close(rd)
    _check_state(fe)


def _check_transfer_reply(value: int) -> None:
    if value & 0xFF:
        raise FrontendError(f"back-end refused SET_DEVICE_STATE_FD (error {value & 0xFF})")
    if not value & 0x100:
        raise FrontendError("back-end returned a transfer fd of its own (not supported here)")


def _check_state(fe: Frontend) -> None:
    value = fe.call(R.CHECK_DEVICE_STATE).payload.value
    if value != 0:
        raise FrontendError(f"CHECK_DEVICE_STATE failed ({value:#x})")
