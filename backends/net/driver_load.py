"""The virtio-net frame load of the built-in front-end, in C (driver_net.c), GIL released."""
from __future__ import annotations

from dataclasses import dataclass
from vhost_user._driver import ffi, lib
from vhost_user.frontend.driver_ring import DriverQueue

__all__ = ["NetBenchResult", "run_net_bench"]


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
    tx.check(lib.drv_net_bench(tx.native, rx.native, p, s), "net bench")
    return NetBenchResult(s.sent, s.received, s.rx_bytes, s.elapsed_ns / 1e9)
