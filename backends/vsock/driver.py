"""A virtio-vsock driver model: what a guest's vmw_vsock_virtio_transport does, minus the CPU.

Theory of operation: the driver keeps the rx queue full of single-buffer
receive slots (header + 4 KiB, like Linux), the event queue full of 4-byte
event slots, and sends packets from a pool of tx slots. `poll()` reaps all
three queues and dispatches each received packet to a `DriverSocket` (or a
listener), the way the guest's transport does, including credit accounting
(buf_alloc, fwd_cnt, CREDIT_UPDATE / CREDIT_REQUEST). Everything runs in
the caller's thread: every blocking call polls until its condition holds
or its timeout passes. `send_packet` / `send_chain` let tests put any
(hostile) packet on the tx queue.
"""

from __future__ import annotations

import dataclasses
import select
import time
from collections import deque

from vhost_user.backends.vsock.packet import (
    HEADER_SIZE, HOST_CID, Header, Op, SeqFlag, ShutdownFlag, SockType, VsockFeature,
    unpack_config, unpack_event,
)
from .driver_load import VsockBenchResult, VsockConnState, run_vsock_stream_bench
from vhost_user.errors import VhostUserError
from vhost_user.frontend import QEMU, Frontend, Profile
from vhost_user.frontend.driver import Driver
from vhost_user.protocol import ProtocolFeature as PF, VirtioFeature

__all__ = ["VsockDriver", "DriverSocket", "DRIVER_FEATURES", "VsockReset"]

DRIVER_FEATURES = (
    (1 << VirtioFeature.VIRTIO_F_VERSION_1)
    | (1 << VirtioFeature.VIRTIO_RING_F_EVENT_IDX)
    | (1 << VsockFeature.SEQPACKET)
)
MAX_PKT = 64 << 10
RX_PAYLOAD = 4096


class VsockReset(VhostUserError, ConnectionResetError):
    """The peer answered RST (connection refused or reset)."""


class DriverSocket:
    """One guest-side vsock socket driven by `VsockDriver`."""

    def __init__(self, drv: "VsockDriver", local_port: int, peer_cid: int, peer_port: int,
                 sock_type: int, buf_alloc: int):
        self.drv = drv
        self.local_port, self.peer_cid, self.peer_port = local_port, peer_cid, peer_port
        self.type = sock_type
        self.state = "connecting"
        self.buf_alloc = buf_alloc
        self.rx = bytearray()
        self.messages: deque[bytes] = deque()
        self._partial = bytearray()
        self.rx_cnt = 0
        self.fwd_cnt = 0
        self.reported_fwd = 0
        self.peer_buf_alloc = 0
        self.peer_fwd_cnt = 0
        self.tx_cnt = 0
        self.peer_shut_send = False
        self.peer_shut_rcv = False
        self.reset = False
        self.credit_violations = 0

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.local_port, self.peer_cid, self.peer_port)

    def header(self, op: int, **fields) -> Header:
        return Header(src_cid=self.drv.cid, dst_cid=self.peer_cid, src_port=self.local_port,
                      dst_port=self.peer_port, type=self.type, op=op, buf_alloc=self.buf_alloc,
                      fwd_cnt=self.fwd_cnt & 0xFFFFFFFF, **fields)

    def credit(self) -> int:
        return max(0, self.peer_buf_alloc - (self.tx_cnt - self.peer_fwd_cnt) % (1 << 32))

    # -- sending -----------------------------------------------------------------
    def send(self, data: bytes, timeout: float = 10.0) -> None:
        """Send all of `data` as RW packets, waiting for credit as a guest does."""
        view = memoryview(data)
        deadline = time.monotonic() + timeout
        asked = False
        while view:
            self._check_open()
            credit = self.credit()
            if credit == 0:
                if not asked and time.monotonic() > deadline - timeout / 2:
                    self.drv.send_packet(self.header(Op.CREDIT_REQUEST))
                    asked = True
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no credit from {self.peer_cid}:{self.peer_port}")
                self.drv.poll(0.05)
                continue
            n = min(credit, MAX_PKT, len(view))
            self.drv.send_packet(self.header(Op.RW, len=n), view[:n])
            self.tx_cnt += n
            view = view[n:]
        self.drv.poll(0)

    def send_msg(self, data: bytes, timeout: float = 10.0) -> None:
        """SEQPACKET: one message, cut into packets as credit allows (like Linux),
        EOM and EOR on the last one; ValueError if it can never fit the peer's buffer."""
        if len(data) > self.peer_buf_alloc:
            raise ValueError(f"message of {len(data)} bytes exceeds the peer's buffer {self.peer_buf_alloc}")
        deadline = time.monotonic() + timeout
        view = memoryview(data)
        while True:
            self._check_open()
            n = min(MAX_PKT, len(view), self.credit())
            if n == 0 and view:
                if time.monotonic() > deadline:
                    raise TimeoutError("no credit for the rest of the message")
                self.drv.poll(0.05)
                continue
            last = n == len(view)
            flags = int(SeqFlag.EOM | SeqFlag.EOR) if last else 0
            self.drv.send_packet(self.header(Op.RW, len=n, flags=flags), view[:n])
            self.tx_cnt += n
            view = view[n:]
            if last:
                return

    def shutdown(self, flags: int) -> None:
        self.drv.send_packet(self.header(Op.SHUTDOWN, flags=flags))

    def close(self, timeout: float = 5.0) -> None:
        """SHUTDOWN(RCV|SEND) and wait for the peer's RST, as Linux does on close()."""
        if self.state == "closed":
            return
        self.shutdown(ShutdownFlag.RCV | ShutdownFlag.SEND)
        self.drv.wait_for(lambda: self.reset, timeout, "RST after close")
        self.drv.forget(self)

    # -- receiving ------------------------------------------------------------------
    def recv(self, max_bytes: int = 1 << 20, timeout: float = 10.0) -> bytes:
        """Up to max_bytes; b"" once the peer shut its sending side and all was read."""
        self.drv.wait_for(lambda: self.rx or self.peer_shut_send or self.reset, timeout, "data")
        if not self.rx and self.reset and not self.peer_shut_send:
            raise VsockReset(f"connection to {self.peer_cid}:{self.peer_port} reset")
        data = bytes(self.rx[:max_bytes])
        del self.rx[:len(data)]
        self._consumed(len(data))
        return data

    def recv_exact(self, n: int, timeout: float = 10.0) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.recv(n - len(out), timeout)
            if not chunk:
                raise EOFError(f"EOF after {len(out)} of {n} bytes")
            out += chunk
        return bytes(out)

    def recv_msg(self, timeout: float = 10.0) -> bytes:
        self.drv.wait_for(lambda: self.messages or self.reset, timeout, "message")
        if not self.messages:
            raise VsockReset("connection reset")
        msg = self.messages.popleft()
        self._consumed(len(msg))
        return msg

    def _consumed(self, n: int) -> None:
        self.fwd_cnt += n
        if n and self.fwd_cnt - self.reported_fwd >= self.buf_alloc // 4 and not self.reset:
            self.reported_fwd = self.fwd_cnt
            self.drv.send_packet(self.header(Op.CREDIT_UPDATE))

    def _check_open(self) -> None:
        if self.reset:
            raise VsockReset(f"connection to {self.peer_cid}:{self.peer_port} reset")
        if self.peer_shut_rcv:
            raise BrokenPipeError("peer does not receive any more")

    # -- called by the driver -----------------------------------------------------------
    def on_packet(self, hdr: Header, payload: bytes) -> None:
        self.peer_buf_alloc, self.peer_fwd_cnt = hdr.buf_alloc, hdr.fwd_cnt
        op = hdr.op
        if op == Op.RESPONSE and self.state == "connecting":
            self.state = "established"
        elif op == Op.RST:
            self.reset = True
            self.state = "closed"
        elif op == Op.SHUTDOWN:
            self.peer_shut_send |= bool(hdr.flags & ShutdownFlag.SEND)
            self.peer_shut_rcv |= bool(hdr.flags & ShutdownFlag.RCV)
            if self.peer_shut_send and self.peer_shut_rcv and not self.rx and not self.messages:
                self.drv.send_packet(self.header(Op.RST))  # the peer closed: finish it, as Linux does
                self.reset = True
                self.state = "closed"
        elif op == Op.RW:
            if self.rx_cnt + len(payload) - self.fwd_cnt > self.buf_alloc:
                self.credit_violations += 1
                return
            self.rx_cnt += len(payload)
            if self.type == SockType.SEQPACKET:
                self._partial += payload
                if hdr.flags & SeqFlag.EOM:
                    self.messages.append(bytes(self._partial))
                    self._partial.clear()
            else:
                self.rx += payload
        elif op == Op.CREDIT_REQUEST:
            self.reported_fwd = self.fwd_cnt
            self.drv.send_packet(self.header(Op.CREDIT_UPDATE))


class VsockDriver(Driver):
    """Drives one vhost-user-vsock back-end through the built-in front-end."""

    def __init__(self, frontend: Frontend, *, queue_size: int = 256, rx_buffers: int = 128,
                 rx_payload: int = RX_PAYLOAD, tx_slots: int = 64, buf_alloc: int = 256 << 10,
                 event_buffers: int = 8, rx_split: bool = False):
        self.fe = frontend
        self.cid = unpack_config(frontend.get_config(8)) if frontend.has_protocol_feature(PF.CONFIG) else 0
        frontend.set_mem_table()
        ram = frontend.ram
        self.rxq = frontend.setup_queue(0, queue_size)
        self.txq = frontend.setup_queue(1, queue_size)
        self.evq = frontend.setup_queue(2, max(event_buffers, 8))
        self.buf_alloc = buf_alloc
        self._rx_size = HEADER_SIZE + rx_payload
        # Linux before 6.3 posts the header and the payload as two descriptors
        self._rx_split = rx_split
        self._rx_slots: dict[int, int] = {}
        for _ in range(min(rx_buffers, queue_size)):
            self._post_rx(ram.alloc(self._rx_size, 64))
        self._ev_slots: dict[int, int] = {}
        for _ in range(event_buffers):
            gpa = ram.alloc(4, 4)
            self._ev_slots[self.evq.ring.add([(gpa, 4, True)])] = gpa
        self.rxq.ring.kick()
        self.evq.ring.kick()
        self._tx_free = [ram.alloc(HEADER_SIZE + MAX_PKT, 64) for _ in range(min(tx_slots, queue_size))]
        self._tx_busy: dict[int, int | None] = {}
        self.sockets: dict[tuple[int, int, int], DriverSocket] = {}
        self.listeners: dict[int, tuple[int, deque]] = {}
        self.events: list[int] = []
        self.received: deque[Header] = deque(maxlen=4096)   # every header, for assertions
        self.stray: deque[tuple[Header, bytes]] = deque(maxlen=4096)  # packets for no socket
        self._next_port = 50000

    @classmethod
    def attach(cls, path: str, *, ram_size: int = 64 << 20, features: int = DRIVER_FEATURES,
                profile: Profile = QEMU, **kwargs) -> "VsockDriver":
        fe = Frontend(path, ram_size=ram_size, profile=profile)
        try:
            fe.negotiate(features)
            return cls(fe, **kwargs)
        except BaseException:
            fe.close()
            raise

    # -- raw packets ----------------------------------------------------------------
    def _post_rx(self, gpa: int) -> None:
        if self._rx_split:
            segs = [(gpa, HEADER_SIZE, True), (gpa + HEADER_SIZE, self._rx_size - HEADER_SIZE, True)]
        else:
            segs = [(gpa, self._rx_size, True)]
        self._rx_slots[self.rxq.ring.add(segs)] = gpa

    def send_packet(self, hdr: Header, payload: bytes | memoryview = b"", *, timeout: float = 10.0) -> None:
        """Put one packet (header + payload in one buffer) on the tx queue and kick."""
        deadline = time.monotonic() + timeout
        while not self._tx_free:
            self._reap_tx()
            if not self._tx_free:
                if time.monotonic() > deadline:
                    raise TimeoutError("tx queue: no buffer came back")
                self.txq.ring.wait(0.05)
        gpa = self._tx_free.pop()
        ram = self.fe.ram
        ram.write(gpa, hdr.pack())
        if len(payload):
            ram.write(gpa + HEADER_SIZE, payload)
        head = self.txq.ring.add([(gpa, HEADER_SIZE + len(payload), False)])
        self._tx_busy[head] = gpa
        self.txq.ring.kick()

    def send_chain(self, segments: list[tuple[int, int, bool]]) -> int:
        """Post arbitrary (gpa, len, writable) segments on the tx queue (hostile tests)."""
        head = self.txq.ring.add(segments)
        self._tx_busy[head] = None
        self.txq.ring.kick()
        return head

    def _reap_tx(self) -> None:
        for head, _ in self.txq.ring.reap():
            gpa = self._tx_busy.pop(head, None)
            if gpa is not None:
                self._tx_free.append(gpa)

    def poll(self, timeout: float = 0.0) -> int:
        """Process what the device returned; wait up to `timeout` for something. Returns packets seen."""
        deadline = time.monotonic() + timeout
        while True:
            n = self._reap_rx() + self._reap_events()
            self._reap_tx()
            if n or time.monotonic() >= deadline:
                return n
            armed = [q.ring.wait(0) for q in (self.rxq, self.evq)]
            if any(armed):
                continue
            select.select([self.rxq.call_fd, self.evq.call_fd], [], [],
                          max(0.0, min(0.05, deadline - time.monotonic())))

    def _reap_rx(self) -> int:
        done = self.rxq.ring.reap()
        ram = self.fe.ram
        slots = [(self._rx_slots.pop(head), used) for head, used in done]
        packets = [ram.read(gpa, min(used, self._rx_size)) for gpa, used in slots if used >= HEADER_SIZE]
        for gpa, _ in slots:
            self._post_rx(gpa)
        for raw in packets:
            hdr = Header.unpack(raw)
            self._dispatch(hdr, raw[HEADER_SIZE:HEADER_SIZE + hdr.len])
        if done:
            self.rxq.ring.kick()
        return len(done)

    def _reap_events(self) -> int:
        done = self.evq.ring.reap()
        gpas = [self._ev_slots.pop(head) for head, _ in done]
        for gpa in gpas:
            self.events.append(unpack_event(self.fe.ram.read(gpa, 4)))
            self._ev_slots[self.evq.ring.add([(gpa, 4, True)])] = gpa
        if done:
            self.evq.ring.kick()
            # Transport reset: every connected socket is gone (Linux resets the connected
            # ones only; a connect in progress is answered by the new back-end).
            for sock in list(self.sockets.values()):
                if sock.state == "established":
                    sock.reset = True
        return len(done)

    def _dispatch(self, hdr: Header, payload: bytes) -> None:
        self.received.append(hdr)
        if hdr.dst_cid != self.cid:
            self.stray.append((hdr, payload))
            return
        sock = self.sockets.get((hdr.dst_port, hdr.src_cid, hdr.src_port))
        if sock is not None:
            sock.on_packet(hdr, payload)
            return
        if hdr.op == Op.REQUEST and hdr.dst_port in self.listeners:
            sock_type, backlog = self.listeners[hdr.dst_port]
            if hdr.type == sock_type:
                sock = DriverSocket(self, hdr.dst_port, hdr.src_cid, hdr.src_port, sock_type, self.buf_alloc)
                sock.peer_buf_alloc, sock.peer_fwd_cnt = hdr.buf_alloc, hdr.fwd_cnt
                sock.state = "established"
                self.sockets[sock.key] = sock
                self.send_packet(sock.header(Op.RESPONSE))
                backlog.append(sock)
                return
        self.stray.append((hdr, payload))
        if hdr.op != Op.RST:
            self.send_packet(hdr.reply(op=Op.RST))

    # -- socket layer ---------------------------------------------------------------------
    def wait_for(self, cond, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while not (result := cond()):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {what} within {timeout} s")
            self.poll(min(left, 0.1))
        return result

    def connect(self, port: int, cid: int = HOST_CID, *, sock_type: int = SockType.STREAM,
                timeout: float = 10.0, local_port: int | None = None) -> DriverSocket:
        """Open a connection like connect(2) on AF_VSOCK; VsockReset when refused."""
        if local_port is None:
            local_port = self._next_port
            self._next_port += 1
        sock = DriverSocket(self, local_port, cid, port, sock_type, self.buf_alloc)
        self.sockets[sock.key] = sock
        self.send_packet(sock.header(Op.REQUEST))
        self.wait_for(lambda: sock.state != "connecting", timeout, f"answer to connect {cid}:{port}")
        if sock.reset:
            self.forget(sock)
            raise VsockReset(f"connection to {cid}:{port} refused")
        return sock

    def listen(self, port: int, sock_type: int = SockType.STREAM) -> None:
        self.listeners[port] = (sock_type, deque())

    def accept(self, port: int, timeout: float = 10.0) -> DriverSocket:
        backlog = self.listeners[port][1]
        self.wait_for(lambda: backlog, timeout, f"connection on port {port}")
        return backlog.popleft()

    def forget(self, sock: DriverSocket) -> None:
        sock.state = "closed"
        self.sockets.pop(sock.key, None)

    # -- C stream load (vhost-user-bench vsock) ------------------------------------------
    def stream_bench(self, sock: DriverSocket, direction: str, *, payload: bytes = b"",
                     duration: float = 0.0, stall_timeout: float = 10.0) -> VsockBenchResult:
        """Move bytes on an established STREAM connection with the C loop (backends/vsock/driver_vsock.c,
        GIL released) instead of this model. "g2h": send `payload` (its length is the write
        size, <= 64 KiB) over and over for `duration` s, within the peer's credit. "h2g":
        consume what arrives (bytes already in `sock.rx` count too) until the peer shuts the
        connection down (or `duration` s if not 0). Afterwards the socket's counters, the rx
        buffers and the tx slots are back in this model, so `sock.close()` and new
        connections work as before. Packets for other connections during the run are
        dropped (counted in `other`). Raises TimeoutError when nothing moved for
        `stall_timeout` s.
        """
        if direction not in ("g2h", "h2g"):
            raise ValueError(f"direction must be 'g2h' or 'h2g', got {direction!r}")
        if sock.type != SockType.STREAM or sock.state != "established" or sock.reset:
            raise ValueError(f"stream_bench needs an established stream socket, not {sock.state}")
        if direction == "g2h" and not 0 < len(payload) <= MAX_PKT:
            raise ValueError(f"payload of {len(payload)} bytes: must be 1..{MAX_PKT}")
        deadline = time.monotonic() + stall_timeout
        while True:  # the C loop starts with every tx slot free
            self._reap_tx()
            if not self._tx_busy:
                break
            if time.monotonic() > deadline:
                raise TimeoutError("tx queue: buffers did not come back before the stream load")
            self.txq.ring.wait(0.05)
        pre = 0
        if direction == "h2g" and sock.rx:
            pre = len(sock.rx)
            sock.rx.clear()
            sock.fwd_cnt += pre
        ram = self.fe.ram
        if direction == "g2h":
            for gpa in self._tx_free:
                ram.write(gpa + HEADER_SIZE, payload)
        conn = VsockConnState(self.cid, sock.peer_cid, sock.local_port, sock.peer_port, sock.buf_alloc,
                              sock.peer_buf_alloc, sock.peer_fwd_cnt & 0xFFFFFFFF, sock.tx_cnt,
                              sock.rx_cnt, sock.fwd_cnt, sock.reported_fwd)
        tx_slots = list(self._tx_free)
        run = run_vsock_stream_bench(
            self.txq.ring, self.rxq.ring, conn, direction=direction, tx_slots=tx_slots,
            tx_slot_size=HEADER_SIZE + MAX_PKT, rx_posted=list(self._rx_slots.items()),
            rx_buf_len=self._rx_size, rx_split=self._rx_split, write_size=len(payload),
            duration_s=duration, stall_timeout_s=stall_timeout)
        # Take everything back before looking at how the run ended.
        self._rx_slots = {head: gpa for head, gpa in run.rx_posted if head >= 0}
        for head, gpa in run.rx_posted:
            if head < 0:
                self._post_rx(gpa)
        self.rxq.ring.kick()
        busy = dict(run.tx_busy)
        self._tx_free = [gpa for gpa in tx_slots if gpa not in busy.values()]
        self._tx_busy.update(busy)
        for name in ("peer_buf_alloc", "peer_fwd_cnt", "tx_cnt", "rx_cnt", "fwd_cnt", "reported_fwd"):
            setattr(sock, name, getattr(conn, name))
        r = run.result
        sock.credit_violations += r.peer_credit_violations
        if r.end_op:  # the SHUTDOWN / RST that ended the run, as the model would have seen it
            sock.on_packet(Header(src_cid=sock.peer_cid, dst_cid=self.cid, src_port=sock.peer_port,
                                  dst_port=sock.local_port, op=r.end_op, flags=r.end_flags,
                                  buf_alloc=conn.peer_buf_alloc, fwd_cnt=conn.peer_fwd_cnt), b"")
        if run.error is not None:
            raise run.error
        if r.timed_out:
            raise TimeoutError(f"vsock stream load: nothing moved for {stall_timeout} s")
        if pre:
            r = dataclasses.replace(r, rx_bytes=r.rx_bytes + pre)
        return r
