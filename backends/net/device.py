"""The virtio-net device: one vhost-user port of the process's switch.

Device semantics only. A port serves rx/tx queue pairs (even indices rx,
odd tx), a config space (MAC, link-up status, max_virtqueue_pairs, MTU) and
a control queue (ctrl.py) after the last pair. QEMU's `-netdev vhost-user`
keeps MAC, status and the control queue itself and never acks CTRL_VQ to
us, so under QEMU the control queue stays idle and QEMU switches pairs on
and off with SET_VRING_ENABLE; crosvm hands every queue over. Frames never
pass through Python: each tx queue's worker runs the C switch (backends/net/net.c),
which copies straight into the rx queues of the destination ports, after
the destination's MTU and receive filter checks.
"""

from __future__ import annotations

import logging
import hashlib
import struct
from dataclasses import dataclass

from vhost_user.device import VirtioDevice, queue_size_problem
from vhost_user.errors import DeviceError
from vhost_user.protocol import ProtocolFeature
from .engine import NetRxQueue, NetSwitch, NetTxEngine

from .ctrl import NetControl
from .header import OFFLOAD_FEATURES, NetFeature
from . import sandbox as _sandbox  # noqa: F401 (registers the seccomp profile)
from .spec import SPEC

__all__ = ["NetDevice", "NetOptions", "NetSwitchPorts", "CAPABILITIES", "rarp_frame"]

log = logging.getLogger(__name__)

# docs/interop/vhost-user.json: VHostUserBackendCapabilitiesNet (none defined yet).
CAPABILITIES = SPEC.capabilities()  # static; the program may add run-time probes

_MAX_PAIRS = 16
MIN_MTU, MAX_MTU = 68, 65535        # virtio 1.2 5.1.4.1: mtu >= 68; a 16-bit field
DEFAULT_MTU = 1500
#: the control queue and what it serves (QEMU masks all of these out of its requests)
_CTRL_FEATURES = sum(1 << b for b in (NetFeature.CTRL_VQ, NetFeature.CTRL_RX,
                                      NetFeature.CTRL_RX_EXTRA, NetFeature.CTRL_MAC_ADDR))


@dataclass
class NetOptions:
    num_queue_pairs: int = 1
    queue_size: int = 32768
    mac: bytes | None = None      # None: derived from the port's endpoint (stable, not random)
    mtu: int | None = None        # None: 1500 in config space, enforced only once negotiated


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
    device_type = SPEC.name
    virtio_id = SPEC.virtio_id
    device_protocol_features = ((1 << ProtocolFeature.MQ) | (1 << ProtocolFeature.RARP)
                                | (1 << ProtocolFeature.MTU))
    inflight = False  # rx buffers go back to the ring (vr_unpop): no inflight region

    def __init__(self, switch: NetSwitch, port: int, opts: NetOptions) -> None:
        super().__init__()
        if not 1 <= opts.num_queue_pairs <= _MAX_PAIRS:
            raise ValueError(f"--num-queues must be 1..{_MAX_PAIRS}")
        if (problem := queue_size_problem(opts.queue_size)) is not None:
            raise ValueError(problem)
        if opts.mtu is not None and not MIN_MTU <= opts.mtu <= MAX_MTU:
            raise ValueError(f"--mtu {opts.mtu} must be {MIN_MTU}..{MAX_MTU}")
        if opts.mac is not None and (len(opts.mac) != 6 or opts.mac[0] & 1):
            raise ValueError("--mac must be a unicast address")
        self.switch, self.port, self.opts = switch, port, opts
        # rx/tx pairs, then the control queue (5.1.2: index 2N with MQ, N = max pairs)
        self.num_queues = 2 * opts.num_queue_pairs + 1
        self.max_queue_size = opts.queue_size
        self.mac = opts.mac or default_mac(f"port {port}")
        self._configured_mac = self.mac
        self._frontend_mtu = 0          # NET_SET_MTU (QEMU's host_mtu=)
        # MAC, STATUS, MTU and the control queue for front-ends that read our config space
        # and hand us every queue (crosvm); QEMU keeps MAC, STATUS and the control queue
        # itself and masks those bits out of what it asks us for (MTU it passes through).
        self.device_features = (OFFLOAD_FEATURES | (1 << NetFeature.MRG_RXBUF)
                                | (1 << NetFeature.MAC) | (1 << NetFeature.STATUS)
                                | (1 << NetFeature.MTU) | _CTRL_FEATURES)
        if opts.num_queue_pairs > 1:
            self.device_features |= 1 << NetFeature.MQ
        self._handlers: dict[int, NetRxQueue | NetTxEngine] = {}
        self.control = NetControl(
            max_pairs=opts.num_queue_pairs, features=lambda: self.acked_features,
            mac=lambda: self.mac, set_mac=self._set_mac,
            apply_pairs=lambda n: switch.set_pairs(port, n),
            apply_filter=lambda fl, own, uni, multi: switch.set_filter(port, int(fl), own, uni, multi))
        self._apply_limits()

    @property
    def config_mtu(self) -> int:
        """The mtu field of config space: --mtu, else 1500."""
        return self.opts.mtu or DEFAULT_MTU

    @property
    def mtu(self) -> int:
        """The MTU the switch enforces on this port (0: none): what the front-end set
        with NET_SET_MTU, else --mtu, else 1500 once the driver negotiated VIRTIO_NET_F_MTU."""
        if self._frontend_mtu:
            return self._frontend_mtu
        if self.opts.mtu:
            return self.opts.mtu
        return DEFAULT_MTU if self.has_feature(NetFeature.MTU) else 0

    def _apply_limits(self) -> None:
        self.switch.set_mtu(self.port, self.mtu)
        if self.has_feature(NetFeature.CTRL_VQ):
            self.control.reset()          # one pair, promiscuous, until the driver says otherwise
        else:
            # QEMU: all pairs, switched on and off by SET_VRING_ENABLE; no filter
            self.switch.set_pairs(self.port, self.opts.num_queue_pairs)
            self.control.push_filter()

    def _set_mac(self, mac: bytes) -> None:
        log.info("port %d: MAC %s (ADDR_SET)", self.port, mac.hex(":"))
        self.mac = mac

    @property
    def ctrl_index(self) -> int:
        """The control queue's index: 2 * max pairs with MQ negotiated, else 2 (5.1.2)."""
        return 2 * self.opts.num_queue_pairs if self.has_feature(NetFeature.MQ) else 2

    def get_config(self, offset: int, size: int) -> bytes:
        """virtio_net_config: mac, status (link up), max_virtqueue_pairs, mtu; any slice."""
        space = _CONFIG.pack(self.mac, _STATUS_LINK_UP, self.opts.num_queue_pairs, self.config_mtu)
        space = space.ljust(_CONFIG_SPACE, b"\0")
        if offset < 0 or size < 0 or offset + size > len(space):
            raise DeviceError(f"config read {offset}+{size} beyond {len(space)} bytes")
        return space[offset:offset + size]

    def set_features(self, features: int) -> None:
        super().set_features(features)
        self.switch.set_features(self.port, features)
        self._apply_limits()

    def queue_handler(self, index: int):
        """rx queues (even) are filled by other ports' tx workers; tx queues (odd) run the switch."""
        if self.has_feature(NetFeature.CTRL_VQ) and index == self.ctrl_index:
            return self.control
        if index >= 2 * self.opts.num_queue_pairs:
            # A front-end that starts every queue although the driver did not take
            # CTRL_VQ: the queue stays idle (no worker), as the driver never uses it.
            log.info("port %d: queue %d idle (VIRTIO_NET_F_CTRL_VQ not negotiated)", self.port, index)
            return None
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
        """NET_SET_MTU (QEMU's host_mtu=): the MTU the guest was told; the switch enforces it."""
        if not MIN_MTU <= mtu <= MAX_MTU:
            raise DeviceError(f"NET_SET_MTU {mtu} outside {MIN_MTU}..{MAX_MTU}")
        self._frontend_mtu = mtu
        self.switch.set_mtu(self.port, mtu)
        log.info("port %d: MTU %d (NET_SET_MTU)", self.port, mtu)

    @property
    def stats(self) -> dict[str, int]:
        """Per-port frame, byte and drop counters of the switch."""
        return self.switch.stats(self.port)

    def counters(self) -> dict:
        """The switch's counters plus the port's MTU, pairs in use and control commands."""
        out = dict(self.stats)
        out.update(mtu=self.mtu, ctrl_commands=self.control.commands,
                   ctrl_errors=self.control.errors)
        return out

    def reset(self) -> None:
        super().reset()
        self.switch.set_features(self.port, 0)
        self.switch.forget(self.port)
        self.mac = self._configured_mac
        self._frontend_mtu = 0
        self._apply_limits()

    def capabilities(self) -> dict:
        return dict(CAPABILITIES)
