"""State of one guest <-> host-socket connection, with credit accounting.

Theory of operation
-------------------
A connection pairs a guest socket (guest_port on this VM) with a host Unix
socket. Bytes flow two ways, each under the virtio-vsock credit rules
(virtio spec 5.10.6.3):

* guest -> host: we advertise `buf_alloc` (the --tx-buffer-size) and count in
  `fwd_cnt` the bytes written to the host socket. Bytes the host socket did
  not take yet wait in `pending` (never more than buf_alloc: a guest that
  sends beyond its credit is reset). A CREDIT_UPDATE goes out when the
  guest's view of our free space falls below half of buf_alloc.
* host -> guest: the guest's `peer_buf_alloc`/`peer_fwd_cnt` (from every
  header it sends) bound what we may send: `credit()`; with no credit the
  host socket is not read, so a slow guest throttles the host writer
  through the kernel socket buffer, and we ask with CREDIT_REQUEST.

The counters, the state and the flags the C data path reads live in a
native record (`fastpath.ConnCounters`), exposed here as
plain attributes: C (established stream RW packets) and Python (everything
else) update one copy. The object holds no lock: the device serialises
access with its own lock, also around the C calls.
"""

from __future__ import annotations

import enum
import socket
from collections import deque

from .fastpath import ConnCounters, credit as _native_credit, credit_update_due

from .packet import SockType

__all__ = ["Conn", "ConnState"]


class ConnState(enum.Enum):
    CONNECTING = "connecting"    # host client asked CONNECT; REQUEST sent, awaiting RESPONSE
    ESTABLISHED = "established"
    CLOSED = "closed"


_STATE_CODE = {ConnState.CONNECTING: 0, ConnState.ESTABLISHED: 1, ConnState.CLOSED: 2}
_CODE_STATE = {v: k for k, v in _STATE_CODE.items()}


def _native(name: str, kind=int):
    """An attribute stored in the native record `self.rec`."""
    def get(self):
        return kind(getattr(self.rec, name))

    def put(self, value):
        setattr(self.rec, name, value)
    return property(get, put)


class Conn:
    """One host-side connection; `key` is (peer_cid, peer_port, guest_port)."""

    buf_alloc = _native("buf_alloc")
    fwd_cnt = _native("fwd_cnt")               # bytes written to the host socket
    rx_total = _native("rx_total")             # bytes received from the guest
    reported_fwd = _native("reported_fwd")     # fwd_cnt last told to the guest
    pending_bytes = _native("pending_bytes")
    guest_shut_send = _native("guest_shut_send", bool)
    peer_buf_alloc = _native("peer_buf_alloc")
    peer_fwd_cnt = _native("peer_fwd_cnt")
    tx_cnt = _native("tx_cnt")                 # bytes sent to the guest
    readable = _native("readable", bool)       # the host socket has data or EOF (selector said so)
    guest_shut_rcv = _native("guest_shut_rcv", bool)  # the guest takes no more bytes

    def __init__(self, sock: socket.socket, *, guest_port: int, host_port: int,
                 sock_type: int, buf_alloc: int, state: ConnState, peer_cid: int = 2):
        self.sock = sock
        self.guest_port = guest_port
        self.host_port = host_port
        self.peer_cid = peer_cid
        self.type = sock_type
        self.rec = ConnCounters(peer_cid, host_port, guest_port, sock.fileno(), sock_type)
        self.state = state
        # guest -> host
        self.buf_alloc = buf_alloc
        self.pending: deque[bytes] = deque()   # accepted, not yet written (records for SEQPACKET)
        self.message = bytearray()  # SEQPACKET message being assembled
        self.guest_shut_rcv = False
        self.host_shut_done = False
        self.short_writes = 0       # RW packets the host socket took only part of at once
        # host -> guest
        self.prefix = bytearray()   # bytes read from the host, not yet sent (CONNECT leftovers, records)
        self.prefix_is_record = False
        self.host_eof = False
        self.credit_requested = False
        self.interest = -1          # selector events last registered by the host thread

    @property
    def state(self) -> ConnState:
        return _CODE_STATE[self.rec.state]

    @state.setter
    def state(self, value: ConnState) -> None:
        self.rec.state = _STATE_CODE[value]

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.peer_cid, self.host_port, self.guest_port)

    @property
    def seqpacket(self) -> bool:
        return self.type == SockType.SEQPACKET

    def credit(self) -> int:
        """Bytes the guest can still take (5.10.6.3.1), never negative."""
        return _native_credit(self.rec)

    def update_peer(self, buf_alloc: int, fwd_cnt: int) -> None:
        self.peer_buf_alloc = buf_alloc
        self.peer_fwd_cnt = fwd_cnt
        self.peer_credit_changed()

    def peer_credit_changed(self) -> None:
        """The guest's window moved (here or in C): a CREDIT_REQUEST may be sent again."""
        if self.credit() > 0:
            self.credit_requested = False

    def accepts(self, length: int) -> bool:
        """Whether `length` more guest bytes stay within the credit we advertised."""
        in_flight = self.rx_total - self.reported_fwd
        return in_flight + length <= self.buf_alloc

    def needs_credit_update(self) -> bool:
        """True when the guest believes less than half our buffer is free and we freed some."""
        return credit_update_due(self.rec)

    def wants_host_read(self) -> bool:
        """Read interest in the host socket: established, guest can take bytes, none queued."""
        return (self.state is ConnState.ESTABLISHED and not self.host_eof and not self.readable
                and not self.guest_shut_rcv and not self.prefix and self.credit() > 0)

    def describe(self) -> str:
        kind = "seqpacket" if self.seqpacket else "stream"
        return f"{kind} guest port {self.guest_port} <-> {self.peer_cid}:{self.host_port}"
