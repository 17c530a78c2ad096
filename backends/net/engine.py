"""The native learning switch of vhost-user-net (backends/net/net.c) and its queue engines.

`NetSwitch` owns the C switch (ports, MAC table, capture ring, TAP
readers).  Each virtio port's queues are served through the engine
protocol (vhost_user.engine): a tx queue gets a `NetTxEngine`, whose
worker runs `vr_net_tx_handle` and switches every frame in C; an rx
queue gets a `NetRxQueue`, which has no worker: other ports' tx workers
(and TAP readers) fill it under its lock, which the control plane also
takes while it changes the queue, instead of pausing a worker.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from vhost_user._native import ffi, lib
from vhost_user.engine import Engine
from vhost_user.chain import check_native

if TYPE_CHECKING:  # pragma: no cover
    from vhost_user.virtqueue import Virtqueue

__all__ = ["NetSwitch", "NetTxEngine", "NetRxQueue"]


class NetSwitch:
    """The native learning switch of vhost-user-net (backends/net/net.c): ports, MAC table, capture.

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
        return check_native(lib.vr_net_port_add(self._sw, tap_fd, tap_features), "add port")

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
        check_native(lib.vr_net_port_set_filter(self._sw, port, flags, bytes(own_mac), macs or b"\0",
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
        check_native(lib.vr_net_inject(self._sw, port, frame, len(frame)), "inject")

    def run_tap(self, port: int, ctl_fd: int) -> int:
        """Read frames from the port's TAP fd until ctl_fd is readable (GIL released)."""
        return lib.vr_net_tap_run(self._sw, port, ctl_fd)

    def capture_read(self) -> tuple[bytes, int]:
        """Whole pcap records waiting in the capture ring, and the total drop count."""
        if self._capbuf is None:
            return b"", 0
        n = lib.vr_net_capture_read(self._sw, self._capbuf, len(self._capbuf), self._dropped)
        return bytes(ffi.buffer(self._capbuf, n)), self._dropped[0]

    def capture_dropped(self) -> int:
        """The capture ring's drop count now (also while the drainer is blocked in a write)."""
        return int(lib.vr_net_capture_dropped(self._sw))


class NetTxEngine(Engine):
    """Native handler of one tx queue: frames go through the switch in C."""

    def __init__(self, switch: NetSwitch, port: int, pair: int) -> None:
        self.switch, self.port, self.pair = switch, port, pair
        self._ctx = None
        self.stats: dict[str, int] = {}

    # Engine protocol: called by Virtqueue.start/stop only.
    def bind(self, vq):
        """A native tx context per run; its worker function is vr_net_tx_handle."""
        if self._ctx is not None:
            raise ValueError("a NetTxEngine serves one queue at a time")
        ctx = lib.vr_net_tx_new(self.switch._sw, self.port, self.pair)
        if ctx == ffi.NULL:
            raise MemoryError("cannot allocate the net tx engine")
        self._ctx = ctx
        return ffi.addressof(lib, "vr_net_tx_handle"), ctx

    def unbind(self) -> None:
        if self._ctx is not None:
            lib.vr_net_tx_free(self._ctx)
            self._ctx = None


class NetRxQueue(Engine):
    """Marks an rx queue of a switch port. It has no worker: other ports' tx
    workers fill it under its lock, which the control plane also holds while
    it changes the queue (pause), and which stop() takes to detach it."""

    def __init__(self, switch: NetSwitch, port: int, pair: int) -> None:
        self.switch, self.port, self.pair = switch, port, pair
        self.stats: dict[str, int] = {}
        self._vq: Virtqueue | None = None

    # Engine protocol: no worker; the switch holds the queue while attached.
    def bind(self, vq: Virtqueue) -> None:
        """Attach the started queue to the switch port's rx pair; no worker runs."""
        check_native(lib.vr_net_rx_attach(self.switch._sw, self.port, self.pair, vq.native_queue),
                     "rx attach")
        self._vq = vq
        return None

    def report_if_broken(self) -> bool:
        """Log and signal (err eventfd) a ring violation that another port's tx
        worker met while filling this queue; True the first time."""
        vq = self._vq
        return vq is not None and vq.report_broken()

    def detach(self) -> None:
        lib.vr_net_rx_detach(self.switch._sw, self.port, self.pair)

    def lock(self) -> None:
        lib.vr_net_rx_lock(self.switch._sw, self.port, self.pair)

    def unlock(self) -> None:
        lib.vr_net_rx_unlock(self.switch._sw, self.port, self.pair)
