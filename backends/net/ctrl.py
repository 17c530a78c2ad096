"""The virtio-net control virtqueue, served by the back-end (virtio 1.2, 5.1.6.5).

Theory of operation
-------------------
QEMU keeps the control queue itself: with `-netdev vhost-user` every net
client it creates is a data-path client, so virtio-net hands the back-end
rx/tx pairs only and never acknowledges VIRTIO_NET_F_CTRL_VQ or the
features behind it to us (they are not in QEMU's vhost-user feature list).
Front-ends that hand every queue over (crosvm) do ack it; then the last
queue (index 2 * max_virtqueue_pairs with MQ, 2 without) carries commands
here. A command is one chain: readable `class, command, data...`, then one
writable `ack` byte.

Commands are rare, so they are parsed and applied in Python; what they set
(rx queue pairs in use, the receive filter) is handed to the C switch in one
call each, and the per-frame checks stay in C (backends/net/net_filter.c).

Served: RX (PROMISC, ALLMULTI, and with CTRL_RX_EXTRA ALLUNI, NOMULTI,
NOUNI, NOBCAST), MAC (TABLE_SET, ADDR_SET), MQ VQ_PAIRS_SET and ANNOUNCE
ACK. Anything else, or a command whose feature was not negotiated, gets
VIRTIO_NET_ERR. VLAN filtering, RSS and guest offload changes are not
offered.
"""

from __future__ import annotations

import enum
import logging
import struct
from dataclasses import dataclass, field
from typing import Callable

from .header import NetFeature

__all__ = ["CtrlClass", "RxFlag", "RxFilter", "NetControl", "parse_mac_table",
           "OK", "ERR", "MAX_MACS"]

log = logging.getLogger(__name__)

OK, ERR = 0, 1
MAX_MACS = 64          # backends/net/net.h VR_NET_MAX_MACS; more entries mean "all of that kind"


class CtrlClass(enum.IntEnum):
    RX = 0
    MAC = 1
    VLAN = 2
    ANNOUNCE = 3
    MQ = 4
    GUEST_OFFLOADS = 5


class RxFlag(enum.IntFlag):
    """Receive filter flags, as backends/net/net.h VR_NET_RX_* (FILTER: the filter applies)."""

    FILTER = 1
    PROMISC = 2
    ALLMULTI = 4
    ALLUNI = 8
    NOMULTI = 16
    NOUNI = 32
    NOBCAST = 64


# VIRTIO_NET_CTRL_RX command -> (flag, feature it needs)
_RX_COMMANDS = {
    0: (RxFlag.PROMISC, NetFeature.CTRL_RX),
    1: (RxFlag.ALLMULTI, NetFeature.CTRL_RX),
    2: (RxFlag.ALLUNI, NetFeature.CTRL_RX_EXTRA),
    3: (RxFlag.NOMULTI, NetFeature.CTRL_RX_EXTRA),
    4: (RxFlag.NOUNI, NetFeature.CTRL_RX_EXTRA),
    5: (RxFlag.NOBCAST, NetFeature.CTRL_RX_EXTRA),
}
_MAC_TABLE_SET, _MAC_ADDR_SET = 0, 1
_ANNOUNCE_ACK = 0
_VQ_PAIRS_SET = 0


@dataclass
class RxFilter:
    """A port's receive filter; promiscuous until the driver says otherwise (as QEMU)."""

    flags: RxFlag = RxFlag.PROMISC
    unicast: list[bytes] = field(default_factory=list)
    multicast: list[bytes] = field(default_factory=list)
    uni_overflow: bool = False
    multi_overflow: bool = False

    def effective(self) -> RxFlag:
        """Flags for the switch: a table too long to hold turns into all-of-that-kind."""
        f = self.flags | RxFlag.FILTER
        if self.uni_overflow:
            f |= RxFlag.ALLUNI
        if self.multi_overflow:
            f |= RxFlag.ALLMULTI
        return f


def parse_mac_table(data: bytes) -> tuple[list[bytes], list[bytes]]:
    """VIRTIO_NET_CTRL_MAC_TABLE_SET data: two `le32 entries; u8 macs[entries][6]`
    tables (unicast, then multicast). ValueError if the data does not hold them exactly."""
    tables, off = [], 0
    for _ in range(2):
        if off + 4 > len(data):
            raise ValueError("MAC table shorter than its entry count")
        (n,) = struct.unpack_from("<I", data, off)
        off += 4
        if n > (len(data) - off) // 6:
            raise ValueError(f"MAC table of {n} entries does not fit the command")
        tables.append([data[off + 6 * i:off + 6 * i + 6] for i in range(n)])
        off += 6 * n
    if off != len(data):
        raise ValueError("trailing bytes after the MAC tables")
    return tables[0], tables[1]


class NetControl:
    """One port's control queue: a Python queue handler (called with the queue from its worker).

    `apply_pairs(n)` and `apply_filter(flags, own_mac, unicast, multicast)` hand the
    state to the switch; `set_mac(mac)` records a new default MAC (config space).
    """

    def __init__(self, *, max_pairs: int, features: Callable[[], int], mac: Callable[[], bytes],
                 set_mac: Callable[[bytes], None], apply_pairs: Callable[[int], None],
                 apply_filter: Callable[[RxFlag, bytes, list, list], None]) -> None:
        self.max_pairs = max_pairs
        self._features, self._mac, self._set_mac = features, mac, set_mac
        self._apply_pairs, self._apply_filter = apply_pairs, apply_filter
        self.filter = RxFilter()
        self.pairs = 1
        self.commands = 0
        self.errors = 0
        self._dispatch = {
            CtrlClass.RX: self._rx,
            CtrlClass.MAC: self._mac_cmd,
            CtrlClass.ANNOUNCE: self._announce,
            CtrlClass.MQ: self._mq,
        }

    def _has(self, bit: int) -> bool:
        return bool(self._features() >> bit & 1)

    # -- state ----------------------------------------------------------------------
    def reset(self) -> None:
        """The state a freshly negotiated driver finds: one pair, promiscuous (5.1.6.5.5)."""
        self.filter = RxFilter()
        self.pairs = 1
        self._apply_pairs(1)
        self.push_filter()

    def push_filter(self) -> None:
        """Hand the filter to the switch; without CTRL_RX it does not apply at all."""
        if not self._has(NetFeature.CTRL_RX):
            self._apply_filter(RxFlag(0), self._mac(), [], [])
            return
        f = self.filter
        self._apply_filter(f.effective(), self._mac(),
                           [] if f.uni_overflow else f.unicast,
                           [] if f.multi_overflow else f.multicast)

    # -- commands ---------------------------------------------------------------------
    def execute(self, cls: int, cmd: int, data: bytes) -> int:
        """Run one command; returns the ack byte (OK or ERR)."""
        self.commands += 1
        handler = self._dispatch.get(cls)
        try:
            ack = ERR if handler is None else handler(cmd, data)
        except ValueError as exc:
            log.warning("control queue: class %d command %d: %s", cls, cmd, exc)
            ack = ERR
        if ack != OK:
            self.errors += 1
            log.info("control queue: class %d command %d refused", cls, cmd)
        return ack

    def _rx(self, cmd: int, data: bytes) -> int:
        entry = _RX_COMMANDS.get(cmd)
        if entry is None or not self._has(entry[1]) or len(data) != 1:
            return ERR
        flag = entry[0]
        self.filter.flags = self.filter.flags | flag if data[0] else self.filter.flags & ~flag
        self.push_filter()
        return OK

    def _mac_cmd(self, cmd: int, data: bytes) -> int:
        if cmd == _MAC_TABLE_SET and self._has(NetFeature.CTRL_RX):
            uni, multi = parse_mac_table(data)
            if any(m[0] & 1 for m in uni) or any(not m[0] & 1 for m in multi):
                raise ValueError("unicast/multicast entry in the wrong MAC table")
            f = self.filter
            f.uni_overflow, f.multi_overflow = len(uni) > MAX_MACS, len(multi) > MAX_MACS
            if len(uni) + len(multi) > MAX_MACS and not (f.uni_overflow or f.multi_overflow):
                f.multi_overflow = True   # both fit alone, not together: keep unicast exact
            f.unicast, f.multicast = uni, multi
            self.push_filter()
            return OK
        if cmd == _MAC_ADDR_SET and self._has(NetFeature.CTRL_MAC_ADDR):
            if len(data) != 6 or data[0] & 1:
                raise ValueError("ADDR_SET needs one unicast MAC")
            self._set_mac(bytes(data))
            self.push_filter()
            return OK
        return ERR

    def _announce(self, cmd: int, data: bytes) -> int:
        # We never set VIRTIO_NET_S_ANNOUNCE (GUEST_ANNOUNCE is not offered); an ack is harmless.
        return OK if cmd == _ANNOUNCE_ACK and not data else ERR

    def _mq(self, cmd: int, data: bytes) -> int:
        if cmd != _VQ_PAIRS_SET or not self._has(NetFeature.MQ) or len(data) != 2:
            return ERR
        (n,) = struct.unpack("<H", data)
        if not 1 <= n <= self.max_pairs:   # 5.1.6.5.5.1: 1..max_virtqueue_pairs
            raise ValueError(f"VQ_PAIRS_SET {n} outside 1..{self.max_pairs}")
        self.pairs = n
        self._apply_pairs(n)
        log.info("control queue: %d queue pair(s) in use", n)
        return OK

    # -- the queue handler --------------------------------------------------------------
    def __call__(self, vq) -> None:
        """Serve every command waiting on the control queue `vq`."""
        served = False
        while True:
            chain = vq.pop()
            if chain is None:
                break
            request = chain.read()
            if len(request) < 2 or chain.write_len < 1:
                log.warning("control queue: malformed command chain at head %d", chain.head)
                vq.push(chain.head, 0)
                served = True
                continue
            ack = self.execute(request[0], request[1], request[2:])
            # 5.1.6.5: the u8 ack is the one device-writable field.
            chain.write(bytes([ack]))
            vq.push(chain.head, 1)
            served = True
        if served:
            vq.notify()
