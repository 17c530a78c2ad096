"""Sibling-VM routing: which VMs served by this process may reach each other,
and the credit check on every connection between them.

A VM reaches another by CID when their group sets intersect (the
vhost-device-vsock `groups=` rule). Packets are relayed as they are: the
two guests run the credit protocol end to end. The router watches it on
each sibling connection (a `Flow`, opened by REQUEST, ended by RST): from
every header it learns the sender's `buf_alloc`/`fwd_cnt`, and it counts
the RW payload each side sent. The receiver can only have advertised what
the router already saw (its headers pass here first), so an RW packet that
would put more than the receiver's last `buf_alloc` in flight breaks the
credit rules (virtio 5.10.6.3) whatever the sender saw: `track()` answers
VIOLATION and forgets the flow, and the device resets both ends. A packet
of a connection the router does not know (never opened, or already reset)
is never delivered: no later packet of a reset connection reaches its
peer, so a stream ends with an RST, never with a hole.
"""

from __future__ import annotations

import enum
import logging
import threading
from dataclasses import dataclass, field

from .packet import Header, Op

__all__ = ["Router", "Verdict", "MAX_FLOWS"]

log = logging.getLogger("vhost_user.backends.vsock.device")

#: sibling connections tracked at once (all VMs of the process); more are refused
MAX_FLOWS = 1 << 16
_U32 = (1 << 32) - 1


class Verdict(enum.Enum):
    DELIVER = "deliver"       # within the rules: hand it to the destination
    VIOLATION = "violation"   # credit exceeded or type changed: reset both ends
    UNKNOWN = "unknown"       # no such connection (or table full): RST to the sender only
    IGNORE = "ignore"         # an RST for no connection: nothing to do


@dataclass
class _Side:
    buf_alloc: int = 0
    fwd_cnt: int = 0
    tx_cnt: int = 0           # RW payload bytes this side sent (mod 2**32)


@dataclass
class Flow:
    type: int
    sides: dict = field(default_factory=dict)   # (cid, port) -> _Side


def _endpoints(hdr: Header) -> tuple[tuple[int, int], tuple[int, int]]:
    return (hdr.src_cid, hdr.src_port), (hdr.dst_cid, hdr.dst_port)


def flow_key(hdr: Header) -> tuple:
    src, dst = _endpoints(hdr)
    return (src, dst) if src < dst else (dst, src)


class Router:
    def __init__(self) -> None:
        self._devices: dict[int, object] = {}
        self._flows: dict[tuple, Flow] = {}
        self._lock = threading.Lock()
        self.stats = {"relay_flows_refused": 0}

    def add(self, device) -> None:
        with self._lock:
            if device.guest_cid in self._devices:
                raise ValueError(f"guest CID {device.guest_cid} is used by two VMs")
            self._devices[device.guest_cid] = device

    def remove(self, device) -> None:
        with self._lock:
            if self._devices.get(device.guest_cid) is device:
                del self._devices[device.guest_cid]

    def lookup(self, source, cid: int):
        """The VM with CID `cid` that shares a group with `source`, or None."""
        with self._lock:
            dest = self._devices.get(cid)
        if dest is None or dest is source or not (dest.groups & source.groups):
            return None
        return dest

    # -- the credit watch ----------------------------------------------------------
    def track(self, hdr: Header) -> Verdict:
        """Account one packet a VM sends to a sibling, before it is queued there."""
        key = flow_key(hdr)
        src, dst = _endpoints(hdr)
        with self._lock:
            flow = self._flows.get(key)
            if hdr.op == Op.REQUEST:
                if flow is None and len(self._flows) >= MAX_FLOWS:
                    self.stats["relay_flows_refused"] += 1
                    return Verdict.UNKNOWN
                flow = self._flows[key] = Flow(hdr.type)  # a new REQUEST starts afresh
            elif flow is None:
                return Verdict.IGNORE if hdr.op == Op.RST else Verdict.UNKNOWN
            if hdr.type != flow.type:
                del self._flows[key]
                return Verdict.VIOLATION
            me = flow.sides.setdefault(src, _Side())
            me.buf_alloc, me.fwd_cnt = hdr.buf_alloc, hdr.fwd_cnt
            if hdr.op == Op.RW and hdr.len:
                peer = flow.sides.get(dst, _Side())  # no answer yet: a window of 0
                in_flight = (me.tx_cnt + hdr.len - peer.fwd_cnt) & _U32
                if in_flight > peer.buf_alloc:
                    del self._flows[key]
                    return Verdict.VIOLATION
                me.tx_cnt = (me.tx_cnt + hdr.len) & _U32
            elif hdr.op == Op.RST:
                del self._flows[key]
            return Verdict.DELIVER

    def forget(self, hdr: Header) -> None:
        """The connection of `hdr` ends here (a packet of it could not be delivered)."""
        with self._lock:
            self._flows.pop(flow_key(hdr), None)

    def forget_vm(self, cid: int) -> list[tuple[tuple[int, int], tuple[int, int], int]]:
        """VM `cid` lost its state: drop its flows; returns (its end, other end, type) of each."""
        gone = []
        with self._lock:
            for key in [k for k in self._flows if k[0][0] == cid or k[1][0] == cid]:
                flow = self._flows.pop(key)
                mine, other = key if key[0][0] == cid else (key[1], key[0])
                gone.append((mine, other, flow.type))
        return gone

    def flow_count(self) -> int:
        with self._lock:
            return len(self._flows)
