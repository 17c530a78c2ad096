"""The virtio-net device: one vhost-user port of the process's switch.

Device semantics only. QEMU's `-netdev vhost-user` keeps the MAC, the status
and the control queue itself, so a port serves rx/tx queue pairs (even
indices rx, odd tx) and no config space. Frames never pass through Python:
each tx queue's worker runs the C switch (csrc/net.c), which copies straight
into the rx queues of the destination ports.
"""

from __future__ import annotations

import logging
import hashlib
import struct
from dataclasses import dataclass

from vhost_user.device import VirtioDevice
from vhost_user.errors import DeviceError
from vhost_user.protocol import ProtocolFeature
from vhost_user.virtqueue import NetRxQueue, NetSwitch, NetTxEngine

from .header import OFFLOAD_FEATURES, NetFeature

__all__ = ["NetDevice", "NetOptions", "NetSwitchPorts", "CAPABILITIES", "rarp_frame"]

log = logging.getLogger(__name__)

# docs/interop/vhost-user.json: VHostUserBackendCapabilitiesNet (none defined yet).
CAPABILITIES = {"type": "net", "features": []}
_VIRTIO_ID_NET = 1
_MAX_PAIRS = 16


@dataclass
class NetOptions:
    num_queue_pairs: int = 1
    queue_size: int = 32768
    mac: bytes | None = None      # None: derived from the port's endpoint (stable, not random)


#: virtio_net_config as far as we serve it (virtio 1.2, 5.1.4); later fields read as zero
_CONFIG = struct.Struct("<6sHHH")
_CONFIG_SPACE = 64
_STATUS_LINK_UP = 1


def default_mac(endpoint: str) -> bytes:
    """A locally administered unicast MAC from a hash of the endpoint (socket path or fd):
    the same port gets the same address on every start."""
    digest = hashlib.sha256(endpoint.encode()).digest()
    return bytes([(digest[0] & 0xFC) | 0x02]) + digest[1:6]


def rarp_frame(mac: bytes) -> bytes:
    """A RARP "reverse request" announcing `mac`, as QEMU sends after migration."""
    if len(mac) != 6:
        raise ValueError("a MAC address is 6 bytes")
    eth = b"\xff" * 6 + mac + struct.pack("!H", 0x8035)
    body = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 3) + mac + b"\0" * 4 + mac + b"\0" * 4
    return (eth + body).ljust(60, b"\0")


class NetSwitchPorts:
    """The process-wide switch and the ports on it (vhost-user ports, TAP)."""

    def __init__(self, *, capture_bytes: int = 0, ageing_s: float = 300.0) -> None:
        self.switch = NetSwitch(capture_bytes=capture_bytes, ageing_s=ageing_s)
        self.devices: list[NetDevice] = []

    def new_device(self, opts: NetOptions) -> "NetDevice":
        dev = NetDevice(self.switch, self.switch.add_port(), opts)
        self.devices.append(dev)
        return dev


class NetDevice(VirtioDevice):
    device_type = "net"
    virtio_id = _VIRTIO_ID_NET
    device_protocol_features = (1 << ProtocolFeature.MQ) | (1 << ProtocolFeature.RARP)

    def __init__(self, switch: NetSwitch, port: int, opts: NetOptions) -> None:
        super().__init__()
        if not 1 <= opts.num_queue_pairs <= _MAX_PAIRS:
            raise ValueError(f"--num-queues must be 1..{_MAX_PAIRS}")
        if not 4 <= opts.queue_size <= 32768 or opts.queue_size & (opts.queue_size - 1):
            raise ValueError(f"--queue-size {opts.queue_size} must be a power of two in 4..32768")
        self.switch, self.port, self.opts = switch, port, opts
        self.num_queues = 2 * opts.num_queue_pairs
        self.max_queue_size = opts.queue_size
        self.mac = opts.mac or default_mac(f"port {port}")
        # MAC and STATUS for front-ends that read our config space (crosvm); QEMU keeps both
        # itself and masks these bits out of what it asks us for.
        self.device_features = (OFFLOAD_FEATURES | (1 << NetFeature.MRG_RXBUF)
                                | (1 << NetFeature.MAC) | (1 << NetFeature.STATUS))
        if opts.num_queue_pairs > 1:
            self.device_features |= 1 << NetFeature.MQ
        self._handlers: dict[int, NetRxQueue | NetTxEngine] = {}

    def get_config(self, offset: int, size: int) -> bytes:
        """virtio_net_config: mac, status (link up), max_virtqueue_pairs, mtu; any slice."""
        space = _CONFIG.pack(self.mac, _STATUS_LINK_UP, self.opts.num_queue_pairs, 1500)
        space = space.ljust(_CONFIG_SPACE, b"\0")
        if offset < 0 or size < 0 or offset + size > len(space):
            raise DeviceError(f"config read {offset}+{size} beyond {len(space)} bytes")
        return space[offset:offset + size]

    def set_features(self, features: int) -> None:
        super().set_features(features)
        self.switch.set_features(self.port, features)

    def queue_handler(self, index: int):
        """rx queues (even) are filled by other ports' tx workers; tx queues (odd) run the switch."""
        h = self._handlers.get(index)
        if h is None:
            pair = index // 2
            cls = NetRxQueue if index % 2 == 0 else NetTxEngine
            h = self._handlers[index] = cls(self.switch, self.port, pair)
        return h

    def check_queues(self) -> None:
        """Report rx rings the guest broke (found by other ports' tx workers)."""
        for h in self._handlers.values():
            if isinstance(h, NetRxQueue):
                h.report_if_broken()

    def send_rarp(self, mac: bytes) -> None:
        log.info("port %d: announcing %s (SEND_RARP)", self.port, mac.hex(":"))
        self.switch.inject(self.port, rarp_frame(bytes(mac)))

    def set_mtu(self, mtu: int) -> None:
        log.info("port %d: front-end MTU %d (frames up to 64 KiB are switched)", self.port, mtu)

    @property
    def stats(self) -> dict[str, int]:
        """Per-port frame, byte and drop counters of the switch."""
        return self.switch.stats(self.port)

    def reset(self) -> None:
        super().reset()
        self.switch.set_features(self.port, 0)
        self.switch.forget(self.port)

    def capabilities(self) -> dict:
        return dict(CAPABILITIES)
