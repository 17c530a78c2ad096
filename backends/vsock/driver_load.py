"""The virtio-vsock stream load of the built-in front-end, in C (driver_vsock.c), GIL released."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from vhost_user._driver import ffi, lib
from vhost_user.frontend.driver_ring import DriverQueue, u32

__all__ = ["VSOCK_HDR_SIZE", "VsockConnState", "VsockBenchResult", "VsockBenchRun", "run_vsock_stream_bench"]

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
        rs[i].gpa, rs[i].head = gpa, u32(head, "rx head")
    p = ffi.new("struct drv_vsock_bench_params *", {
        "direction": lib.DRV_VSOCK_G2H if direction == "g2h" else lib.DRV_VSOCK_H2G,
        "write_size": u32(write_size, "write_size"), "tx_slot_size": u32(tx_slot_size, "tx_slot_size"),
        "rx_buf_len": u32(rx_buf_len, "rx_buf_len"), "rx_split": bool(rx_split),
        "duration_ns": int(duration_s * 1e9), "stall_timeout_ns": max(1, int(stall_timeout_s * 1e9))})
    s = ffi.new("struct drv_vsock_bench_stats *")
    rc = lib.drv_vsock_bench(tx.native, rx.native, c, ts, len(tx_slots), rs, len(rx_posted), p, s)
    # Hand the buffers and counters back first, whatever happened, then raise.
    for k in _VSOCK_CONN_FIELDS:
        setattr(conn, k, getattr(c, k))
    no_head = lib.DRV_VSOCK_NO_HEAD
    rx_now = [(-1 if rs[i].head == no_head else rs[i].head, rs[i].gpa) for i in range(len(rx_posted))]
    tx_busy = [(ts[i].head, ts[i].gpa) for i in range(len(tx_slots)) if ts[i].head != no_head]
    error = None
    if rc < 0 and rc != lib.DRV_E_TIMEOUT:
        try:
            tx.check(rc, "vsock bench")
        except Exception as exc:  # handed to the caller with the buffers
            error = exc
    result = VsockBenchResult(
        s.tx_bytes, s.tx_packets, s.rx_bytes, s.rx_packets, s.credit_updates, s.credit_requests,
        s.other, s.errors, s.peer_credit_violations, s.elapsed_ns / 1e9, s.end_op, s.end_flags,
        rc == lib.DRV_E_TIMEOUT)
    return VsockBenchRun(result, rx_now, tx_busy, error)
