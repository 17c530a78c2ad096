"""Driver (guest) side of a virtio split virtqueue, for the built-in front-end.

Theory of operation: the front-end owns guest RAM as memfd regions. One
region, mapped writable here, holds the descriptor table, avail ring and used
ring of a queue (see `ring_layout`), and the buffers the chains point at. All
ring work runs in C (`vhost_user._driver`, csrc/driver.c) with the GIL
released; this is the only module that imports it, and no cdata leaves it.

A `DriverQueue` is used by one thread at a time (the front-end runs one
thread per queue). A back-end that breaks the used-ring rules (an id out of
range, an id that is not in flight, used->idx jumping past what is in flight)
marks the queue broken: the call raises a `VirtqueueError` and every later
call raises too, as libvhost-user does on the other side.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Iterable, Sequence

from vhost_user._driver import ffi, lib
from vhost_user.errors import DescriptorIndexOutOfRange, VirtqueueError

__all__ = ["DriverQueue", "BenchResult", "ring_layout", "bench_area_size", "NetBenchResult",
           "run_net_bench", "VsockConnState", "VsockBenchResult", "VsockBenchRun",
           "run_vsock_stream_bench"]

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


@dataclass(frozen=True)
class BenchResult:
    """What one `run_blk_bench` call measured. mb_s is 10**6 bytes per second."""

    requests: int
    bytes: int
    errors: int
    elapsed_s: float
    iops: float
    mb_s: float
    p50_us: float
    p99_us: float
    kicks: int
    wakeups: int
    mean_us: float = 0.0
    max_us: float = 0.0


def ring_layout(size: int) -> tuple[int, int, int, int]:
    """(desc_offset, avail_offset, used_offset, total_bytes) for a queue of `size`.

    desc at 0, avail right after it, used on the next 4 KiB page; total_bytes
    is rounded up to a page. Meets the 2.7 alignments (16, 2, 4).
    """
    out = ffi.new("struct drv_ring_layout *")
    if lib.drv_ring_layout(_u32(size, "size"), out) != lib.DRV_OK:
        raise ValueError(f"queue size {size} is not a power of 2 in 1..{MAX_QUEUE_SIZE}")
    return out.desc_offset, out.avail_offset, out.used_offset, out.total_bytes


def bench_area_size(block_size: int, queue_depth: int) -> int:
    """Bytes `run_blk_bench` needs at data_offset: per slot a 4 KiB-aligned data
    buffer, then per slot 32 bytes holding the 16-byte header and status byte."""
    return lib.drv_bench_area_size(_u32(block_size, "block_size"), _u32(queue_depth, "queue_depth"))


def _u32(value: int, name: str) -> int:
    if not isinstance(value, int) or not 0 <= value < 1 << 32:
        raise ValueError(f"{name} must be an int in 0..2**32-1, got {value!r}")
    return value


class DriverQueue:
    """One split virtqueue driven from the driver side.

    `area` is a writable buffer (an mmap of a memfd region of guest RAM) whose
    first byte is guest-physical `gpa_base`. The rings are placed at the given
    offsets and zeroed; avail->idx and used->idx start at `base_index` (send
    the same value in SET_VRING_BASE). `kick_fd`/`call_fd` are eventfds the
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
            },
        )
        try:
            self._check(lib.drv_queue_init(self._q, self._st, buf, cfg), "init")
        except BaseException:
            ffi.release(buf)
            raise
        self.size = size
        self.gpa_base = gpa_base
        self.desc_gpa = gpa_base + desc_offset
        self.avail_gpa = gpa_base + avail_offset
        self.used_gpa = gpa_base + used_offset

    # -- helpers ---------------------------------------------------------

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

    def run_blk_bench(
        self,
        *,
        write: bool,
        block_size: int,
        queue_depth: int,
        random: bool,
        capacity_sectors: int,
        data_offset: int,
        duration_s: float | None = None,
        requests: int | None = None,
        seed: int = 0,
        spin_us: float = 0.0,
        stall_timeout_s: float = 10.0,
    ) -> BenchResult:
        """Runs a virtio-blk load in C with the GIL released: keeps `queue_depth`
        3-descriptor requests (header, data, status) in flight, resubmitting on
        completion, until `requests` were submitted and/or `duration_s` passed,
        then drains. Slot buffers take `bench_area_size(block_size,
        queue_depth)` bytes at `data_offset` in the area. Spins on the used
        ring `spin_us` before blocking on the call eventfd; raises TimeoutError
        when nothing completes for `stall_timeout_s`.
        """
        if duration_s is None and requests is None:
            raise ValueError("give duration_s, requests, or both")
        if self.in_flight:
            raise ValueError(f"{self.in_flight} chains still in flight; reap them first")
        if 3 * queue_depth > self.size:
            raise ValueError(f"queue depth {queue_depth} needs {3 * queue_depth} descriptors, queue has {self.size}")
        p = ffi.new(
            "struct drv_bench_params *",
            {
                "write": bool(write),
                "block_size": _u32(block_size, "block_size"),
                "queue_depth": _u32(queue_depth, "queue_depth"),
                "random": bool(random),
                "capacity_sectors": capacity_sectors,
                "data_offset": data_offset,
                "duration_ns": int((duration_s or 0) * 1e9),
                "requests": requests or 0,
                "seed": seed & (2**64 - 1),
                "spin_ns": int(spin_us * 1e3),
                "stall_timeout_ns": max(1, int(stall_timeout_s * 1e9)),
            },
        )
        s = ffi.new("struct drv_bench_stats *")
        self._check(lib.drv_blk_bench(self._q, p, s), "blk bench")
        return _bench_result(s)

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


def _bench_result(s) -> BenchResult:
    elapsed = s.elapsed_ns / 1e9
    rate = (lambda x: x / elapsed) if elapsed > 0 else (lambda x: 0.0)
    return BenchResult(
        requests=s.requests,
        bytes=s.bytes,
        errors=s.errors,
        elapsed_s=elapsed,
        iops=rate(s.requests),
        mb_s=rate(s.bytes) / 1e6,
        p50_us=lib.drv_hist_percentile(s.hist, s.lat_max_ns, 0.50) / 1e3,
        p99_us=lib.drv_hist_percentile(s.hist, s.lat_max_ns, 0.99) / 1e3,
        kicks=s.kicks,
        wakeups=s.wakeups,
        mean_us=(s.lat_sum_ns / s.requests / 1e3) if s.requests else 0.0,
        max_us=s.lat_max_ns / 1e3,
    )


@dataclass(frozen=True)
class NetBenchResult:
    """What `run_net_bench` measured: frames sent/received, rates over `elapsed_s`."""

    sent: int
    received: int
    rx_bytes: int
    elapsed_s: float

    @property
    def pps(self) -> float:
        return self.received / self.elapsed_s if self.elapsed_s else 0.0

    @property
    def gbit_s(self) -> float:
        return self.rx_bytes * 8 / self.elapsed_s / 1e9 if self.elapsed_s else 0.0


def run_net_bench(tx: DriverQueue, rx: DriverQueue, *, hdr_len: int, frame_len: int,
                  tx_offset: int, tx_slot_size: int, tx_slots: int,
                  rx_offset: int, rx_buf_len: int, rx_slots: int, mergeable: bool,
                  duration_s: float, stall_timeout_s: float = 5.0) -> NetBenchResult:
    """A virtio-net load in C with the GIL released (backends/net/driver_net.c): keeps `tx`
    full of the prepared frames in its slots (header + frame, written by the
    caller) and `rx` (another port) full of buffers, for `duration_s`. rx
    buffers stay posted between runs with the same rx area."""
    if tx.in_flight:
        raise ValueError(f"{tx.in_flight} tx chains still in flight; reap them first")
    p = ffi.new("struct drv_net_bench_params *", {
        "hdr_len": hdr_len, "frame_len": frame_len, "tx_offset": tx_offset,
        "tx_slot_size": tx_slot_size, "tx_slots": tx_slots, "rx_offset": rx_offset,
        "rx_buf_len": rx_buf_len, "rx_slots": rx_slots, "mergeable": bool(mergeable),
        "duration_ns": int(duration_s * 1e9), "stall_timeout_ns": int(stall_timeout_s * 1e9)})
    s = ffi.new("struct drv_net_bench_stats *")
    tx._check(lib.drv_net_bench(tx._q, rx._q, p, s), "net bench")
    return NetBenchResult(s.sent, s.received, s.rx_bytes, s.elapsed_ns / 1e9)


VSOCK_HDR_SIZE = lib.DRV_VSOCK_HDR_SIZE
_VSOCK_CONN_FIELDS = ("local_cid", "peer_cid", "local_port", "peer_port", "buf_alloc",
                      "peer_buf_alloc", "peer_fwd_cnt", "tx_cnt", "rx_cnt", "fwd_cnt", "reported_fwd")


@dataclass
class VsockConnState:
    """One vsock STREAM connection's addresses and credit counters (virtio 1.2 5.10.6.3),
    handed to `run_vsock_stream_bench` and updated by it."""

    local_cid: int
    peer_cid: int
    local_port: int
    peer_port: int
    buf_alloc: int
    peer_buf_alloc: int
    peer_fwd_cnt: int
    tx_cnt: int
    rx_cnt: int
    fwd_cnt: int
    reported_fwd: int


@dataclass(frozen=True)
class VsockBenchResult:
    """What `run_vsock_stream_bench` measured. `end_op` is 0 or the SHUTDOWN (4) / RST (3)
    the peer ended the run with (`end_flags` its flags); `timed_out` when it stalled."""

    tx_bytes: int
    tx_packets: int
    rx_bytes: int
    rx_packets: int
    credit_updates: int
    credit_requests: int
    other: int
    errors: int
    peer_credit_violations: int
    elapsed_s: float
    end_op: int
    end_flags: int
    timed_out: bool


@dataclass(frozen=True)
class VsockBenchRun:
    """`run_vsock_stream_bench`'s outcome: the result, every rx buffer as (head, gpa)
    (head -1: the run could not post it again), the tx chains still in flight as
    (head, gpa), and the error that ended the run early (None when it ran out)."""

    result: VsockBenchResult
    rx_posted: list
    tx_busy: list
    error: Exception | None


def run_vsock_stream_bench(tx: DriverQueue, rx: DriverQueue, conn: VsockConnState, *,
                           direction: str, tx_slots: Sequence[int], tx_slot_size: int,
                           rx_posted: Sequence[tuple[int, int]], rx_buf_len: int,
                           rx_split: bool = False, write_size: int = 0, duration_s: float = 0.0,
                           stall_timeout_s: float = 10.0) -> VsockBenchRun:
    """A virtio-vsock stream load in C with the GIL released (backends/vsock/driver_vsock.c) on one
    established connection. direction "g2h": keep `tx` full of RW packets of
    `write_size` payload bytes (the payload already written at +44 in every slot by
    the caller) within the peer's credit, for `duration_s`. "h2g": consume what
    arrives on `rx` until the peer sends SHUTDOWN/RST (or `duration_s` if not 0).

    `tx_slots` are the gpas of free tx buffers (`tx` must have nothing in flight);
    `rx_posted` is every (head, gpa) posted on `rx`. `conn` is updated in place.
    Never raises once C ran, so the caller always gets its buffers back: see
    `VsockBenchRun` (a stall of `stall_timeout_s` sets `result.timed_out`; any other
    failure is in `error`, for the caller to raise after restoring its state).
    """
    if direction not in ("g2h", "h2g"):
        raise ValueError(f"direction must be 'g2h' or 'h2g', got {direction!r}")
    if tx.in_flight:
        raise ValueError(f"{tx.in_flight} tx chains still in flight; reap them first")
    if not tx_slots or not rx_posted:
        raise ValueError("need at least one tx slot and one posted rx buffer")
    c = ffi.new("struct drv_vsock_conn *", {k: getattr(conn, k) for k in _VSOCK_CONN_FIELDS})
    ts = ffi.new("struct drv_vsock_slot[]", len(tx_slots))
    for i, gpa in enumerate(tx_slots):
        ts[i].gpa, ts[i].head = gpa, lib.DRV_VSOCK_NO_HEAD
    rs = ffi.new("struct drv_vsock_slot[]", len(rx_posted))
    for i, (head, gpa) in enumerate(rx_posted):
        rs[i].gpa, rs[i].head = gpa, _u32(head, "rx head")
    p = ffi.new("struct drv_vsock_bench_params *", {
        "direction": lib.DRV_VSOCK_G2H if direction == "g2h" else lib.DRV_VSOCK_H2G,
        "write_size": _u32(write_size, "write_size"), "tx_slot_size": _u32(tx_slot_size, "tx_slot_size"),
        "rx_buf_len": _u32(rx_buf_len, "rx_buf_len"), "rx_split": bool(rx_split),
        "duration_ns": int(duration_s * 1e9), "stall_timeout_ns": max(1, int(stall_timeout_s * 1e9))})
    s = ffi.new("struct drv_vsock_bench_stats *")
    rc = lib.drv_vsock_bench(tx._q, rx._q, c, ts, len(tx_slots), rs, len(rx_posted), p, s)
    # Hand the buffers and counters back first, whatever happened, then raise.
    for k in _VSOCK_CONN_FIELDS:
        setattr(conn, k, getattr(c, k))
    no_head = lib.DRV_VSOCK_NO_HEAD
    rx_now = [(-1 if rs[i].head == no_head else rs[i].head, rs[i].gpa) for i in range(len(rx_posted))]
    tx_busy = [(ts[i].head, ts[i].gpa) for i in range(len(tx_slots)) if ts[i].head != no_head]
    error = None
    if rc < 0 and rc != lib.DRV_E_TIMEOUT:
        try:
            tx._check(rc, "vsock bench")
        except Exception as exc:  # handed to the caller with the buffers
            error = exc
    result = VsockBenchResult(
        s.tx_bytes, s.tx_packets, s.rx_bytes, s.rx_packets, s.credit_updates, s.credit_requests,
        s.other, s.errors, s.peer_credit_violations, s.elapsed_ns / 1e9, s.end_op, s.end_flags,
        rc == lib.DRV_E_TIMEOUT)
    return VsockBenchRun(result, rx_now, tx_busy, error)
