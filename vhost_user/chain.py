"""The C ring's Python face: its return codes, its chain segments, its memory table.

What every user of the native ring (vhost_user/virtqueue.py and the device
engines beside their devices) shares, so it is written once: the one
error-code convention (C functions return 0/positive or a negated enum
vr_error, csrc/vring.h; `check_native` maps it to the typed errors of
vhost_user/errors.py), the `Chain` a pop yields as bounded (region, offset,
length) segments, and `NativeMemory`, the struct vr_mem built from a
GuestMemory with the buffer views that pin its mappings.
"""
from __future__ import annotations

from typing import Any

from vhost_user._native import ffi, lib
from vhost_user.errors import (
    AddressOutOfRange,
    AvailIndexJump,
    BadBufferId,
    BadIndirectLength,
    ChainTooLong,
    DescriptorIndexOutOfRange,
    DescriptorLoop,
    DescriptorOrder,
    NestedIndirect,
    VirtqueueError,
)
from vhost_user.memory import GuestMemory

__all__ = ["Chain", "NativeMemory", "check_native", "error_class", "inflight_queue_size", "MAX_QUEUE_SIZE"]

MAX_QUEUE_SIZE = lib.VR_MAX_QUEUE_SIZE
_INFLIGHT_ALIGN = 64

# C error code -> exception class (see enum vr_error in csrc/vring.h).
_ERRORS: dict[int, type[Exception]] = {
    1: DescriptorLoop,
    2: DescriptorIndexOutOfRange,
    3: NestedIndirect,
    4: BadIndirectLength,
    5: AddressOutOfRange,
    6: AvailIndexJump,
    7: DescriptorOrder,
    8: ChainTooLong,
    9: VirtqueueError,
    10: BadBufferId,
    20: ValueError,
    21: AddressOutOfRange,
    22: VirtqueueError,
    23: ValueError,
    24: MemoryError,
    25: VirtqueueError,
}
_API_MESSAGES = {
    20: "invalid argument",
    21: "ring does not lie inside one guest memory region",
    22: "ring address is misaligned (split: desc 16, avail 2, used 4 bytes; packed: 16, 4, 4)",
    23: "operation not valid in the queue's current state",
    24: "out of memory",
    25: "inflight region does not match the queue (size, desc_num, layout, or a corrupt entry)",
}


def inflight_queue_size(queue_size: int) -> int:
    """Bytes of one queue's inflight region (vhost-user.rst), 64-byte aligned.

    Room for the packed layout (32-byte header and entries), the larger of
    the two: GET_INFLIGHT_FD may come before the features say which one.
    """
    raw = 32 + 32 * queue_size
    return (raw + _INFLIGHT_ALIGN - 1) // _INFLIGHT_ALIGN * _INFLIGHT_ALIGN


def error_class(code: int) -> type[Exception]:
    """The exception class of a (positive) enum vr_error code."""
    return _ERRORS.get(code, VirtqueueError)


def check_native(rc: int, what: str, q: Any = None) -> int:
    """Map a C return code (enum vr_error, negated) to the project's typed errors;
    pass through >= 0.  With the native queue `q`, a ring violation carries the
    queue's own message."""
    if rc >= 0:
        return rc
    code = -rc
    cls = error_class(code)
    if q is not None and code < 20 and lib.vr_queue_broken(q):
        msg = ffi.string(lib.vr_queue_error(q)).decode(errors="replace")
    else:
        msg = f"{what}: {_API_MESSAGES.get(code, f'error {code}')}"
    raise cls(msg)


class Chain:
    """A popped descriptor chain: (region_index, offset, length) segments."""

    __slots__ = ("head", "readable", "writable", "_memory")

    def __init__(self, head: int, readable: list, writable: list, memory: GuestMemory) -> None:
        self.head = head
        self.readable: list[tuple[int, int, int]] = readable
        self.writable: list[tuple[int, int, int]] = writable
        self._memory = memory

    @property
    def memory(self) -> GuestMemory:
        """The table the segments' region indices refer to."""
        return self._memory

    @property
    def read_len(self) -> int:
        return sum(n for _, _, n in self.readable)

    @property
    def write_len(self) -> int:
        return sum(n for _, _, n in self.writable)

    def read(self) -> bytes:
        """All device-readable bytes of the chain, in order."""
        regions = self._memory.regions
        return b"".join(regions[i].read(off, n) for i, off, n in self.readable)

    def write(self, data: bytes | bytearray | memoryview, offset: int = 0) -> int:
        """Copy data into the writable segments from byte `offset`; returns bytes written."""
        if offset < 0:
            raise ValueError("offset must be >= 0")
        view = memoryview(data).cast("B")
        regions = self._memory.regions
        done = 0
        for i, off, n in self.writable:
            if done == len(view):
                break
            if offset >= n:
                offset -= n
                continue
            take = min(n - offset, len(view) - done)
            regions[i].write(off + offset, view[done:done + take])
            done += take
            offset = 0
        return done

    def __repr__(self) -> str:
        return f"Chain(head={self.head}, readable={self.readable}, writable={self.writable})"


class NativeMemory:
    """A struct vr_mem built from a GuestMemory, plus the buffer views pinning it."""

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory
        self.table = ffi.new("struct vr_mem *")
        self.buffers = []
        regions = memory.regions
        self.table.nregions = len(regions)
        for i, r in enumerate(regions):
            buf = ffi.from_buffer("uint8_t[]", r.mmap, require_writable=True)
            self.buffers.append(buf)
            slot = self.table.regions[i]
            slot.gpa, slot.size, slot.uaddr = r.gpa, r.size, r.uaddr
            slot.host = buf + r.mmap_offset

    def release(self) -> None:
        for buf in self.buffers:
            ffi.release(buf)
        self.buffers = []
