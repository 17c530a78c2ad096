"""The virtio-vsock device: one VM's rx/tx/event queues and its connections.

Theory of operation
-------------------
Three threads touch a VM's connections, under one device lock:

* the tx queue's worker (`_tx_handler`, called on every guest kick) first
  lets C (`fastpath.tx_burst`) write RW packets of established
  stream connections to their host sockets, straight from guest memory,
  in bursts; every other packet comes back to Python, which parses it and
  runs the connection state machine (dispatch table `_HOST_OPS`);
* the rx queue's worker (`_rx_handler`, rxpath.py) is the only code that
  fills guest rx buffers: queued control packets, then host socket data read
  straight into guest buffers within the guest's credit. Other threads wake
  it by signalling the queue's control eventfd (`_wake_rx`), which makes the
  worker run the handler once more; a guest kick (new rx buffers) wakes it
  as well, so a full rx ring never stalls a connection;
* the host thread (host.py) only reports socket readiness.

Packets for a sibling VM (same process, shared group) are copied into that
VM's control queue (`deliver`), after the router checked them against the
credit the receiver advertised (router.py). Back-pressure, not drops: while
the receiver's queue holds `RELAY_LIMIT` bytes or more, the sender's packet
waits in the sender's device (`_parked`) and its tx ring is not read; the
receiver's rx worker wakes the sender once its queue drained below half.
A sender that respects credit is therefore never refused, and the memory a
VM's relay queue holds is bounded: at most RELAY_LIMIT plus one packet
(64 KiB + header) queued, plus one parked packet per sibling VM sending to
it. A sender that ignores credit has that connection reset at both ends,
and no later packet of it is delivered.

Guest memory is touched only by the two queue workers, so the session can
pause and swap the memory table at any time. `--pcap` does not change the
paths: C appends the packets it moves to the capture ring (pcap.py), Python
the ones it handles; the SIGUSR1 counters `c_*`/`py_*` say which path
carried how many.
"""

from __future__ import annotations

import errno
import logging
import selectors
import socket
from collections import deque
from dataclasses import dataclass, field, replace

from vhost_user.device import VirtioDevice, queue_size_problem
from vhost_user.errors import DeviceError
from vhost_user.protocol import ProtocolFeature
from . import fastpath as fast

from . import guestio
from .connection import Conn, ConnState
from .host import HostSide
from .router import Verdict
from .rxpath import MAX_PACKET, RxPath
from . import sandbox as _sandbox  # noqa: F401 (registers the seccomp profile)
from .spec import SPEC
from .packet import (
    HEADER_SIZE, HOST_CID, Header, Op, SeqFlag, ShutdownFlag, SockType,
    VsockFeature, pack_config, pack_event,
)

__all__ = ["VsockDevice", "VmOptions", "CAPABILITIES", "MAX_PACKET", "DEFAULT_TX_BUFFER"]

log = logging.getLogger(__name__)

CAPABILITIES = SPEC.capabilities()  # static; the program may add run-time probes
RX, TX, EVENT = 0, 1, 2
#: queued bytes (relayed and control packets) above which senders toward a VM wait
RELAY_LIMIT = 8 << 20
DELIVERED, FULL, GONE = "delivered", "full", "gone"
_FIRST_HOST_PORT = 1 << 30
#: buf_alloc we advertise: Linux's own vsock buffer size. The guest may have this much
#: in flight to a host socket; a credit update goes out each half of it, so a window of
#: one 64 KiB packet (rust-vmm's default) would stall the guest on every update.
DEFAULT_TX_BUFFER = 256 << 10
#: bound on the send buffer we ask for per host socket (kernel memory a stalled host
#: program can make us hold, beside what waits in `pending`)
SNDBUF_MAX = 1 << 20


@dataclass
class VmOptions:
    guest_cid: int
    socket: str | None = None
    uds_path: str | None = None
    groups: frozenset = field(default_factory=lambda: frozenset({"default"}))
    tx_buffer_size: int = DEFAULT_TX_BUFFER
    queue_size: int = 32768


class VsockDevice(RxPath, VirtioDevice):
    device_type = SPEC.name
    virtio_id = SPEC.virtio_id
    num_queues = 3
    device_features = 1 << VsockFeature.SEQPACKET
    device_protocol_features = 1 << ProtocolFeature.CONFIG
    inflight = False  # rx buffers go back to the ring (vr_unpop): no inflight region

    def __init__(self, opts: VmOptions, router=None, capture=None):
        super().__init__()
        if not 3 <= opts.guest_cid < 0xFFFFFFFF:
            raise DeviceError(f"guest CID {opts.guest_cid} must be 3..4294967294")
        if not 1 <= opts.tx_buffer_size <= 1 << 30:
            raise DeviceError(f"--tx-buffer-size {opts.tx_buffer_size} must be 1..1G")
        if (problem := queue_size_problem(opts.queue_size)) is not None:
            raise DeviceError(problem)
        self.opts = opts
        self.guest_cid = opts.guest_cid
        self.groups = frozenset(opts.groups)
        self.max_queue_size = opts.queue_size
        self.router = router
        self.capture = capture
        # One lock for connections, the control queue and the rx ring (its writer_lock):
        # a C mutex, so the host loop takes it without the GIL.
        self._lock = fast.NativeLock()
        self._rx_waits = False               # the rx worker waits for a buffer (a kick)
        self._vqs: list = [None, None, None]
        self._conns: dict[tuple[int, int, int], Conn] = {}
        self._table = fast.ConnTable()       # the same connections, for C's tx path
        self._rx_chain = fast.RxChain()      # C's tx path writes credit updates to rx with it
        self._ctrl: deque = deque()          # (Header, payload, conn | None, capture?)
        self._ctrl_bytes = 0
        self._ready: dict[Conn, None] = {}   # connections with bytes for the guest (ordered set)
        self._next_port = _FIRST_HOST_PORT
        self._reset_pending = False
        self._had_traffic = False
        self._new_session = True
        self._event_ran = False              # a front-end ran our event queue (QEMU never does)
        self._wake_needed = False
        self._parked = None                  # (dest, Header, payload) waiting for room at dest
        self._waiters: dict = {}             # sibling devices parked on our full queue
        self.stats = {"rst_sent": 0, "dropped": 0, "credit_violations": 0, "relay_waits": 0,
                      "relay_unknown": 0, "rx_bad_buffers": 0, "host_records_too_large": 0,
                      # which path moved the packets: C (vsock.c) or the Python handlers
                      "c_tx_packets": 0, "c_tx_bytes": 0, "c_rx_packets": 0, "c_rx_bytes": 0,
                      "py_tx_packets": 0, "py_rx_packets": 0, "c_credit_updates": 0,
                      "py_credit_updates": 0, "host_thread_rx_packets": 0,
                      "c_credit_updates_in": 0}
        self._ring = capture.ring if capture is not None else None
        self.host = HostSide(self, opts.uds_path)
        self._rx_engine = fast.RxEngine(self.host.loop, self._rx_handler)
        self._tx_engine = fast.TxEngine(self.host.loop, self._table, self._rx_chain,
                                        self._tx_handler, self._tx_locked)
        self._c_seen = 0                     # packets C had moved at the last session start
        if router is not None:
            try:
                router.add(self)
            except ValueError as exc:
                self.host.close()
                raise DeviceError(str(exc)) from None
        log.info("vsock VM cid %d, uds %s, groups %s", self.guest_cid, opts.uds_path,
                 ",".join(sorted(self.groups)))

    # -- VirtioDevice hooks ---------------------------------------------------
    def get_config(self, offset: int, size: int) -> bytes:
        space = pack_config(self.guest_cid)
        if offset + size > len(space):
            raise DeviceError(f"config read {offset}+{size} beyond {len(space)} bytes")
        return space[offset:offset + size]

    def queue_handler(self, index: int):
        return {RX: self._rx_engine, TX: self._tx_engine, EVENT: self._event_handler}[index]

    def queue_stopped(self, index: int) -> None:
        with self._lock:
            self._vqs[index] = None
            if index == RX:
                self.host.loop.set_rx(None)
            elif index == TX:
                self._tx_engine.set_queue(None)

    def reset(self) -> None:
        """A front-end left: every connection is gone; the next one gets a transport reset.
        Sibling VMs' ends of our connections get an RST; senders waiting on us go on."""
        super().reset()
        with self._lock:
            for conn in list(self._conns.values()):
                self._close_conn(conn)
            self._ctrl.clear()
            self.host.loop.set_ctrl(False)
            self._ctrl_bytes = 0
            self._ready.clear()
            self._vqs = [None, None, None]
            self.host.loop.set_rx(None)
            self._tx_engine.set_queue(None)
            self._new_session = True
            self._parked = None
            waiters, self._waiters = list(self._waiters), {}
        for sender in waiters:
            sender._wake(TX)
        if self.router is not None:
            self._reset_sibling_ends()

    def _reset_sibling_ends(self) -> None:
        """Our connections with sibling VMs died with our state: RST their other ends."""
        for (cid, port), (peer_cid, peer_port), kind in self.router.forget_vm(self.guest_cid):
            peer = self.router.lookup(self, peer_cid)
            if peer is not None:
                peer.deliver(Header(src_cid=cid, dst_cid=peer_cid, src_port=port, dst_port=peer_port,
                                    type=kind, op=Op.RST), b"", force=True)

    def counters(self) -> dict:
        """The SIGUSR1 counters: drops, resets, back-pressure, queue fill."""
        with self._lock:
            out = dict(self.stats)
            tx = self._tx_engine.counters()
            out["c_tx_packets"] += tx["packets"]
            out["c_tx_bytes"] += tx["bytes"]
            out["c_credit_updates_in"] += tx["credit_in"]
            out["c_credit_updates"] += tx["rx_pushed"]
            loop = self.host.loop.counters()
            out["c_rx_packets"] += loop["packets"]
            out["c_rx_bytes"] += loop["bytes"]
            out["host_thread_rx_packets"] += loop["packets"]
            out["host_loop_wakeups"] = loop["wakeups"]
            out.update(connections=len(self._conns), queued_bytes=self._ctrl_bytes,
                       parked=int(self._parked is not None))
        if self.router is not None:
            out.update(self.router.stats, relay_flows=self.router.flow_count())
        return out

    def close(self) -> None:
        self.reset()
        if self.router is not None:
            self.router.remove(self)
        self.host.close()

    def capabilities(self) -> dict:
        return CAPABILITIES

    # -- waking the rx worker ---------------------------------------------------
    def _wake_rx(self) -> None:
        """Make the rx worker run its handler once more (new control packets or data)."""
        self._wake(RX)

    def _wake(self, index: int) -> None:
        vq = self._vqs[index]
        if vq is not None:
            if index == RX:
                self.host.loop.py_work()  # the worker's C handler calls ours first
            elif index == TX:
                self._tx_engine.py_work()
            vq.wake()

    def _flush_wake(self) -> None:
        if self._wake_needed:
            self._wake_needed = False
            self._wake_rx()

    def _queue_ctrl(self, hdr: Header, payload: bytes = b"", conn: Conn | None = None,
                    capture: bool = True) -> None:
        if not self._ctrl:
            self.host.loop.set_ctrl(True)
        self._ctrl.append((hdr, payload, conn, capture))
        self._ctrl_bytes += len(payload) + HEADER_SIZE
        self._wake_needed = True

    def _host_header(self, conn: Conn, op: Op, **fields) -> Header:
        return Header(src_cid=conn.peer_cid, dst_cid=self.guest_cid, src_port=conn.host_port,
                      dst_port=conn.guest_port, type=conn.type, op=op, **fields)

    def _send_rst(self, to: Header) -> None:
        """Answer the guest packet `to` with RST (never an RST to an RST)."""
        if to.op == Op.RST:
            return
        self.stats["rst_sent"] += 1
        self._queue_ctrl(to.reply(op=Op.RST, buf_alloc=0, fwd_cnt=0))

    # -- event queue -------------------------------------------------------------
    def _event_handler(self, vq) -> None:
        with self._lock:
            self._vqs[EVENT] = vq
            self._event_ran = True
            self._begin_session(vq)
            self._sync_loop()
            if not self._reset_pending:
                return
            chain = vq.pop()
            if chain is None:
                return
        used = chain.write(pack_event())
        vq.push(chain.head, used)
        with self._lock:
            self._reset_pending = False   # rx and tx may go on: the event is in the ring first
            self._sync_loop()
        log.info("cid %d: sent VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (front-end reconnected)", self.guest_cid)
        self._wake(RX)
        self._wake(TX)

    def _begin_session(self, vq) -> None:
        """The first queue run of a session (lock held): a guest that already talked to a
        back-end gets a transport reset, since its connections died with that state."""
        if not self._new_session:
            return
        self._new_session = False
        c_moved = self._tx_engine.counters()["packets"] + self.host.loop.counters()["packets"]
        if c_moved != self._c_seen:
            self._had_traffic = True
            self._c_seen = c_moved
        if self._had_traffic or vq.get_base() != 0:
            self._had_traffic = False
            self._reset_pending = True
            self._sync_loop()
            self._wake(EVENT)

    def _held_for_reset(self) -> bool:
        """Whether rx and tx must wait (lock held): a transport reset is due and the
        front-end runs our event queue. Nothing of the new session may reach the guest
        before the event, or the guest's reset would kill a connection of the new session.
        QEMU keeps the event queue for itself (hw/virtio/vhost-vsock-common.c hands the
        back-end only rx and tx), so under QEMU no event is sent and nothing waits."""
        return self._reset_pending and self._event_ran

    def _sync_loop(self) -> None:
        """Tell the host loop (lock held) whether the guest may get nothing now and whether
        the rx worker waits for a kick (so the loop re-arms it past the buffers it takes)."""
        self.host.loop.set_flags(hold=self._held_for_reset(), worker_waits=self._rx_waits)

    # -- tx queue: packets from the guest ---------------------------------------
    def _tx_handler(self, vq) -> None:
        """Python's part of the tx queue (the worker runs C first: TxEngine)."""
        with self._lock:
            if self._vqs[TX] is not vq:
                self._vqs[TX] = vq
                self._begin_session(vq)
            if self._held_for_reset():
                return  # the event handler wakes us once the reset event is out
            self._tx_engine.set_queue(vq)
        try:
            self._tx_run(vq)
        finally:
            # A relay parked on a full sibling holds the ring: our handler, not C's,
            # takes the next kick (and the sibling's wake).
            self._tx_engine.py_work(self._parked is not None)

    def _tx_run(self, vq) -> None:
        if self._parked is not None and not self._retry_parked():
            return  # the sibling is still full: its rx worker wakes us when it drained
        while (chain := self._tx_next(vq)) is not None:
            self.stats["py_tx_packets"] += 1
            try:
                self._guest_packet(chain)
            except Exception:
                log.exception("cid %d: tx packet handling failed", self.guest_cid)
            finally:
                vq.push(chain.head, 0)
            if self._parked is not None:
                break  # back-pressure: leave the rest of the ring to the guest
        with self._lock:
            self._flush_wake()

    def _tx_next(self, vq):
        """The next packet Python must handle; RW packets C can finish never come here."""
        while True:
            with self._lock:
                out = self._tx_engine.take_slow(vq)
                if out is None:
                    out = fast.tx_burst(vq, self._table, self.guest_cid, capture=self._ring,
                                        rx=self._rx_for_c(), rx_chain=self._rx_chain)
                result = self._tx_outcome(vq, out)
                if result is not _AGAIN:
                    return result

    def _tx_locked(self, vq, out: fast.TxOutcome) -> None:
        """What the C handler hands back with the lock held: a short write or a connection
        that needs attention (never a chain Python must take)."""
        with self._lock:
            self._report_rx_broken()  # C's credit updates may have found the rx ring broken
            self._tx_outcome(vq, out)

    def _report_rx_broken(self) -> None:
        """Report (once) a violation that C met on the rx ring from another thread."""
        rx = self._vqs[RX]
        if rx is not None:
            rx.report_broken()  # a no-op unless it is broken and not yet reported

    def _tx_outcome(self, vq, out: fast.TxOutcome):
        """One burst's result (lock held): None (ring empty), a chain for Python, or _AGAIN."""
        if out.rx_pushed:
            self.stats["c_credit_updates"] += out.rx_pushed
            self._report_rx_broken()
        if out.packets or out.credit_in:
            self._had_traffic = True
            self.stats["c_tx_packets"] += out.packets
            self.stats["c_tx_bytes"] += out.bytes
            self.stats["c_credit_updates_in"] += out.credit_in
        if out.status == fast.TX_EMPTY:
            return None
        if out.status == fast.TX_SLOW:
            return out.chain
        conn = self._conns.get(out.conn_key) if out.conn_key else None
        if out.status == fast.TX_PARTIAL:
            self.stats["py_tx_packets"] += 1
            try:
                self._partial_rw(conn, out.chain, out.sent)
            except Exception:
                log.exception("cid %d: tx packet handling failed", self.guest_cid)
            finally:
                vq.push(out.chain.head, 0)
        elif out.status == fast.TX_ATTENTION and conn is not None:
            conn.peer_credit_changed()
            self._flush(conn)
            self._after_guest_packet(conn)
        self._flush_wake()
        return _AGAIN

    def _rx_for_c(self):
        """The rx queue C's tx path may write credit updates to (lock held), or None:
        only while Python has no control packet queued (those go first, in order) and
        only a started rx queue that our lock guards (Virtqueue.writer_lock), so the rx
        worker, a pause and a stop all exclude the tx thread."""
        rx = self._vqs[RX]
        if (rx is None or self._ctrl or self._reset_pending or rx.writer_lock is not self._lock
                or not rx.started or rx.broken):
            return None
        return rx

    def _guest_packet(self, chain) -> None:
        self._had_traffic = True
        total = chain.read_len
        if total < HEADER_SIZE:
            log.warning("cid %d: tx chain of %d bytes has no full header; dropped", self.guest_cid, total)
            self.stats["dropped"] += 1
            return
        hdr = Header.unpack(guestio.read_prefix(chain, HEADER_SIZE))
        with self._lock:
            if hdr.len > total - HEADER_SIZE or hdr.len > MAX_PACKET:
                log.warning("cid %d: header claims %d payload bytes, chain holds %d (max %d); "
                            "dropped and reset", self.guest_cid, hdr.len, total - HEADER_SIZE, MAX_PACKET)
                self.stats["dropped"] += 1
                self._drop_conn_of(hdr)
                self._send_rst(hdr)
                return
            if self.capture is not None:
                self.capture.write(hdr, self._payload(chain, hdr))
            if hdr.src_cid != self.guest_cid:
                log.warning("cid %d: packet with source CID %d dropped (%s)", self.guest_cid,
                            hdr.src_cid, hdr.describe())
                self.stats["dropped"] += 1
                return
            if hdr.type not in (SockType.STREAM, SockType.SEQPACKET) or hdr.op == Op.INVALID:
                log.warning("cid %d: bad packet %s; reset", self.guest_cid, hdr.describe())
                self._send_rst(hdr)
                return
            if hdr.dst_cid == HOST_CID:
                self._host_packet(hdr, chain)
                return
        self._relay(hdr, chain)  # without our lock: delivery takes the other VM's lock

    @staticmethod
    def _payload(chain, hdr: Header) -> bytes:
        views = guestio.readable_views(chain, HEADER_SIZE, hdr.len)
        try:
            return b"".join(bytes(v) for v in views)
        finally:
            guestio.release(views)

    # -- sibling VMs -----------------------------------------------------------
    def _relay(self, hdr: Header, chain) -> None:
        """Hand a packet to a sibling VM. Called without our lock: two VMs relaying to
        each other at once would otherwise each hold one lock and wait for the other."""
        dest = self.router.lookup(self, hdr.dst_cid) if self.router is not None else None
        if dest is None:
            log.info("cid %d: no VM with CID %d in groups %s; %s reset", self.guest_cid,
                     hdr.dst_cid, ",".join(sorted(self.groups)), hdr.op_name)
            self._rst_locked(hdr)
            return
        verdict = self.router.track(hdr)
        if verdict is Verdict.IGNORE:
            return
        if verdict is Verdict.UNKNOWN:
            # After a peer's RST its partner may still send SHUTDOWN or credit updates: normal.
            log.log(logging.INFO if hdr.op == Op.RW else logging.DEBUG,
                    "cid %d: %s for no open sibling connection; reset", self.guest_cid, hdr.describe())
            self.stats["relay_unknown"] += 1
            self._rst_locked(hdr)
            return
        if verdict is Verdict.VIOLATION:
            log.warning("cid %d: %s breaks the credit (or socket type) cid %d gave; connection "
                        "reset at both ends", self.guest_cid, hdr.describe(), hdr.dst_cid)
            self.stats["credit_violations"] += 1
            dest.deliver(replace(hdr, op=Op.RST, len=0, flags=0, buf_alloc=0, fwd_cnt=0), b"", force=True)
            self._rst_locked(hdr)
            return
        payload = memoryview(self._payload(chain, hdr)) if hdr.len else b""
        self._hand_over(dest, hdr, payload)

    def _hand_over(self, dest: "VsockDevice", hdr: Header, payload) -> bool:
        """Queue at `dest`; park the packet if it is full. False while parked."""
        state = dest.deliver(hdr, payload, waiter=self)
        if state == FULL:
            if self._parked is None:
                self.stats["relay_waits"] += 1
                if self.stats["relay_waits"] == 1:
                    log.info("cid %d: VM %d has %d bytes queued; its senders wait (back-pressure, "
                             "counted in relay_waits)", self.guest_cid, hdr.dst_cid, RELAY_LIMIT)
            self._parked = (dest, hdr, payload)
            return False
        self._parked = None
        if state == GONE:
            log.info("cid %d: VM %d is not running; %s reset", self.guest_cid, hdr.dst_cid, hdr.op_name)
            self.router.forget(hdr)
            self._rst_locked(hdr)
        return True

    def _retry_parked(self) -> bool:
        """The parked packet again (the sibling drained); True once it left."""
        if not self._hand_over(*self._parked):
            return False
        with self._lock:
            self._flush_wake()
        return True

    def _rst_locked(self, hdr: Header) -> None:
        with self._lock:
            self._send_rst(hdr)

    def deliver(self, hdr: Header, payload, waiter: "VsockDevice | None" = None,
                force: bool = False) -> str:
        """A sibling VM's packet for this guest: DELIVERED, FULL (over RELAY_LIMIT; `waiter`
        is woken once we drained) or GONE (no driver). `force` queues regardless (RSTs)."""
        with self._lock:
            if self._vqs[RX] is None and not self.acked_features:
                return GONE
            if not force and self._ctrl_bytes >= RELAY_LIMIT:
                if waiter is not None:
                    self._waiters[waiter] = None
                return FULL
            self._queue_ctrl(hdr, payload, capture=False)
            self._flush_wake()
        return DELIVERED

    def _wake_senders(self) -> None:
        """Called with our lock by the rx worker: wake the parked senders once half drained."""
        if self._waiters and self._ctrl_bytes < RELAY_LIMIT // 2:
            waiters, self._waiters = list(self._waiters), {}
            for sender in waiters:
                sender._wake(TX)

    # -- host connections: guest side ----------------------------------------------
    def _drop_conn_of(self, hdr: Header) -> None:
        conn = self._conns.get((hdr.dst_cid, hdr.dst_port, hdr.src_port))
        if conn is not None:
            self._close_conn(conn)

    def _host_packet(self, hdr: Header, chain) -> None:
        conn = self._conns.get((hdr.dst_cid, hdr.dst_port, hdr.src_port))
        if conn is None:
            if hdr.op == Op.REQUEST:
                self._guest_connect(hdr)
            elif hdr.op != Op.RST:
                log.info("cid %d: %s for no connection; reset", self.guest_cid, hdr.describe())
                self._send_rst(hdr)
            return
        if hdr.type != conn.type:
            log.warning("cid %d: %s: socket type %d on a %s connection; reset", self.guest_cid,
                        hdr.op_name, hdr.type, conn.describe())
            self._reset_conn(conn)
            return
        conn.update_peer(hdr.buf_alloc, hdr.fwd_cnt)
        self._HOST_OPS.get(hdr.op, VsockDevice._op_unexpected)(self, conn, hdr, chain)
        self._after_guest_packet(conn)

    def _after_guest_packet(self, conn: Conn) -> None:
        """The guest's window may have opened: host bytes can flow again."""
        if conn.state is not ConnState.CLOSED:
            if conn.credit() > 0 and (conn.prefix or conn.readable):
                self._ready[conn] = None
                self._wake_needed = True
            self._refresh_interest(conn)

    def _partial_rw(self, conn: Conn | None, chain, sent: int) -> None:
        """An RW packet C began: the host socket took only `sent` bytes of it. The rest
        waits in `pending` (within the credit C checked) until the socket is writable."""
        hdr = Header.unpack(guestio.read_prefix(chain, HEADER_SIZE))
        payload = self._payload(chain, hdr)
        if self.capture is not None:
            self.capture.write(hdr, payload)
        if conn is None:  # cannot happen: C found it under the same lock
            log.error("cid %d: partial write on a vanished connection (%s)", self.guest_cid, hdr.describe())
            return
        conn.update_peer(hdr.buf_alloc, hdr.fwd_cnt)
        conn.rx_total += hdr.len
        conn.fwd_cnt += sent
        self._hold_back(conn, payload[sent:])
        self._flush(conn)
        self._after_guest_packet(conn)

    @staticmethod
    def _hold_back(conn: Conn, rest: bytes) -> None:
        """The part of a packet the full host socket did not take: it waits in order."""
        conn.short_writes += 1
        conn.pending.append(rest)
        conn.pending_bytes += len(rest)

    def _guest_connect(self, hdr: Header) -> None:
        """Guest REQUEST to CID 2: connect to `<uds-path>_<port>`."""
        if self.opts.uds_path is None:
            log.info("cid %d: connect to host port %d but no --uds-path; reset", self.guest_cid, hdr.dst_port)
            self._send_rst(hdr)
            return
        path = self.host.connect_path(hdr.dst_port)
        kind = socket.SOCK_SEQPACKET if hdr.type == SockType.SEQPACKET else socket.SOCK_STREAM
        sock = socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        try:
            sock.connect(path)
        except OSError as exc:
            sock.close()
            log.info("cid %d: guest port %d -> %s: %s; reset", self.guest_cid, hdr.src_port, path,
                     exc.strerror)
            self._send_rst(hdr)
            return
        conn = Conn(sock, guest_port=hdr.src_port, host_port=hdr.dst_port, sock_type=hdr.type,
                    buf_alloc=self.opts.tx_buffer_size, state=ConnState.ESTABLISHED)
        conn.update_peer(hdr.buf_alloc, hdr.fwd_cnt)
        self._add_conn(conn)
        self._queue_ctrl(self._host_header(conn, Op.RESPONSE), conn=conn)
        self.host.update(conn)
        log.info("cid %d: connected %s", self.guest_cid, conn.describe())

    def _op_response(self, conn: Conn, hdr: Header, chain) -> None:
        if conn.state is not ConnState.CONNECTING:
            log.warning("cid %d: unexpected RESPONSE on %s; reset", self.guest_cid, conn.describe())
            self._reset_conn(conn)
            return
        conn.state = ConnState.ESTABLISHED
        try:
            conn.sock.send(b"OK %d\n" % conn.host_port)
        except OSError:
            log.info("cid %d: host client of %s left before OK", self.guest_cid, conn.describe())
            self._reset_conn(conn)
            return
        log.info("cid %d: connected %s", self.guest_cid, conn.describe())

    def _op_rst(self, conn: Conn, hdr: Header, chain) -> None:
        if conn.state is ConnState.CONNECTING:
            log.info("cid %d: guest refused %s", self.guest_cid, conn.describe())
        self._close_conn(conn)

    def _op_shutdown(self, conn: Conn, hdr: Header, chain) -> None:
        if hdr.flags & ShutdownFlag.SEND:
            conn.guest_shut_send = True
        if hdr.flags & ShutdownFlag.RCV:
            conn.guest_shut_rcv = True
            self._ready.pop(conn, None)
        self._flush(conn)

    def _op_rw(self, conn: Conn, hdr: Header, chain) -> None:
        if conn.state is not ConnState.ESTABLISHED or conn.guest_shut_send:
            log.warning("cid %d: RW on %s in state %s; reset", self.guest_cid, conn.describe(), conn.state.value)
            self._reset_conn(conn)
            return
        if not conn.accepts(hdr.len):
            log.warning("cid %d: guest ignores credit on %s (%d bytes over a %d-byte window); reset",
                        self.guest_cid, conn.describe(), hdr.len, conn.buf_alloc)
            self.stats["credit_violations"] += 1
            self._reset_conn(conn)
            return
        conn.rx_total += hdr.len
        if conn.seqpacket:
            conn.message += self._payload(chain, hdr)
            if hdr.flags & SeqFlag.EOM:
                conn.pending.append(bytes(conn.message))
                conn.pending_bytes += len(conn.message)
                conn.message.clear()
        elif conn.pending or not hdr.len:
            if hdr.len:
                conn.pending.append(self._payload(chain, hdr))
                conn.pending_bytes += hdr.len
        else:
            views = guestio.readable_views(chain, HEADER_SIZE, hdr.len)
            try:
                sent = _send_views(conn.sock, views)
                if sent < hdr.len:
                    self._hold_back(conn, b"".join(bytes(v) for v in views)[sent:])
            except OSError as exc:
                log.info("cid %d: host side of %s failed (%s); reset", self.guest_cid,
                         conn.describe(), exc.strerror)
                self._reset_conn(conn)
                return
            finally:
                guestio.release(views)
            conn.fwd_cnt += sent
        self._flush(conn)

    def _op_credit_update(self, conn: Conn, hdr: Header, chain) -> None:
        pass  # update_peer already took the new window

    def _op_credit_request(self, conn: Conn, hdr: Header, chain) -> None:
        self._queue_ctrl(self._host_header(conn, Op.CREDIT_UPDATE), conn=conn)

    def _op_unexpected(self, conn: Conn, hdr: Header, chain) -> None:
        log.warning("cid %d: unexpected %s on %s; reset", self.guest_cid, hdr.describe(), conn.describe())
        self._reset_conn(conn)

    _HOST_OPS = {
        Op.RESPONSE: _op_response, Op.RST: _op_rst, Op.SHUTDOWN: _op_shutdown, Op.RW: _op_rw,
        Op.CREDIT_UPDATE: _op_credit_update, Op.CREDIT_REQUEST: _op_credit_request,
    }

    # -- host connections: host side ---------------------------------------------
    def _flush(self, conn: Conn) -> None:
        """Write what the guest sent and the host socket did not take yet; finish closes."""
        try:
            while conn.pending:
                if conn.seqpacket:
                    conn.sock.send(conn.pending[0])
                    sent = len(conn.pending.popleft())
                else:
                    sent = _send_views(conn.sock, list(conn.pending)[:64])
                    if sent == 0:
                        break  # the host socket is full: wait for it to be writable
                    _consume(conn.pending, sent)
                conn.pending_bytes -= sent
                conn.fwd_cnt += sent
        except BlockingIOError:
            pass
        except OSError as exc:
            log.info("cid %d: host side of %s failed (%s); reset", self.guest_cid, conn.describe(), exc.strerror)
            self._reset_conn(conn)
            return
        if conn.pending:
            # What the socket took is free again: say so now, or a guest that used all
            # its credit waits for a host reader that may wait for the guest.
            self._credit_update_if_due(conn)
            return
        if conn.guest_shut_send and conn.guest_shut_rcv:
            self._queue_ctrl(self._host_header(conn, Op.RST))
            self._close_conn(conn)
            return
        if conn.guest_shut_send and not conn.host_shut_done:
            conn.host_shut_done = True
            try:
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        self._credit_update_if_due(conn)

    def _credit_update_if_due(self, conn: Conn) -> None:
        if conn.needs_credit_update():
            self._queue_ctrl(self._host_header(conn, Op.CREDIT_UPDATE), conn=conn)
            conn.reported_fwd = conn.fwd_cnt  # stamped again when written

    def host_connect(self, sock: socket.socket, port: int, leftover: bytes) -> None:
        """A host client said `CONNECT <port>`; ask the guest (bytes after the line are kept)."""
        with self._lock:
            host_port = self._alloc_port(port)
            conn = Conn(sock, guest_port=port, host_port=host_port, sock_type=SockType.STREAM,
                        buf_alloc=self.opts.tx_buffer_size, state=ConnState.CONNECTING)
            conn.prefix += leftover
            self._add_conn(conn)
            self._queue_ctrl(self._host_header(conn, Op.REQUEST), conn=conn)
            self._flush_wake()
        self.host.update(conn)

    def _alloc_port(self, guest_port: int) -> int:
        while True:
            port = self._next_port
            self._next_port = port + 1 if port < 0xFFFFFFFE else _FIRST_HOST_PORT
            if (HOST_CID, port, guest_port) not in self._conns:
                return port

    def host_loop_ok(self, conn: Conn) -> bool:
        """Whether the host loop may read `conn` in C (lock held): a plain established
        stream, with none of Python's control packets queued ahead of its data (a
        RESPONSE must reach the guest before the stream's first bytes)."""
        return self._fast_rx_ok(conn) and not self._ctrl

    def host_loop_wait(self, loop, timeout_ms: int) -> bool:
        """The host thread sleeps in the C loop; connections it handed back go the way a
        readable socket goes (`host_readable`). True when the selector has events."""
        res = loop.run(timeout_ms)
        if res.rx_broken:
            with self._lock:
                self._report_rx_broken()
        for i in range(res.nback):
            b = res.back[i]
            with self._lock:
                conn = self._conns.get((b.peer_cid, b.host_port, b.guest_port))
                if conn is None or conn.rec.host_slot:
                    continue  # closed meanwhile, or a new connection with that key
            self.host_readable(conn)
            self.host.mark(conn)
        return bool(res.py)

    def host_interest(self, conn: Conn) -> int:
        """The selector events `conn`'s host socket needs now (asked by the host thread)."""
        with self._lock:
            return _interest(conn)

    def _refresh_interest(self, conn: Conn) -> None:
        """Ask the host thread to re-register `conn` only when its events change
        (a thread wake-up per guest packet would cost more than the packet)."""
        if _interest(conn) != conn.interest:
            self.host.update(conn)

    def host_readable(self, conn: Conn) -> None:
        with self._lock:
            if conn.state is ConnState.CLOSED:
                return
            conn.readable = True
            if conn.state is not ConnState.ESTABLISHED or conn.credit() == 0:
                self._flush_wake()
                return
            self._ready[conn] = None
        if self._fill_from_host_thread(conn):
            return
        with self._lock:
            self._wake_needed = True
            self._flush_wake()

    def _fill_from_host_thread(self, conn: Conn) -> bool:
        """Move `conn`'s host bytes into rx buffers here, in the host thread that saw
        them arrive, instead of waking the rx worker (two thread hops per socket drain:
        the wake-up, and the selector re-arm after it). True when the socket was
        drained; False leaves the rest to the rx worker (no buffer, no credit, EOF, an
        error, an odd buffer, or Python's own packets queued ahead)."""
        drained = False
        pushed = 0
        rx = None
        while True:
            with self._lock:
                rx = self._rx_for_c()
                if rx is None or conn not in self._ready or not self._fast_rx_ok(conn):
                    break
                out = fast.rx_fill(rx, conn.rec, self.guest_cid, capture=self._ring)
                if out.packets:
                    pushed += out.packets
                    self.stats["c_rx_packets"] += out.packets
                    self.stats["c_rx_bytes"] += out.bytes
                    self.stats["host_thread_rx_packets"] += out.packets
                if out.status == fast.RX_MORE:
                    continue
                if out.status == fast.RX_DRAINED:
                    self._ready.pop(conn, None)  # the host loop re-arms its read interest
                    drained = True
                break
        if pushed:
            with self._lock:
                if rx is not None and rx.started:
                    if rx.broken:
                        rx.report_broken()
                    else:
                        if self._ctrl or self._ready:
                            # The rx worker may be waiting for a buffer: its kick request
                            # must lie past the buffers taken here (Virtqueue.rearm_kick).
                            rx.rearm_kick()
                        rx.notify_force()
        return drained

    def host_writable(self, conn: Conn) -> None:
        with self._lock:
            if conn.state is not ConnState.CLOSED:
                self._flush(conn)
            self._flush_wake()

    def _reset_conn(self, conn: Conn) -> None:
        """Tell the guest RST and drop the connection."""
        self.stats["rst_sent"] += 1
        self._queue_ctrl(self._host_header(conn, Op.RST))
        self._close_conn(conn)

    def _add_conn(self, conn: Conn) -> None:
        self._conns[conn.key] = conn
        try:
            # Room in the host socket for the window the guest may send at once, so one
            # writev takes a burst instead of cutting it; at most SNDBUF_MAX (the kernel
            # doubles it and caps it at net.core.wmem_max).
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, min(conn.buf_alloc, SNDBUF_MAX))
        except OSError:
            pass
        if not self._table.add(conn.rec):
            log.info("cid %d: %s takes the Python data path (fast table full)", self.guest_cid,
                     conn.describe())

    def _close_conn(self, conn: Conn) -> None:
        if conn.state is ConnState.CLOSED:
            return
        self.host.forget(conn)  # before the socket closes and the record can go
        conn.state = ConnState.CLOSED
        self._conns.pop(conn.key, None)
        self._table.remove(conn.rec)
        conn.rec.fd = -1
        self._ready.pop(conn, None)
        conn.pending.clear()
        conn.sock.close()
        self.host.update(conn)
        rec = conn.rec
        log.info("cid %d: closed %s: guest->host %d bytes (%d by C, %d short writes), "
                 "host->guest %d bytes (%d by C)", self.guest_cid, conn.describe(), rec.fwd_cnt,
                 rec.c_bytes_out, conn.short_writes, rec.tx_cnt, rec.c_bytes_in)


_AGAIN = object()  # _tx_outcome: burst again


def _interest(conn: Conn) -> int:
    if conn.state is ConnState.CLOSED:
        return 0
    mask = selectors.EVENT_READ if conn.wants_host_read() else 0
    if conn.pending:
        mask |= selectors.EVENT_WRITE
    return mask


def _send_views(sock: socket.socket, views) -> int:
    try:
        return sock.sendmsg(views)
    except BlockingIOError:
        return 0
    except OSError as exc:
        if exc.errno == errno.EAGAIN:
            return 0
        raise


def _consume(pending: deque, n: int) -> None:
    while n and pending:
        first = pending[0]
        if len(first) <= n:
            n -= len(first)
            pending.popleft()
        else:
            pending[0] = first[n:]
            n = 0
