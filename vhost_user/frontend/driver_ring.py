"""Driver (guest) side of a virtio split or packed virtqueue, for the built-in front-end.

Theory of operation: the front-end owns guest RAM as memfd regions. One
region, mapped writable here, holds the descriptor table, avail ring and used
ring of a queue (see `ring_layout`), and the buffers the chains point at. All
ring work runs in C (`vhost_user._driver`, csrc/driver.c) with the GIL
released; no cdata leaves this module and the device loads beside their
devices (backends/<dev>/driver_load.py: the blk request load, the net frame
load, the vsock stream load), which drive a `DriverQueue` through `native`.

A `DriverQueue` is used by one thread at a time (the front-end runs one
thread per queue). A back-end that breaks the used-ring rules (an id out of
range, an id that is not in flight, used->idx jumping past what is in flight)
marks the queue broken: the call raises a `VirtqueueError` and every later
call raises too, as libvhost-user does on the other side.
"""

from __future__ import annotations

import logging
import os
from typing import Iterable, Sequence

from vhost_user._driver import ffi, lib
from vhost_user.errors import DescriptorIndexOutOfRange, VirtqueueError

__all__ = ["DriverQueue", "ring_layout", "packed_layout", "PACKED_BASE", "u32"]

#: SET_VRING_BASE of a fresh packed ring: slots 0, both wrap counters 1
PACKED_BASE = 0x8000_8000

log = logging.getLogger(__name__)

MAX_QUEUE_SIZE = lib.DRV_MAX_QUEUE_SIZE

# DRV_E_* code -> (exception class, message template); device faults first.
_ERRORS = {
    lib.DRV_E_USED_ID: (DescriptorIndexOutOfRange, "used ring: id {bad} is not below the queue size"),
    lib.DRV_E_NOT_INFLIGHT: (VirtqueueError, "used ring: id {bad} is not an in-flight chain head"),
    lib.DRV_E_USED_JUMP: (VirtqueueError, "used ring: used->idx moved {bad} past the chains in flight"),
    lib.DRV_E_BROKEN: (VirtqueueError, "queue is broken by an earlier used-ring violation"),
    lib.DRV_E_ARG: (ValueError, "invalid argument"),
    lib.DRV_E_RANGE: (ValueError, "offset or address outside the guest memory area"),
    lib.DRV_E_ALIGN: (ValueError, "ring not aligned (desc 16, avail 2, used 4 bytes)"),
    lib.DRV_E_NOSPACE: (ValueError, "not enough free descriptors for the chain"),
    lib.DRV_E_ORDER: (ValueError, "a device-writable segment precedes a readable one"),
    lib.DRV_E_TIMEOUT: (TimeoutError, "no completion within the stall timeout"),
}
_DEVICE_FAULTS = (lib.DRV_E_USED_ID, lib.DRV_E_NOT_INFLIGHT, lib.DRV_E_USED_JUMP)


def packed_layout(size: int) -> tuple[int, int, int, int]:
    """(desc_offset, driver_event_offset, device_event_offset, total_bytes) of a packed
    ring of `size` (1..32768, any value): descriptors at 0, the two 4-byte event
    areas after them, total_bytes rounded up to a page."""
    out = ffi.new("struct drv_ring_layout *")
    if lib.drv_packed_layout(u32(size, "size"), out) != lib.DRV_OK:
        raise ValueError(f"queue size {size} is not in 1..{MAX_QUEUE_SIZE}")
    return out.desc_offset, out.avail_offset, out.used_offset, out.total_bytes


def ring_layout(size: int) -> tuple[int, int, int, int]:
    """(desc_offset, avail_offset, used_offset, total_bytes) for a queue of `size`.

    desc at 0, avail right after it, used on the next 4 KiB page; total_bytes
    is rounded up to a page. Meets the 2.7 alignments (16, 2, 4).
    """
    out = ffi.new("struct drv_ring_layout *")
    if lib.drv_ring_layout(u32(size, "size"), out) != lib.DRV_OK:
        raise ValueError(f"queue size {size} is not a power of 2 in 1..{MAX_QUEUE_SIZE}")
    return out.desc_offset, out.avail_offset, out.used_offset, out.total_bytes


def u32(value: int, name: str) -> int:
    if not isinstance(value, int) or not 0 <= value < 1 << 32:
        raise ValueError(f"{name} must be an int in 0..2**32-1, got {value!r}")
    return value


class DriverQueue:
    """One split (or, with `packed`, packed) virtqueue driven from the driver side.

    `area` is a writable buffer (an mmap of a memfd region of guest RAM) whose
    first byte is guest-physical `gpa_base`. The rings are placed at the given
    offsets and zeroed; avail->idx and used->idx start at `base_index` (send
    the same value in SET_VRING_BASE; a packed ring starts at PACKED_BASE, its
    avail/used offsets are the driver and device event areas). `kick_fd`/`call_fd` are eventfds the
    caller owns and closes. Keeps `area` exported until `close()`.
    """

    def __init__(
        self,
        area,
        gpa_base: int,
        size: int,
        *,
        desc_offset: int,
        avail_offset: int,
        used_offset: int,
        kick_fd: int,
        call_fd: int,
        event_idx: bool,
        base_index: int = 0,
        packed: bool = False,
    ) -> None:
        if not 0 <= base_index <= 0xFFFF:
            raise ValueError(f"base_index {base_index} is not a u16")
        if gpa_base < 0 or min(desc_offset, avail_offset, used_offset) < 0:
            raise ValueError("gpa_base and ring offsets must be non-negative")
        if not isinstance(size, int) or not 1 <= size <= MAX_QUEUE_SIZE:
            raise ValueError(f"queue size {size!r} is not in 1..{MAX_QUEUE_SIZE}")
        buf = ffi.from_buffer("uint8_t[]", area, require_writable=True)
        self._buf = buf
        self._q = ffi.new("struct drv_queue *")
        self._st = ffi.new("struct drv_desc_state[]", size)
        self._used = ffi.new("struct drv_used_elem[]", size)
        cfg = ffi.new(
            "struct drv_queue_config *",
            {
                "area_size": len(buf),
                "gpa_base": gpa_base,
                "size": size,
                "desc_offset": desc_offset,
                "avail_offset": avail_offset,
                "used_offset": used_offset,
                "kick_fd": kick_fd,
                "call_fd": call_fd,
                "event_idx": bool(event_idx),
                "base_index": base_index,
                "packed": bool(packed),
            },
        )
        try:
            self._check(lib.drv_queue_init(self._q, self._st, buf, cfg), "init")
        except BaseException:
            ffi.release(buf)
            raise
        self.size = size
        self.packed = bool(packed)
        self.gpa_base = gpa_base
        self.desc_gpa = gpa_base + desc_offset
        self.avail_gpa = gpa_base + avail_offset
        self.used_gpa = gpa_base + used_offset

    # -- helpers ---------------------------------------------------------

    @property
    def native(self):
        """The struct drv_queue, for a device's driver-side load beside its device
        (backends/<dev>/driver_load.py); cdata never leaves those binding modules."""
        return self._q

    def check(self, rc: int, what: str) -> int:
        """Returns rc if it is not an error; raises the mapped exception otherwise."""
        return self._check(rc, what)

    def _check(self, rc: int, what: str) -> int:
        """Returns rc if it is not an error; raises the mapped exception otherwise."""
        if rc >= 0:
            return rc
        if rc == lib.DRV_E_BROKEN and self._buf is None:
            raise ValueError(f"{what}: driver queue is closed")
        if rc == lib.DRV_E_SYS:
            raise OSError(self._q.sys_errno, f"{what}: {os.strerror(self._q.sys_errno)}")
        cls, template = _ERRORS.get(rc, (VirtqueueError, f"driver error {rc}"))
        msg = f"{what} on driver queue (size {self._q.size}): " + template.format(bad=self._q.bad_value)
        if rc in _DEVICE_FAULTS:
            log.error("%s", msg)
        raise cls(msg)

    @property
    def num_free(self) -> int:
        """Free descriptors: a chain of n segments fits if n <= num_free."""
        return self._q.num_free

    @property
    def in_flight(self) -> int:
        """Chains published and not yet reaped."""
        return self._q.inflight

    @property
    def broken(self) -> bool:
        """True once the back-end broke the used-ring rules."""
        return self._q.broken != 0

    # -- verbs -----------------------------------------------------------

    def add(self, segments: Iterable[tuple[int, int, bool]]) -> int:
        """Writes a chain of (gpa, len, writable) segments, readable ones first,
        into free descriptors and publishes it on the avail ring; returns its head.

        Does not notify the device: call `kick()` after one or more adds.
        """
        segs: Sequence = list(segments)
        if not segs:
            raise ValueError("a chain needs at least one segment")
        if len(segs) > self._q.num_free:
            raise ValueError(f"chain of {len(segs)} segments, only {self._q.num_free} free descriptors")
        arr = ffi.new("struct drv_seg[]", len(segs))
        for i, (gpa, length, writable) in enumerate(segs):
            if gpa < 0 or not 0 < length < 1 << 32:
                raise ValueError(f"segment {i}: bad gpa {gpa:#x} or length {length}")
            arr[i].gpa, arr[i].len, arr[i].writable = gpa, length, bool(writable)
        return self._check(lib.drv_add(self._q, arr, len(segs)), "add")

    def kick(self) -> bool:
        """Notifies the device of new avail entries unless it suppressed
        notifications (avail_event with EVENT_IDX, else VRING_USED_F_NO_NOTIFY).
        Returns True when the kick eventfd was written."""
        return self._check(lib.drv_kick(self._q), "kick") == 1

    def reap(self) -> list[tuple[int, int]]:
        """Takes every used element the device published: [(head, used_len)],
        freeing their chains. Raises VirtqueueError on a used-ring violation."""
        n = self._check(lib.drv_reap(self._q, self._used, self._q.size), "reap")
        return [(self._used[i].id, self._used[i].len) for i in range(n)]

    def wait(self, timeout: float | None) -> bool:
        """Blocks until the used ring has entries or the call eventfd fires
        (True), or `timeout` seconds pass (False; None waits forever)."""
        ns = -1 if timeout is None else max(0, int(timeout * 1e9))
        return self._check(lib.drv_wait(self._q, ns), "wait") == 1

    def close(self) -> None:
        """Releases the area buffer (the mmap can be closed afterwards)."""
        if self._buf is not None:
            ffi.release(self._buf)
            self._buf = None
            self._q.broken = lib.DRV_E_BROKEN

    def __enter__(self) -> DriverQueue:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
