"""Virtqueues: the owner of the private C module `vhost_user._native`
(vsock_fastpath.py beside it wraps the vsock data path on these queues).

Theory of operation
-------------------
A `Virtqueue` holds one native `struct vr_queue`.  The session's asyncio
thread calls the setters (SET_VRING_NUM/ADDR/BASE/KICK/CALL/ERR...) and
`start(memory, handler)`, which spawns one worker thread per queue.  The
worker calls `vr_run()` in C with the GIL released; vr_run sleeps on the
kick eventfd and a private control eventfd and runs the handler on every
kick:

* a native handler (`BlkEngine`) processes whole requests in C: Python
  never sees them;
* a Python handler (any callable taking the Virtqueue) is called back
  from vr_run and uses the slow-path API `pop()` / `push()` / `notify()`.

To change state while the worker runs (stop, memory swap, new kick/call
fd) the control thread writes the control eventfd: vr_run returns at the
next batch boundary (every popped chain has been completed and pushed),
the worker parks, the control thread does the change, and the worker
resumes (or exits, for stop).  So the native queue has one user at a time
and needs no locks.

When the driver breaks a ring rule the C code marks the queue broken; the
worker logs one line ("descriptor loop on queue 1 at head 7"), signals the
err eventfd and exits; the queue's other operations become no-ops until
`reset()`.  Other queues are unaffected.

Memory: each started queue `acquire()`s its GuestMemory and holds cffi
buffer views of the mappings; `update_memory` swaps to the new table and
releases the old one, so the session may `close()` the old table right
after the swap (the unmapping is deferred until the last queue let go).
"""
from __future__ import annotations

import logging
import os
import threading
from typing import Any

from vhost_user._native import ffi, lib
from vhost_user.errors import (
    AddressOutOfRange,
    AvailIndexJump,
    BadIndirectLength,
    ChainTooLong,
    DescriptorIndexOutOfRange,
    DescriptorLoop,
    DescriptorOrder,
    NestedIndirect,
    VirtqueueError,
)
from vhost_user.memory import GuestMemory

__all__ = ["Virtqueue", "Chain", "BlkEngine", "NetSwitch", "NetTxEngine", "NetRxQueue",
           "inflight_queue_size", "MAX_QUEUE_SIZE"]

log = logging.getLogger("vhost_user.virtqueue")

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
    22: "ring address is misaligned (desc 16, avail 2, used 4 bytes)",
    23: "operation not valid in the queue's current state",
    24: "out of memory",
    25: "inflight region does not match the queue (size or desc_num)",
}


def inflight_queue_size(queue_size: int) -> int:
    """Bytes of one queue's split inflight region (vhost-user.rst), 64-byte aligned."""
    raw = 16 + 16 * queue_size
    return (raw + _INFLIGHT_ALIGN - 1) // _INFLIGHT_ALIGN * _INFLIGHT_ALIGN


def _check(rc: int, what: str, q: Any = None) -> int:
    """Map a C return code to the project's typed errors; pass through >= 0."""
    if rc >= 0:
        return rc
    code = -rc
    cls = _ERRORS.get(code, VirtqueueError)
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


class BlkEngine:
    """Native virtio-blk request engine for one queue (the fd stays the caller's)."""

    def __init__(self, fd: int, capacity_sectors: int, *, read_only: bool = False,
                 serial: bytes | str = b"", logical_block_size: int = 512,
                 max_discard_sectors: int = 0, max_discard_seg: int = 1,
                 max_write_zeroes_sectors: int = 0, max_write_zeroes_seg: int = 1,
                 direct: bool = False) -> None:
        if isinstance(serial, str):
            serial = serial.encode()
        if fd < 0:
            raise ValueError("BlkEngine needs an open fd")
        if not 0 <= capacity_sectors < 1 << 55:
            raise ValueError(f"bad capacity {capacity_sectors}")
        if len(serial) > 20:
            raise ValueError("serial is at most 20 bytes")
        lbs = logical_block_size
        if lbs < 512 or lbs & (lbs - 1):
            raise ValueError(f"logical block size {lbs} is not a power of two >= 512")
        for name, v in (("max_discard_sectors", max_discard_sectors),
                        ("max_discard_seg", max_discard_seg),
                        ("max_write_zeroes_sectors", max_write_zeroes_sectors),
                        ("max_write_zeroes_seg", max_write_zeroes_seg)):
            if not 0 <= v <= 0xFFFFFFFF:
                raise ValueError(f"{name} {v} out of range")
        cfg = ffi.new("struct vr_blk_config *")
        cfg.fd = fd
        cfg.read_only = int(read_only)
        cfg.direct = int(direct)
        cfg.capacity = capacity_sectors
        cfg.logical_block_size = lbs
        cfg.max_discard_sectors = max_discard_sectors
        cfg.max_discard_seg = max_discard_seg
        cfg.max_write_zeroes_sectors = max_write_zeroes_sectors
        cfg.max_write_zeroes_seg = max_write_zeroes_seg
        ffi.memmove(cfg.serial, serial.ljust(20, b"\0"), 20)
        self._cfg = cfg
        self._ctx = None
        self._totals = dict.fromkeys(_BLK_STATS, 0)

    # Called by Virtqueue.start/stop only.
    def _bind(self):
        if self._ctx is not None:
            raise ValueError("a BlkEngine serves one queue at a time")
        ctx = lib.vr_blk_new(self._cfg)
        if ctx == ffi.NULL:
            raise MemoryError("cannot allocate the virtio-blk engine")
        self._ctx = ctx
        return ctx

    def _unbind(self) -> None:
        if self._ctx is not None:
            for k, v in self._native_stats().items():
                self._totals[k] += v
            lib.vr_blk_free(self._ctx)
            self._ctx = None

    def _native_stats(self) -> dict[str, int]:
        if self._ctx is None:
            return dict.fromkeys(_BLK_STATS, 0)
        s = ffi.new("struct vr_blk_stats *")
        lib.vr_blk_get_stats(self._ctx, s)
        return {k: getattr(s, k) for k in _BLK_STATS}

    @property
    def stats(self) -> dict[str, int]:
        """Request and byte counters (reads, writes, flushes, ..., bytes_read, bytes_written)."""
        cur = self._native_stats()
        return {k: self._totals[k] + cur[k] for k in _BLK_STATS}


_BLK_STATS = ("reads", "writes", "flushes", "discards", "write_zeroes", "get_ids",
              "unsupported", "io_errors", "bytes_read", "bytes_written")


class NetSwitch:
    """The native learning switch of vhost-user-net (csrc/net.c): ports, MAC table, capture.

    Ports are added before any traffic flows; virtio ports get a
    NetTxEngine per tx queue and a NetRxQueue per rx queue.
    """

    STATS = ("tx_frames", "tx_bytes", "rx_frames", "rx_bytes", "tx_runt", "tx_oversize",
             "tx_bad_header", "tx_malformed", "rx_no_room", "rx_not_ready",
             "csum_resolved", "segmented", "flooded", "rx_filtered", "rx_over_mtu")

    def __init__(self, *, capture_bytes: int = 0, ageing_s: float = 300.0) -> None:
        sw = lib.vr_net_switch_new(capture_bytes, int(ageing_s * 1e9))
        if sw == ffi.NULL:
            raise MemoryError("cannot allocate the switch")
        self._sw = ffi.gc(sw, lib.vr_net_switch_free)
        self._capbuf = ffi.new("uint8_t[]", 1 << 20) if capture_bytes else None
        self._dropped = ffi.new("uint64_t *")

    def add_port(self, tap_fd: int = -1, tap_features: int = 0) -> int:
        """A new port (a TAP port when tap_fd >= 0); returns its number."""
        return _check(lib.vr_net_port_add(self._sw, tap_fd, tap_features), "add port")

    def set_features(self, port: int, features: int) -> None:
        lib.vr_net_port_set_features(self._sw, port, features)

    def forget(self, port: int) -> None:
        """Drop the MAC entries learnt on `port` (its front-end went away)."""
        lib.vr_net_port_forget(self._sw, port)

    def set_mtu(self, port: int, mtu: int) -> None:
        """Frames longer than `mtu` plus their L2 header are not delivered to `port` (0: no limit)."""
        lib.vr_net_port_set_mtu(self._sw, port, mtu)

    def set_pairs(self, port: int, pairs: int) -> None:
        """Deliver to the first `pairs` rx queues of `port` only (0: every attached one)."""
        lib.vr_net_port_set_pairs(self._sw, port, pairs)

    def set_filter(self, port: int, flags: int, own_mac: bytes, unicast: list[bytes],
                   multicast: list[bytes]) -> None:
        """The receive filter of `port` (flags: lib.VR_NET_RX_*), replaced as a whole."""
        macs = b"".join(bytes(m) for m in (*unicast, *multicast))
        if len(own_mac) != 6 or len(macs) != 6 * (len(unicast) + len(multicast)):
            raise ValueError("MAC addresses are 6 bytes")
        _check(lib.vr_net_port_set_filter(self._sw, port, flags, bytes(own_mac), macs or b"\0",
                                          len(unicast), len(multicast)), "set filter")

    def lookup(self, mac: bytes) -> int | None:
        """The port a MAC was learnt on (and not aged out), or None."""
        port = lib.vr_net_mac_lookup(self._sw, bytes(mac[:6]).ljust(6, b"\0"))
        return None if port < 0 else port

    def stats(self, port: int) -> dict[str, int]:
        s = ffi.new("struct vr_net_stats *")
        lib.vr_net_port_get_stats(self._sw, port, s)
        return {k: getattr(s, k) for k in self.STATS}

    def inject(self, port: int, frame: bytes) -> None:
        """Switch one Ethernet frame as if `port` sent it (SEND_RARP announces)."""
        _check(lib.vr_net_inject(self._sw, port, frame, len(frame)), "inject")

    def run_tap(self, port: int, ctl_fd: int) -> int:
        """Read frames from the port's TAP fd until ctl_fd is readable (GIL released)."""
        return lib.vr_net_tap_run(self._sw, port, ctl_fd)

    def capture_read(self) -> tuple[bytes, int]:
        """Whole pcap records waiting in the capture ring, and the total drop count."""
        if self._capbuf is None:
            return b"", 0
        n = lib.vr_net_capture_read(self._sw, self._capbuf, len(self._capbuf), self._dropped)
        return bytes(ffi.buffer(self._capbuf, n)), self._dropped[0]


class NetTxEngine:
    """Native handler of one tx queue: frames go through the switch in C."""

    def __init__(self, switch: NetSwitch, port: int, pair: int) -> None:
        self.switch, self.port, self.pair = switch, port, pair
        self._ctx = None
        self.stats: dict[str, int] = {}

    def _bind(self):
        if self._ctx is not None:
            raise ValueError("a NetTxEngine serves one queue at a time")
        ctx = lib.vr_net_tx_new(self.switch._sw, self.port, self.pair)
        if ctx == ffi.NULL:
            raise MemoryError("cannot allocate the net tx engine")
        self._ctx = ctx
        return ctx

    def _unbind(self) -> None:
        if self._ctx is not None:
            lib.vr_net_tx_free(self._ctx)
            self._ctx = None


class NetRxQueue:
    """Marks an rx queue of a switch port. It has no worker: other ports' tx
    workers fill it under its lock, which the control plane also holds while
    it changes the queue (pause), and which stop() takes to detach it."""

    def __init__(self, switch: NetSwitch, port: int, pair: int) -> None:
        self.switch, self.port, self.pair = switch, port, pair
        self.stats: dict[str, int] = {}
        self._vq: Virtqueue | None = None

    def _attach(self, vq: Virtqueue) -> None:
        _check(lib.vr_net_rx_attach(self.switch._sw, self.port, self.pair, vq._q), "rx attach")
        self._vq = vq

    def report_if_broken(self) -> bool:
        """Log and signal (err eventfd) a ring violation that another port's tx
        worker met while filling this queue; True the first time."""
        vq = self._vq
        if vq is None or not vq.started or not vq.broken or vq._reported:
            return False
        vq._report_broken()
        return True

    def _detach(self) -> None:
        lib.vr_net_rx_detach(self.switch._sw, self.port, self.pair)

    def _unbind(self) -> None:
        pass

    def _lock(self) -> None:
        lib.vr_net_rx_lock(self.switch._sw, self.port, self.pair)

    def _unlock(self) -> None:
        lib.vr_net_rx_unlock(self.switch._sw, self.port, self.pair)


@ffi.def_extern()
def vr_py_handler(ctx, q):  # pragma: no cover - exercised through the worker
    """Trampoline from vr_run into a Python handler."""
    vq = ffi.from_handle(ctx)
    try:
        vq._handler(vq)
    except VirtqueueError:
        pass  # the queue is broken; vr_run sees it and returns
    except Exception:
        log.exception("queue %d: handler failed", vq.index)
    return 0


class _NativeMemory:
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


class Virtqueue:
    """One split virtqueue, device side, with its worker thread."""

    def __init__(self, index: int, max_size: int = 1024, *, poll_us: int = 0) -> None:
        if not 0 < max_size <= MAX_QUEUE_SIZE:
            raise ValueError(f"max_size must be in 1..{MAX_QUEUE_SIZE}")
        self.index = index
        self.max_size = max_size
        self.poll_us = poll_us
        self._q = ffi.new("struct vr_queue *")
        lib.vr_queue_init(self._q, index)
        self._ctl = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._cond = threading.Condition()
        self._kick: int | None = None
        self._call: int | None = None
        self._err: int | None = None
        self._num = 0
        self._addr: tuple[int, int, int, int, int, bool] | None = None
        self._event_idx = False
        self._inflight: tuple[Any, int] | None = None
        self._inflight_buf = None
        self._reset_run_state()

    def _reset_run_state(self) -> None:
        self._started = False
        self._memory: GuestMemory | None = None
        self._native_mem: _NativeMemory | None = None
        self._handler: Any = None
        self._engine: BlkEngine | None = None
        self._handle = None
        self._thread: threading.Thread | None = None
        self._request: str | None = None
        self._parked = False
        self._reported = False
        self._chain = None
        self._segs = None

    # -- properties -------------------------------------------------------------
    @property
    def started(self) -> bool:
        return self._started

    @property
    def num(self) -> int:
        return self._num

    @property
    def has_kick(self) -> bool:
        return self._kick is not None

    @property
    def memory(self) -> GuestMemory | None:
        """The guest memory table the queue runs on (None while stopped).

        Stable for the duration of a handler call: a table swap pauses the
        worker between batches.
        """
        return self._memory

    @property
    def broken(self) -> bool:
        return bool(lib.vr_queue_broken(self._q))

    @property
    def error(self) -> str | None:
        """The message of the violation that broke the queue, or None."""
        if not lib.vr_queue_broken(self._q):
            return None
        return ffi.string(lib.vr_queue_error(self._q)).decode(errors="replace")

    @property
    def failure(self) -> Exception | None:
        """The typed error (DescriptorLoop, ...) that broke the queue, or None."""
        code = lib.vr_queue_broken(self._q)
        if not code:
            return None
        return _ERRORS.get(code, VirtqueueError)(self.error)

    @property
    def stats(self) -> dict[str, int]:
        """Counters of the current run: requests, kicks, notifies, bytes_read,
        bytes_written, io_errors, plus the BlkEngine's per-type counters."""
        s = ffi.new("struct vr_stats *")
        lib.vr_queue_get_stats(self._q, s)
        out = {"requests": s.requests, "kicks": s.kicks, "notifies": s.notifies,
               "bytes_read": s.bytes_read, "bytes_written": s.bytes_written,
               "io_errors": s.io_errors}
        if self._engine is not None:
            out.update(self._engine.stats)
        return out

    # -- control plane setters -------------------------------------------------------
    def set_num(self, n: int) -> None:
        """SET_VRING_NUM: a power of two in 1..max_size (split ring, like Linux vhost)."""
        if not 0 < n <= self.max_size or n & (n - 1):
            raise ValueError(f"queue {self.index}: size {n} is not a power of two in 1..{self.max_size}")
        _check(lib.vr_queue_set_num(self._q, n), f"queue {self.index}: set_num")
        self._num = n

    def set_addr(self, desc: int, avail: int, used: int, *, flags: int = 0, log: int = 0,
                 gpa: bool = False) -> None:
        """SET_VRING_ADDR: front-end virtual addresses (guest physical if gpa=True).

        The rings are checked against guest memory at start(); `log` is kept
        for dirty logging, which is not implemented.
        """
        for name, v in (("desc", desc), ("avail", avail), ("used", used)):
            if not 0 <= v < 1 << 64:
                raise ValueError(f"{name} address out of range")
        _check(lib.vr_queue_set_addr(self._q, desc, avail, used, int(gpa)),
               f"queue {self.index}: set_addr")
        self._addr = (desc, avail, used, flags, log, gpa)

    def set_base(self, last_avail_idx: int) -> None:
        """SET_VRING_BASE: the avail index to continue from."""
        if not 0 <= last_avail_idx <= 0xFFFF:
            raise ValueError("base must be a 16-bit index")
        _check(lib.vr_queue_set_base(self._q, last_avail_idx), f"queue {self.index}: set_base")

    def get_base(self) -> int:
        """The next avail index to process (GET_VRING_BASE reply)."""
        return lib.vr_queue_get_base(self._q)

    def set_event_idx(self, on: bool) -> None:
        """Whether VIRTIO_RING_F_EVENT_IDX was negotiated."""
        with self._paused():
            lib.vr_queue_set_event_idx(self._q, int(bool(on)))
            self._event_idx = bool(on)

    def set_kick(self, fd: int | None) -> None:
        """SET_VRING_KICK; takes ownership of fd and closes the previous one."""
        with self._paused():
            old, self._kick = self._kick, fd
            self._apply_fds()
        _close(old, keep=fd)

    def set_call(self, fd: int | None) -> None:
        """SET_VRING_CALL; takes ownership of fd and closes the previous one."""
        with self._paused():
            old, self._call = self._call, fd
            self._apply_fds()
        _close(old, keep=fd)

    def set_err(self, fd: int | None) -> None:
        """SET_VRING_ERR; takes ownership of fd and closes the previous one."""
        with self._cond:
            old, self._err = self._err, fd
        _close(old, keep=fd)

    def set_inflight(self, region: Any, offset: int) -> None:
        """Attach this queue's slice of the inflight shared memory (an mmap), or None.

        Used from the next start(): a fresh (zeroed) region is initialised; a
        used one is recovered and its inflight heads are resubmitted first.
        """
        if self._started:
            raise ValueError(f"queue {self.index}: set_inflight while started")
        if region is None:
            self._inflight = None
            return
        if offset < 0 or offset + 16 > len(region):
            raise ValueError("inflight offset outside the region")
        self._inflight = (region, offset)

    def _apply_fds(self) -> None:
        lib.vr_queue_set_fds(self._q, -1 if self._kick is None else self._kick,
                             -1 if self._call is None else self._call)

    # -- start / stop -------------------------------------------------------------------
    def start(self, memory: GuestMemory, handler: Any = None) -> None:
        """Start the queue on `memory` with a BlkEngine, a Python callable, or None.

        With handler=None no worker runs: the caller drives pop/push/notify.
        Raises AddressOutOfRange / VirtqueueError if the rings do not fit.
        """
        if self._started:
            raise ValueError(f"queue {self.index} is already started")
        if self.broken:
            raise ValueError(f"queue {self.index} is broken; reset() it first")
        if self._num == 0 or self._addr is None:
            raise ValueError(f"queue {self.index}: size and addresses must be set before start")
        memory.acquire()
        native = _NativeMemory(memory)
        try:
            if self._inflight is not None:
                region, offset = self._inflight
                self._inflight_buf = ffi.from_buffer("uint8_t[]", region, require_writable=True)
                lib.vr_queue_set_inflight(self._q, self._inflight_buf + offset, len(region) - offset)
            else:
                lib.vr_queue_set_inflight(self._q, ffi.NULL, 0)
            self._apply_fds()
            _check(lib.vr_queue_start(self._q, native.table), f"queue {self.index}: start")
        except BaseException:
            native.release()
            self._release_inflight()
            memory.release()
            raise
        self._memory, self._native_mem = memory, native
        self._segs = ffi.new("struct vr_seg[]", lib.VR_MAX_SEGS)
        self._chain = ffi.new("struct vr_chain *")
        self._chain.cap = lib.VR_MAX_SEGS
        self._chain.segs = self._segs
        self._started = True
        if self._inflight is not None:
            # One line per start: crash-recovery tests read it to prove that
            # requests really were replayed from the front-end's region.
            log.info("queue %d: %d request(s) to resubmit from the inflight region",
                     self.index, len(self.inflight_heads()))
        if isinstance(handler, NetRxQueue):
            handler._attach(self)
            self._engine = handler
            return
        if handler is None:
            return
        try:
            if isinstance(handler, BlkEngine):
                fn, ctx = ffi.addressof(lib, "vr_blk_handle"), handler._bind()
                self._engine = handler
            elif isinstance(handler, NetTxEngine):
                fn, ctx = ffi.addressof(lib, "vr_net_tx_handle"), handler._bind()
                self._engine = handler
            elif callable(handler):
                self._handle = ffi.new_handle(self)
                fn, ctx = ffi.addressof(lib, "vr_py_handler"), self._handle
            else:
                raise TypeError("handler must be a BlkEngine, a callable or None")
            self._handler = handler
            self._thread = threading.Thread(target=self._worker, args=(fn, ctx),
                                            name=f"vq{self.index}", daemon=True)
            self._thread.start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> int:
        """Stop the worker after its current batch; returns last_avail_idx (GET_VRING_BASE).

        Every chain popped by a native engine has been completed and pushed
        when this returns.  Safe to call on a stopped or broken queue.
        """
        if self._started:
            t = self._thread
            if t is not None:
                with self._cond:
                    self._request = "stop"
                    self._cond.notify_all()
                os.eventfd_write(self._ctl, 1)
                t.join()
            if isinstance(self._engine, NetRxQueue):
                self._engine._detach()
            lib.vr_queue_stop(self._q)
            if self._engine is not None:
                self._engine._unbind()
            self._native_mem.release()
            self._release_inflight()
            self._memory.release()
            _drain(self._ctl)
            engine = self._engine
            self._reset_run_state()
            self._engine = engine  # keep its stats readable
        return lib.vr_queue_get_base(self._q)

    def update_memory(self, memory: GuestMemory) -> None:
        """Swap in a new memory table while running (at a batch boundary).

        If the rings are no longer mapped by the new table the queue is
        stopped and AddressOutOfRange is raised.
        """
        if not self._started:
            return
        memory.acquire()
        native = _NativeMemory(memory)
        with self._paused():
            rc = lib.vr_queue_set_mem(self._q, native.table)
            if rc >= 0:
                old_native, old_mem = self._native_mem, self._memory
                self._native_mem, self._memory = native, memory
        if rc < 0:
            native.release()
            memory.release()
            self.stop()
            _check(rc, f"queue {self.index}: new memory table")
        old_native.release()
        old_mem.release()

    def reset(self) -> None:
        """Back to the initial state: stopped, not broken, no fds, no addresses."""
        self.stop()
        lib.vr_queue_reset(self._q)
        for fd in (self._kick, self._call, self._err):
            _close(fd)
        self._kick = self._call = self._err = None
        self._num = 0
        self._addr = None
        self._event_idx = False
        self._inflight = None
        self._engine = None

    def close(self) -> None:
        """reset() and release the control eventfd; the object is unusable afterwards."""
        self.reset()
        if self._ctl >= 0:
            os.close(self._ctl)
            self._ctl = -1

    def _release_inflight(self) -> None:
        if self._inflight_buf is not None:
            ffi.release(self._inflight_buf)
            self._inflight_buf = None
        lib.vr_queue_set_inflight(self._q, ffi.NULL, 0)

    # -- slow-path data API (Python handlers, tests) -----------------------------------
    def pop(self) -> Chain | None:
        """The next available chain, or None (also once the queue is broken).

        Raises the typed VirtqueueError the first time the driver breaks a rule.
        """
        if not self._started:
            raise ValueError(f"queue {self.index} is not started")
        rc = lib.vr_pop(self._q, self._chain)
        if rc < 0:
            self._report_broken()
            _check(rc, f"queue {self.index}: pop", self._q)
        if rc == 0:
            return None
        return self._popped()

    def _popped(self) -> Chain:
        """The chain a native pop left in the queue's chain buffer, as a Chain."""
        c = self._chain
        segs = [(s.region, s.offset, s.len) for s in (c.segs[k] for k in range(c.nseg))]
        return Chain(c.head, segs[:c.nread], segs[c.nread:], self._memory)

    def unpop(self) -> None:
        """Give the chain popped last back, unused: the next pop returns it again.

        Only for queues without inflight tracking (a device that holds an rx
        buffer it may not need, such as vsock waiting for host data).
        """
        if not self._started:
            raise ValueError(f"queue {self.index} is not started")
        _check(lib.vr_unpop(self._q), f"queue {self.index}: unpop")

    def push(self, head: int, length: int) -> None:
        """Return chain `head` to the driver with `length` bytes written."""
        if not self._started:
            raise ValueError(f"queue {self.index} is not started")
        if not 0 <= length <= 0xFFFFFFFF:
            raise ValueError("length must fit 32 bits")
        if not 0 <= head < self._num:
            raise ValueError(f"head {head} out of range")
        _check(lib.vr_push(self._q, head, length), f"queue {self.index}: push")

    def notify(self) -> bool:
        """Signal the call eventfd if the suppression rules allow; True if signalled."""
        if not self._started:
            return False
        return bool(lib.vr_notify(self._q))

    def inflight_heads(self) -> list[int]:
        """Heads recovered from the inflight region, still to be resubmitted (counter order)."""
        if not self._started:
            return []
        buf = ffi.new("uint16_t[]", max(self._num, 1))
        n = lib.vr_inflight_list(self._q, buf, self._num)
        return [buf[i] for i in range(n)]

    def wake(self) -> None:
        """Make the worker run its handler again without a guest kick.

        For devices whose work also comes from the host side (vsock's rx path
        when a host socket has data): the worker leaves vr_run through the
        control eventfd and re-enters it, which runs the handler once.
        """
        if self._ctl >= 0:
            try:
                os.eventfd_write(self._ctl, 1)
            except OSError:
                pass

    # -- worker -----------------------------------------------------------------------------
    def _worker(self, fn, ctx) -> None:
        while True:
            rc = lib.vr_run(self._q, self._ctl, fn, ctx, self.poll_us)
            if rc == lib.VR_RUN_BROKEN:
                self._report_broken()
            elif rc == lib.VR_RUN_ERROR:
                log.error("queue %d: worker loop failed (bad kick or control fd)", self.index)
            if rc != lib.VR_RUN_CONTROL:
                with self._cond:
                    self._parked = True
                    self._cond.notify_all()
                    while self._request != "stop":
                        self._cond.wait()
                return
            _drain(self._ctl)
            with self._cond:
                self._parked = True
                self._cond.notify_all()
                while self._request == "pause":
                    self._cond.wait()
                self._parked = False
                if self._request == "stop":
                    return

    def _report_broken(self) -> None:
        if self._reported:
            return
        self._reported = True
        log.error("%s", self.error)
        err = self._err
        if err is not None:
            try:
                os.eventfd_write(err, 1)
            except OSError:
                pass

    def _paused(self) -> _Pause:
        return _Pause(self)


class _Pause:
    """Context manager: park the worker at a batch boundary, resume on exit."""

    def __init__(self, vq: Virtqueue) -> None:
        self.vq = vq
        self.active = False
        self.locked: NetRxQueue | None = None

    def __enter__(self) -> None:
        vq = self.vq
        if isinstance(vq._engine, NetRxQueue) and vq._started:
            vq._engine._lock()  # other ports' tx workers write this rx queue
            self.locked = vq._engine
            return
        t = vq._thread
        if t is None or not t.is_alive() or t is threading.current_thread():
            return
        with vq._cond:
            vq._request = "pause"
        self.active = True
        os.eventfd_write(vq._ctl, 1)
        with vq._cond:
            while not vq._parked and t.is_alive():
                vq._cond.wait(0.1)

    def __exit__(self, *exc: object) -> None:
        if self.locked is not None:
            self.locked._unlock()
            return
        if not self.active:
            return
        vq = self.vq
        with vq._cond:
            if vq._request == "pause":
                vq._request = None
            vq._cond.notify_all()


def _drain(fd: int) -> None:
    try:
        os.eventfd_read(fd)
    except (BlockingIOError, OSError):
        pass


def _close(fd: int | None, keep: int | None = None) -> None:
    if fd is not None and fd != keep:
        try:
            os.close(fd)
        except OSError:
            pass
