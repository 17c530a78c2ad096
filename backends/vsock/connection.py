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

The object holds no lock: the device serialises access with its own lock.
"""

from __future__ import annotations

import enum
import socket
from collections import deque

from .packet import SockType

__all__ = ["Conn", "ConnState"]


class ConnState(enum.Enum):
    CONNECTING = "connecting"    # host client asked CONNECT; REQUEST sent, awaiting RESPONSE
    ESTABLISHED = "established"
    CLOSED = "closed"


class Conn:
    """One host-side connection; `key` is (peer_cid, peer_port, guest_port)."""

    def __init__(self, sock: socket.socket, *, guest_port: int, host_port: int,
                 sock_type: int, buf_alloc: int, state: ConnState, peer_cid: int = 2):
        self.sock = sock
        self.guest_port = guest_port
        self.host_port = host_port
        self.peer_cid = peer_cid
        self.type = sock_type
        self.state = state
        # guest -> host
        self.buf_alloc = buf_alloc
        self.fwd_cnt = 0            # bytes written to the host socket
        self.rx_total = 0           # bytes received from the guest
        self.reported_fwd = 0       # fwd_cnt last told to the guest
        self.pending: deque[bytes] = deque()   # accepted, not yet written (records for SEQPACKET)
        self.pending_bytes = 0
        self.message = bytearray()  # SEQPACKET message being assembled
        self.guest_shut_send = False
        self.guest_shut_rcv = False
        self.host_shut_done = False
        # host -> guest
        self.peer_buf_alloc = 0
        self.peer_fwd_cnt = 0
        self.tx_cnt = 0             # bytes sent to the guest
        self.prefix = bytearray()   # bytes read from the host, not yet sent (CONNECT leftovers, records)
        self.prefix_is_record = False
        self.readable = False       # the host socket has data or EOF (selector said so)
        self.host_eof = False
        self.credit_requested = False
        self.interest = -1          # selector events last registered by the host thread

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.peer_cid, self.host_port, self.guest_port)

    @property
    def seqpacket(self) -> bool:
        return self.type == SockType.SEQPACKET

    def credit(self) -> int:
        """Bytes the guest can still take (5.10.6.3.1), never negative."""
        return max(0, self.peer_buf_alloc - (self.tx_cnt - self.peer_fwd_cnt) % (1 << 32))

    def update_peer(self, buf_alloc: int, fwd_cnt: int) -> None:
        self.peer_buf_alloc = buf_alloc
        self.peer_fwd_cnt = fwd_cnt
        if self.credit() > 0:
            self.credit_requested = False

    def accepts(self, length: int) -> bool:
        """Whether `length` more guest bytes stay within the credit we advertised."""
        in_flight = self.rx_total - self.reported_fwd
        return in_flight + length <= self.buf_alloc

    def needs_credit_update(self) -> bool:
        """True when the guest believes less than half our buffer is free and we freed some."""
        if self.fwd_cnt == self.reported_fwd:
            return False
        guest_view_free = self.buf_alloc - (self.rx_total - self.reported_fwd)
        return guest_view_free < self.buf_alloc // 2 or self.pending_bytes == 0 and self.guest_blocked()

    def guest_blocked(self) -> bool:
        return self.buf_alloc - (self.rx_total - self.reported_fwd) <= 0

    def wants_host_read(self) -> bool:
        """Read interest in the host socket: established, guest can take bytes, none queued."""
        return (self.state is ConnState.ESTABLISHED and not self.host_eof and not self.readable
                and not self.guest_shut_rcv and not self.prefix and self.credit() > 0)

    def describe(self) -> str:
        kind = "seqpacket" if self.seqpacket else "stream"
        return f"{kind} guest port {self.guest_port} <-> {self.peer_cid}:{self.host_port}"
