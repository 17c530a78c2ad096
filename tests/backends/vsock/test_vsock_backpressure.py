"""Nothing lost under load: many vsock streams toward a receiver that stops reading.

The real `vhost-user-vsock` process, two VMs driven by the built-in front-end
(each in its own thread, as two guests run side by side), 64 stream
connections and more, each checked with sha256. The receiver stops taking
packets for a while (as a guest paused with QMP `stop` does), so everything
the credit rules allow piles up in the back-end: far more than the relay
queue's limit. A sender that respects credit must never be refused (the
relay applies back-pressure); a sender that ignores credit is reset at both
ends, with no later byte of that connection delivered.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time

from vhost_user.backends.vsock.packet import Op
from vhost_user.backends.vsock.driver import MAX_PKT, VsockDriver
from vsock_proc import host_connect, read_line

STREAMS = 64
PER_STREAM = 512 << 10  # 64 x 512 KiB = 32 MiB; credit allows 64 x 256 KiB = 16 MiB in flight
PAUSE_S = 1.5


def _pattern(i: int, n: int) -> bytes:
    return hashlib.shake_256(b"stream %d" % i).digest(n)


def _counters(bp, cid: int) -> dict:
    """VM `cid`'s entry of the SIGUSR1 stats line (the line every back-end logs)."""
    return next(v for k, v in bp.log_stats().items() if f"vm{cid}.sock" in k)


def _two_vms(sockdir, vsock_proc):
    socks = {cid: os.path.join(sockdir, f"vm{cid}.sock") for cid in (3, 4)}
    bp = vsock_proc("--vm", f"guest-cid=3,socket={socks[3]},groups=g",
                    "--vm", f"guest-cid=4,socket={socks[4]},groups=g", wait_for=socks[4])
    return bp, socks


def _receiver(drv: VsockDriver, port: int, streams: int, accepted: threading.Event, out: dict) -> None:
    """Accept `streams` connections, stop reading for PAUSE_S, then read every stream to EOF."""
    try:
        socks = [drv.accept(port, timeout=30) for _ in range(streams)]
        accepted.set()
        time.sleep(PAUSE_S)  # paused: nothing reaped, no rx buffer given back
        got = {s.peer_port: bytearray() for s in socks}
        open_ = set(socks)
        deadline = time.monotonic() + 120
        while open_ and time.monotonic() < deadline:
            drv.poll(0.05)
            for s in list(open_):
                if s.rx:
                    data = bytes(s.rx)
                    del s.rx[:]
                    s._consumed(len(data))
                    got[s.peer_port] += data
                if s.reset or (s.peer_shut_send and not s.rx):
                    open_.discard(s)
        out["got"] = got
        out["reset"] = [s.peer_port for s in socks if s.reset and not s.peer_shut_send]
    except BaseException as exc:  # reported by the main thread
        out["error"] = exc
        accepted.set()


def _send_round_robin(drv: VsockDriver, socks, data: dict) -> None:
    """Send each socket's data as credit allows, interleaved, like many writers at once."""
    offset = {s: 0 for s in socks}
    deadline = time.monotonic() + 120
    while offset:
        assert time.monotonic() < deadline, "senders stalled"
        progressed = False
        for s in list(offset):
            assert not s.reset, f"stream to port {s.peer_port} was reset"
            payload = data[s.local_port]
            n = min(s.credit(), MAX_PKT, len(payload) - offset[s])
            if n:
                drv.send_packet(s.header(Op.RW, len=n), payload[offset[s]:offset[s] + n], timeout=30)
                s.tx_cnt += n
                offset[s] += n
                progressed = True
            if offset[s] == len(payload):
                del offset[s]
                s.shutdown(1 | 2)  # SHUTDOWN(RCV|SEND): done sending
        drv.poll(0 if progressed else 0.02)


def test_vsock_64_sibling_streams_to_a_paused_receiver_arrive_intact(sockdir, vsock_proc):
    bp, socks = _two_vms(sockdir, vsock_proc)
    with VsockDriver.attach(socks[3]) as a, VsockDriver.attach(socks[4]) as b:
        a.listen(7000)
        accepted, out = threading.Event(), {}
        t = threading.Thread(target=_receiver, args=(a, 7000, STREAMS, accepted, out), daemon=True)
        t.start()
        senders = [b.connect(7000, cid=3, timeout=30) for _ in range(STREAMS)]
        assert accepted.wait(30) and "error" not in out, out.get("error")
        data = {s.local_port: _pattern(s.local_port, PER_STREAM) for s in senders}
        _send_round_robin(b, senders, data)
        t.join(150)
        assert not t.is_alive(), "receiver did not finish"
        assert "error" not in out, out.get("error")
        assert out["reset"] == [], f"streams reset: {out['reset']}\n{bp.log()[-2000:]}"
        for port, payload in data.items():
            got = bytes(out["got"][port])
            assert len(got) == len(payload), f"stream {port}: {len(got)} of {len(payload)} bytes"
            assert hashlib.sha256(got).hexdigest() == hashlib.sha256(payload).hexdigest(), port
        sender, receiver = _counters(bp, 4), _counters(bp, 3)
        assert sender["relay_waits"] > 0, sender  # the senders were held back, not refused
        assert sender["credit_violations"] == receiver["credit_violations"] == 0
        assert sender["rst_sent"] == 0 and receiver["queued_bytes"] == 0
    log = bp.log()
    assert "relay queue full" not in log and "ignores credit" not in log and "breaks the credit" not in log


def test_vsock_sibling_ignoring_credit_is_reset_at_both_ends_without_a_hole(sockdir, vsock_proc):
    bp, socks = _two_vms(sockdir, vsock_proc)
    with VsockDriver.attach(socks[3]) as a, VsockDriver.attach(socks[4]) as b:
        a.listen(7001)
        accepted, got = threading.Event(), {}

        def accept():
            got["sock"] = a.accept(7001, timeout=30)
            accepted.set()
        t = threading.Thread(target=accept, daemon=True)
        t.start()
        s = b.connect(7001, cid=3, timeout=30)
        assert accepted.wait(30)
        t.join(10)
        r = got["sock"]
        window = s.peer_buf_alloc
        stream = _pattern(1, window + 4 * MAX_PKT)
        for off in range(0, len(stream), MAX_PKT):  # no credit check: straight past the window
            piece = stream[off:off + MAX_PKT]
            b.send_packet(s.header(Op.RW, len=len(piece)), piece)
            s.tx_cnt += len(piece)
        b.wait_for(lambda: s.reset, 10, "RST for the sender")
        # later packets of the reset connection must never reach the receiver
        b.send_packet(s.header(Op.RW, len=5), b"after")
        b.poll(0.2)
        a.wait_for(lambda: r.reset, 10, "RST for the receiver")
        a.poll(0.3)
        assert bytes(r.rx) == stream[:len(r.rx)], "the receiver got a hole or foreign bytes"
        assert len(r.rx) <= window
        rst_at = [i for i, h in enumerate(a.received) if h.op == Op.RST and h.src_port == s.local_port]
        rw_after = [h for h in list(a.received)[rst_at[0]:] if h.op == Op.RW and h.src_port == s.local_port]
        assert rw_after == [], "a packet of the reset connection was delivered after its RST"
        assert "breaks the credit" in bp.log()
        assert _counters(bp, 4)["credit_violations"] == 1
        # the VMs still talk: a new connection works
        a.listen(7002)
        done = {}
        t = threading.Thread(target=lambda: done.update(sock=a.accept(7002, timeout=30)), daemon=True)
        t.start()
        s2 = b.connect(7002, cid=3, timeout=30)
        t.join(30)
        s2.send(b"still fine")
        r2 = done["sock"]
        a.wait_for(lambda: len(r2.rx) >= 10, 10, "data on the new connection")
        assert bytes(r2.rx) == b"still fine"


def test_vsock_64_host_streams_to_a_paused_guest_arrive_intact(one_vm):
    """Host programs -> guest: the host sockets are read only within the guest's credit."""
    bp, sock, uds = one_vm
    with VsockDriver.attach(sock) as drv:
        drv.listen(6000)
        clients, guest_socks = [], []
        for i in range(STREAMS):
            c, _ = host_connect(uds, 6000)
            clients.append(c)
            guest_socks.append(drv.accept(6000, timeout=30))
            assert read_line(c).startswith(b"OK ")
        data = [_pattern(100 + i, PER_STREAM) for i in range(STREAMS)]
        writers = []
        for c, payload in zip(clients, data):
            def write(c=c, payload=payload):
                c.sendall(payload)
                c.shutdown(socket.SHUT_WR)
            writers.append(threading.Thread(target=write, daemon=True))
            writers[-1].start()
        time.sleep(PAUSE_S)  # the guest is paused: nothing read
        by_port = {}
        deadline = time.monotonic() + 120
        pending = set(guest_socks)
        got = {g: bytearray() for g in guest_socks}
        while pending and time.monotonic() < deadline:
            drv.poll(0.05)
            for g in list(pending):
                if g.rx:
                    chunk = bytes(g.rx)
                    del g.rx[:]
                    g._consumed(len(chunk))
                    got[g] += chunk
                if g.reset or (g.peer_shut_send and not g.rx):
                    pending.discard(g)
        for w in writers:
            w.join(10)
        for g, c, payload in zip(guest_socks, clients, data):
            by_port[g.peer_port] = got[g]
            assert not (g.reset and not g.peer_shut_send), f"host stream {g.peer_port} reset"
            assert hashlib.sha256(bytes(got[g])).hexdigest() == hashlib.sha256(payload).hexdigest()
            c.close()
