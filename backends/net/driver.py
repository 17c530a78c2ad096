"""A virtio-net driver model: what a guest's virtio_net does, minus the CPU.

Queue pair p is rx queue 2p and tx queue 2p+1. The driver keeps the rx
queues filled with buffers (one descriptor each, or cut into several) and
sends frames as readable chains behind a virtio-net header. With
VIRTIO_NET_F_MRG_RXBUF a received frame may span several buffers: the
header's num_buffers says how many used elements belong to it.

With VIRTIO_NET_F_CTRL_VQ negotiated the driver also sets up the control
queue (the last queue with MQ, queue 2 without) and `command()` sends one
control command and returns the device's ack byte.
"""

from __future__ import annotations

import struct
import time

from vhost_user.backends.net.header import OFFLOAD_FEATURES, NetFeature, NetHeader, header_size
from vhost_user.frontend import QEMU, Frontend, Profile, QueueHandle
from vhost_user.frontend.driver import Driver, split_buffer
from vhost_user.protocol import U64, FrontendRequest, ProtocolFeature, VirtioFeature

__all__ = ["NetDriver", "DRIVER_FEATURES", "CTRL_FEATURES", "MAX_FRAME"]

MAX_FRAME = 65550
_DRIVER_OK_STATUS = 1 | 2 | 8 | 4   # ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK
_TX_BUF = 12 + 70000  # room for oversize frames, so tests can send one
DRIVER_FEATURES = (
    (1 << VirtioFeature.VIRTIO_F_VERSION_1)
    | (1 << VirtioFeature.VIRTIO_RING_F_EVENT_IDX)
    | (1 << VirtioFeature.VIRTIO_RING_F_INDIRECT_DESC)
    | (1 << NetFeature.MRG_RXBUF)
    | (1 << NetFeature.MQ)
    | OFFLOAD_FEATURES
)
#: what a driver that uses the control queue adds (crosvm's guests: Linux virtio_net)
CTRL_FEATURES = sum(1 << b for b in (NetFeature.CTRL_VQ, NetFeature.CTRL_RX, NetFeature.CTRL_RX_EXTRA,
                                     NetFeature.CTRL_MAC_ADDR, NetFeature.MTU))
_CTRL_QUEUE_SIZE = 64


class NetDriver(Driver):
    """Drives one vhost-user-net port through the built-in front-end."""

    def __init__(self, frontend: Frontend, *, num_pairs: int = 1, queue_size: int = 256,
                 rx_buffer_size: int | None = None, rx_split: int = 1) -> None:
        self.fe = frontend
        frontend.set_mem_table()
        self.hdr_size = header_size(frontend.features)
        self.mergeable = frontend.has_feature(NetFeature.MRG_RXBUF)
        if rx_buffer_size is None:
            rx_buffer_size = 2048 if self.mergeable else self.hdr_size + MAX_FRAME
        self.rx_buffer_size = rx_buffer_size
        self.rx_split = rx_split
        self.rx: list[QueueHandle] = []
        self.tx: list[QueueHandle] = []
        self._rx_slot: list[dict[int, int]] = []   # head -> buffer gpa
        self._rx_free: list[list[int]] = []
        self._tx_slot: list[dict[int, int]] = []
        self._tx_free: list[list[int]] = []
        ram = frontend.ram
        for p in range(num_pairs):
            self.rx.append(frontend.setup_queue(2 * p, queue_size))
            self.tx.append(frontend.setup_queue(2 * p + 1, queue_size))
            self._rx_slot.append({})
            self._rx_free.append([ram.alloc(rx_buffer_size, 64) for _ in range(queue_size)])
            self._tx_slot.append({})
            self._tx_free.append([ram.alloc(_TX_BUF, 64)
                                  for _ in range(min(queue_size, 64))])
        self.ctrl: QueueHandle | None = None
        if frontend.has_feature(NetFeature.CTRL_VQ):
            # 5.1.2: the control queue follows the last pair the device has (with MQ)
            index = frontend.num_queues - 1 if frontend.has_feature(NetFeature.MQ) else 2
            self.ctrl = frontend.setup_queue(index, _CTRL_QUEUE_SIZE)
            self._ctrl_buf = ram.alloc(4096, 64)
        if frontend.has_protocol_feature(ProtocolFeature.STATUS):
            # As QEMU does; DPDK's vhost waits for DRIVER_OK before it serves the rings.
            frontend.call(FrontendRequest.SET_STATUS, U64(_DRIVER_OK_STATUS))

    @classmethod
    def connect(cls, path: str, *, features: int = DRIVER_FEATURES, num_pairs: int = 1,
                queue_size: int = 256, ram_size: int = 64 << 20, extra_protocol_features: int = 0,
                profile: Profile = QEMU, **kw) -> "NetDriver":
        fe = Frontend(path, ram_size=ram_size, profile=profile)
        try:
            # QEMU's net front-end also asks for RARP (announce after migration).
            fe.negotiate(features, protocol_features=profile.protocol_features
                         | profile.net_protocol_features | extra_protocol_features)
            return cls(fe, num_pairs=num_pairs, queue_size=queue_size, **kw)
        except BaseException:
            fe.close()
            raise

    # -- rx -------------------------------------------------------------------------
    def fill_rx(self, pair: int = 0, count: int | None = None) -> int:
        """Post free rx buffers (all, or `count`); returns how many were posted."""
        free, ring = self._rx_free[pair], self.rx[pair].ring
        n = 0
        while free and (count is None or n < count) and ring.num_free >= self.rx_split:
            gpa = free.pop()
            head = ring.add(split_buffer(gpa, self.rx_buffer_size, self.rx_split))
            self._rx_slot[pair][head] = gpa
            n += 1
        if n:
            ring.kick()
        return n

    def recv(self, pair: int = 0, timeout: float = 5.0, *, count: int = 1,
             refill: bool = True) -> list[tuple[NetHeader, bytes]]:
        """Wait for at least `count` frames; returns [(header, frame)] in arrival order."""
        out: list[tuple[NetHeader, bytes]] = []
        pending: list[tuple[int, int]] = []
        ring = self.rx[pair].ring
        while True:
            pending += ring.reap()
            out += self._assemble(pair, pending)
            if len(out) >= count:
                break
            if not ring.wait(timeout):
                raise TimeoutError(f"pair {pair}: {len(out)} of {count} frame(s) within {timeout} s")
        if refill:
            self.fill_rx(pair)
        return out

    def poll(self, pair: int = 0) -> list[tuple[NetHeader, bytes]]:
        """Frames already received, without waiting."""
        return self._assemble(pair, self.rx[pair].ring.reap())

    def _assemble(self, pair: int, pending: list[tuple[int, int]]) -> list[tuple[NetHeader, bytes]]:
        ram, out = self.fe.ram, []
        while pending:
            head, used = pending[0]
            gpa = self._rx_slot[pair][head]
            first = ram.read(gpa, min(used, self.rx_buffer_size))
            hdr = NetHeader.unpack(first, self.hdr_size) if used >= self.hdr_size else NetHeader()
            nbuf = hdr.num_buffers if self.mergeable else 1
            if len(pending) < nbuf:
                break          # the rest of this frame is not reaped yet
            data = first[self.hdr_size:]
            for h, n in pending[1:nbuf]:
                data += ram.read(self._rx_slot[pair][h], min(n, self.rx_buffer_size))
            for h, _ in pending[:nbuf]:
                self._rx_free[pair].append(self._rx_slot[pair].pop(h))
            del pending[:nbuf]
            out.append((hdr, data))
        return out

    # -- tx -------------------------------------------------------------------------
    def send(self, frame: bytes, header: NetHeader | None = None, *, pair: int = 0,
             split: int = 1, raw: bytes | None = None) -> int:
        """Send one frame behind `header` (raw: exact chain bytes, for hostile tests)."""
        self.reap_tx(pair)
        free = self._tx_free[pair]
        deadline = time.monotonic() + 5.0
        while not free:  # a wake-up can come before the used entry it announces
            if time.monotonic() > deadline:
                raise TimeoutError(f"pair {pair}: tx buffers are not coming back")
            self.tx[pair].ring.wait(max(0.0, deadline - time.monotonic()))
            self.reap_tx(pair)
        data = raw if raw is not None else (header or NetHeader()).pack(self.hdr_size) + frame
        if len(data) > _TX_BUF:
            raise ValueError("frame too large for the driver's tx buffers")
        gpa = free.pop()
        self.fe.ram.write(gpa, data)
        ring = self.tx[pair].ring
        head = ring.add(split_buffer(gpa, len(data), split, writable=False))
        self._tx_slot[pair][head] = gpa
        ring.kick()
        return head

    def reap_tx(self, pair: int = 0) -> int:
        done = self.tx[pair].ring.reap()
        for head, _ in done:
            self._tx_free[pair].append(self._tx_slot[pair].pop(head))
        return len(done)

    def wait_tx(self, pair: int = 0, timeout: float = 5.0) -> None:
        """Wait until every sent frame was consumed by the back-end."""
        ring = self.tx[pair].ring
        while self._tx_slot[pair]:
            self.reap_tx(pair)
            if self._tx_slot[pair] and not ring.wait(timeout):
                raise TimeoutError(f"pair {pair}: tx not consumed within {timeout} s")

    # -- control queue ----------------------------------------------------------------
    def command(self, cls: int, cmd: int, data: bytes = b"", timeout: float = 5.0) -> int:
        """One control command (5.1.6.5): readable class, command, data; one writable ack
        byte. Returns the ack (0 = VIRTIO_NET_OK)."""
        if self.ctrl is None:
            raise ValueError("VIRTIO_NET_F_CTRL_VQ was not negotiated")
        body = bytes([cls, cmd]) + data
        if len(body) + 1 > 4096:
            raise ValueError("control command too large for the driver's buffer")
        ram, ring = self.fe.ram, self.ctrl.ring
        ack_gpa = self._ctrl_buf + len(body)
        ram.write(self._ctrl_buf, body)
        ram.write(ack_gpa, b"\xff")
        ring.add([(self._ctrl_buf, len(body), False), (ack_gpa, 1, True)])
        ring.kick()
        deadline = time.monotonic() + timeout
        while not ring.reap():
            if not ring.wait(max(0.0, deadline - time.monotonic())):
                raise TimeoutError("control command not answered")
        return ram.read(ack_gpa, 1)[0]

    def set_pairs(self, n: int) -> int:
        """VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET n."""
        return self.command(4, 0, struct.pack("<H", n))

    def rx_mode(self, cmd: int, on: bool) -> int:
        """VIRTIO_NET_CTRL_RX: 0 PROMISC, 1 ALLMULTI, 2 ALLUNI, 3 NOMULTI, 4 NOUNI, 5 NOBCAST."""
        return self.command(0, cmd, bytes([int(on)]))

    def mac_table(self, unicast: list[bytes], multicast: list[bytes]) -> int:
        """VIRTIO_NET_CTRL_MAC_TABLE_SET."""
        data = b"".join(struct.pack("<I", len(t)) + b"".join(t) for t in (unicast, multicast))
        return self.command(1, 0, data)
