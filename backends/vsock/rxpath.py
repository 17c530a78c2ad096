"""The rx side of the vsock device: the only code that fills guest rx buffers.

Theory of operation
-------------------
The rx queue's worker calls `_rx_handler` on every guest rx kick and
whenever another thread wakes it. It sends, in order: queued control
packets (RESPONSE, RST, SHUTDOWN, credit messages, sibling VMs' packets,
cut to the size of each rx buffer), then data from host sockets that are
readable, read straight into guest buffers, never more than the guest's
credit: by C (`fastpath.rx_fill`, one readv across up to 16
buffers, headers written in place) for established stream connections,
by one `recvmsg_into` per buffer otherwise (SEQPACKET records, CONNECT
leftovers, no credit). Under `--pcap` C appends what it fills to the
capture ring itself. When the ring has no buffer left the handler asks
for a kick and returns; the guest's next rx kick brings it back. With
nothing to send it returns HANDLER_IDLE and kicks stay off: the host
thread fills most buffers itself, and every producer of work (a control
packet, a readable socket the host thread cannot finish) wakes the worker.
A chain popped but not needed goes back to the ring (`vq.unpop()`).

A mixin of `VsockDevice`: it uses the device's lock, connection table and
control queue.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import replace

from vhost_user.virtqueue import HANDLER_IDLE

from . import fastpath as fast

from . import guestio
from .connection import Conn, ConnState
from .packet import HEADER_SIZE, Op, SeqFlag, ShutdownFlag, pack_header_into

__all__ = ["RxPath", "MAX_PACKET"]

log = logging.getLogger("vhost_user.backends.vsock.device")

#: largest payload in one packet (Linux: VIRTIO_VSOCK_MAX_PKT_BUF_SIZE)
MAX_PACKET = 64 << 10
RX = 0


class RxPath:
    """rx-queue methods of VsockDevice."""

    def _rx_handler(self, vq) -> None:
        with self._lock:
            if self._vqs[RX] is not vq:
                self._vqs[RX] = vq
                vq.writer_lock = self._lock  # C's tx path pushes credit updates here
                self.host.loop.set_rx(vq, self._ring)  # and the host loop fills it
                self._begin_session(vq)
            if self._held_for_reset():
                return HANDLER_IDLE  # the event handler wakes us once the reset event is out
        rearmed = False
        while True:
            with self._lock:
                if not self._ctrl and not self._ready:
                    # Nothing to send: kicks stay off, so the buffers the guest posts while
                    # the host thread fills them cost no wake-up here. Whatever queues work
                    # for us (a control packet, a readable socket) wakes us itself.
                    self._set_rx_waits(False)
                    return HANDLER_IDLE
            if self._rx_control(vq) and self._rx_data(vq):
                rearmed = False
                continue
            # Out of rx buffers: ask for the guest's next kick, then look once more, for a
            # buffer posted before the request was visible (it would bring no kick). The
            # host loop re-arms it too, past the buffers it takes meanwhile.
            if rearmed:
                return None  # the guest's next rx kick brings us back
            with self._lock:
                self._set_rx_waits(True)
            vq.rearm_kick()
            rearmed = True

    def _set_rx_waits(self, waits: bool) -> None:
        if self._rx_waits != waits:
            self._rx_waits = waits
            self._sync_loop()

    def _rx_control(self, vq) -> bool:
        while True:
            with self._lock:
                if not self._ctrl:
                    return True
                chain = vq.pop()
                if chain is None:
                    return False
                hdr, payload, conn, capture = self._ctrl[0]
                space = chain.write_len - HEADER_SIZE
                if space < 0 or (space == 0 and payload):
                    # No room for the header (and a first byte): the buffer goes back
                    # empty, the packet waits for the next one (nothing is lost).
                    self.stats["rx_bad_buffers"] += 1
                    if self.stats["rx_bad_buffers"] == 1:
                        log.warning("cid %d: rx buffer of %d bytes cannot hold a packet; returned "
                                    "empty (counted in rx_bad_buffers)", self.guest_cid, chain.write_len)
                    vq.push(chain.head, 0)
                    continue
                if hdr.op == Op.RW and 0 < space < len(payload):
                    # A relayed packet larger than this rx buffer goes in pieces; message
                    # flags (EOM/EOR) stay with the last piece.
                    rest = payload[space:]
                    self._ctrl[0] = (replace(hdr, len=len(rest)), rest, conn, capture)
                    hdr, payload = replace(hdr, len=space, flags=0), payload[:space]
                    self._ctrl_bytes -= space
                else:
                    self._ctrl.popleft()
                    self._ctrl_bytes -= len(payload) + HEADER_SIZE
                    if not self._ctrl:
                        self.host.loop.set_ctrl(False)
                self._wake_senders()
                if conn is not None:
                    if conn.state is ConnState.CLOSED:
                        vq.unpop()
                        continue  # a credit message for a connection that is gone
                    hdr = replace(hdr, buf_alloc=conn.buf_alloc, fwd_cnt=conn.fwd_cnt & 0xFFFFFFFF)
                    conn.reported_fwd = conn.fwd_cnt
                if capture and self.capture is not None:
                    self.capture.write(hdr, payload)
                # under the lock: C's tx path pushes credit updates to this queue too
                chain.write(hdr.pack())
                if payload:
                    chain.write(payload, HEADER_SIZE)
                vq.push(chain.head, HEADER_SIZE + len(payload))
                self.stats["py_rx_packets"] += 1
                if hdr.op == Op.CREDIT_UPDATE:
                    self.stats["py_credit_updates"] += 1

    def _rx_data(self, vq) -> bool:
        with self._lock:
            ready = list(self._ready)
        for conn in ready:
            while True:
                with self._lock:
                    if conn not in self._ready:
                        break
                    if self._fast_rx_ok(conn):
                        out = fast.rx_fill(vq, conn.rec, self.guest_cid, capture=self._ring)
                        if out.packets:
                            self.stats["c_rx_packets"] += out.packets
                            self.stats["c_rx_bytes"] += out.bytes
                        if out.status == fast.RX_NO_BUFFER:
                            return False
                        if out.status == fast.RX_MORE:
                            continue
                        if out.status == fast.RX_DRAINED:
                            self._ready.pop(conn, None)
                            self.host.update(conn)
                            break
                        # no credit, EOF, an error or an odd buffer: one packet the slow way
                    chain = vq.pop()
                    if chain is None:
                        return False
                    used = self._fill(conn, chain)
                    if used is None:
                        vq.unpop()
                        self._ready.pop(conn, None)
                        self.host.update(conn)
                        break
                    vq.push(chain.head, used)
                    self.stats["py_rx_packets"] += 1
        return True

    def _fast_rx_ok(self, conn: Conn) -> bool:
        """Whether C may move this connection's host bytes: a plain established stream."""
        return (not conn.seqpacket and not conn.prefix
                and conn.state is ConnState.ESTABLISHED and not conn.guest_shut_rcv)

    def _fill(self, conn: Conn, chain) -> int | None:
        """Move host bytes into one rx buffer; returns the used length, None if nothing to send."""
        if conn.state is not ConnState.ESTABLISHED or conn.guest_shut_rcv:
            return None
        credit = conn.credit()
        if credit == 0:
            if not conn.credit_requested:
                conn.credit_requested = True
                self._queue_ctrl(self._host_header(conn, Op.CREDIT_REQUEST), conn=conn)
            return None
        space = chain.write_len - HEADER_SIZE
        if space <= 0:
            log.warning("cid %d: rx buffer of %d bytes cannot hold a header", self.guest_cid, chain.write_len)
            return 0
        limit = min(space, credit, MAX_PACKET)
        flags = 0
        if not conn.prefix and conn.seqpacket:
            got = self._read_record(conn)
            if not got:
                return self._host_gone(conn, chain, reset=got is None)
            if not conn.prefix:
                return None  # no whole record yet
        if conn.prefix:
            data = bytes(conn.prefix[:limit])
            del conn.prefix[:limit]
            if conn.prefix_is_record and not conn.prefix:
                flags = SeqFlag.EOM | SeqFlag.EOR
                conn.prefix_is_record = False
            chain.write(data, HEADER_SIZE)
            n = len(data)
        else:
            return self._fill_stream(conn, chain, limit)
        return self._finish_rw(conn, chain, n, flags, data)

    def _fill_stream(self, conn: Conn, chain, limit: int) -> int | None:
        """Stream data: one recvmsg_into straight into the guest buffer after the header
        slot, then the header written in place (no copy, no header object)."""
        views = guestio.writable_views(chain, 0, HEADER_SIZE + limit)
        head = views[0] if len(views[0]) >= HEADER_SIZE else None
        if head is not None:
            payload = [head[HEADER_SIZE:]] + views[1:]
            views.append(payload[0])
        else:  # a header split over descriptors: the slow path writes it
            payload = guestio.writable_views(chain, HEADER_SIZE, limit)
            views += payload
        try:
            try:
                n = conn.sock.recvmsg_into(payload)[0]
            except (BlockingIOError, InterruptedError):
                conn.readable = False
                return None
            except OSError as exc:
                log.info("cid %d: host side of %s failed (%s); reset", self.guest_cid, conn.describe(),
                         exc.strerror)
                n = -1
            if n <= 0:
                return self._host_gone(conn, chain, reset=n < 0)
            if head is not None and self.capture is None:
                pack_header_into(head, conn.peer_cid, self.guest_cid, conn.host_port, conn.guest_port, n,
                                 conn.type, Op.RW, 0, conn.buf_alloc, conn.fwd_cnt)
                conn.reported_fwd = conn.fwd_cnt
                conn.tx_cnt += n
                return HEADER_SIZE + n
        finally:
            guestio.release(views)
        return self._finish_rw(conn, chain, n, 0, None)

    def _finish_rw(self, conn: Conn, chain, n: int, flags: int, data) -> int:
        hdr = self._host_header(conn, Op.RW, len=n, flags=int(flags), buf_alloc=conn.buf_alloc,
                                fwd_cnt=conn.fwd_cnt & 0xFFFFFFFF)
        conn.reported_fwd = conn.fwd_cnt
        conn.tx_cnt += n
        chain.write(hdr.pack())
        if self.capture is not None:
            self.capture.write(hdr, data if data is not None else _read_back(chain, n))
        return HEADER_SIZE + n

    def _read_record(self, conn: Conn) -> bool:
        """SEQPACKET: read one host record into the prefix; False on EOF/error, None when
        the record is larger than the guest's buffer (the connection must be reset)."""
        try:
            data, _, msg_flags, _ = conn.sock.recvmsg(conn.peer_buf_alloc or MAX_PACKET, 0, socket.MSG_TRUNC)
        except (BlockingIOError, InterruptedError):
            conn.readable = False
            return True
        except OSError:
            return False
        if not data:
            return False
        if msg_flags & socket.MSG_TRUNC:
            # A cut record would be a corrupt message: end the connection instead.
            log.warning("cid %d: host record on %s larger than the guest's buffer (%d bytes); reset",
                        self.guest_cid, conn.describe(), conn.peer_buf_alloc or MAX_PACKET)
            self.stats["host_records_too_large"] += 1
            return None
        conn.prefix += data
        conn.prefix_is_record = True
        return True

    def _host_gone(self, conn: Conn, chain, reset: bool = False) -> int:
        """EOF (or an error) on the host socket: SHUTDOWN(SEND) or RST into this rx buffer."""
        conn.host_eof = True
        conn.readable = False
        self._ready.pop(conn, None)
        if reset:
            hdr = self._host_header(conn, Op.RST)
            self._close_conn(conn)
        else:
            hdr = self._host_header(conn, Op.SHUTDOWN, flags=int(ShutdownFlag.SEND),
                                    buf_alloc=conn.buf_alloc, fwd_cnt=conn.fwd_cnt & 0xFFFFFFFF)
        chain.write(hdr.pack())
        if self.capture is not None:
            self.capture.write(hdr)
        return HEADER_SIZE


def _read_back(chain, n: int) -> bytes:
    views = guestio.writable_views(chain, HEADER_SIZE, n)
    try:
        return b"".join(bytes(v) for v in views)
    finally:
        guestio.release(views)
