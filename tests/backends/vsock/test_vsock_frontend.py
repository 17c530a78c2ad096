"""vhost-user-vsock end to end: the real back-end process driven by the built-in front-end's
virtio-vsock driver model, with real host programs on Unix sockets."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from vsock_proc import host_connect, host_listener, read_line, recv_all, sha
from vhost_user.backends.vsock.packet import HEADER_SIZE, Header, Op, SockType, VsockFeature, unpack_event
from vhost_user.backends.vsock.driver import DRIVER_FEATURES, VsockDriver, VsockReset
from vhost_user.frontend import Frontend

MiB = 1 << 20


def test_vsock_config_space_gives_guest_cid_and_seqpacket(one_vm):
    _, sock, _ = one_vm
    with VsockDriver.attach(sock) as drv:
        assert drv.cid == 3
        assert drv.fe.has_feature(VsockFeature.SEQPACKET)


def test_vsock_guest_to_host_connection_carries_data_both_ways(one_vm):
    _, sock, uds = one_vm
    listener = host_listener(uds + "_5000")
    up, down = os.urandom(3 * MiB + 17), os.urandom(2 * MiB + 5)
    with VsockDriver.attach(sock) as drv:
        g = drv.connect(5000)
        h, _ = listener.accept()
        h.settimeout(10)
        got_up: list[bytes] = []
        reader = threading.Thread(target=lambda: got_up.append(recv_all(h, len(up))))
        reader.start()
        g.send(up)
        reader.join(20)
        assert sha(got_up[0]) == sha(up)
        writer = threading.Thread(target=h.sendall, args=(down,))
        writer.start()
        assert sha(g.recv_exact(len(down))) == sha(down)
        writer.join(20)
        g.close()
        assert h.recv(1) == b""  # the guest's close reached the host program


def test_vsock_host_connect_gets_ok_and_keeps_bytes_sent_with_the_connect_line(one_vm):
    _, sock, uds = one_vm
    with VsockDriver.attach(sock) as drv:
        drv.listen(1234)
        h, _ = host_connect(uds, 1234, extra=b"sent-in-the-same-write")
        g = drv.accept(1234)
        line = read_line(h)
        assert line.startswith(b"OK ") and int(line[3:]) == g.peer_port
        assert g.recv_exact(len(b"sent-in-the-same-write")) == b"sent-in-the-same-write"
        g.send(b"reply")
        assert h.recv(100) == b"reply"


def test_vsock_host_connect_to_port_without_guest_listener_is_closed(one_vm):
    _, sock, uds = one_vm
    with VsockDriver.attach(sock) as drv:
        h, _ = host_connect(uds, 999)
        drv.wait_for(lambda: any(hdr.op == Op.RST for hdr, _ in drv.stray)
                     or any(p.op == Op.REQUEST for p in drv.received), 10, "REQUEST")
        drv.poll(0.2)
        assert any(p.op == Op.REQUEST and p.dst_port == 999 for p in drv.received)
        assert h.recv(100) == b""  # refused: no OK line, just EOF


def test_vsock_guest_connect_without_host_listener_gets_rst(one_vm):
    _, sock, _ = one_vm
    with VsockDriver.attach(sock) as drv:
        with pytest.raises(VsockReset):
            drv.connect(4444)
        assert any(p.op == Op.RST and p.src_port == 4444 for p in drv.received)


def test_vsock_half_close_both_directions(one_vm):
    _, sock, uds = one_vm
    listener = host_listener(uds + "_5001")
    with VsockDriver.attach(sock) as drv:
        g = drv.connect(5001)
        h, _ = listener.accept()
        g.send(b"last words")
        g.shutdown(2)  # SHUTDOWN(SEND): the guest is done sending, still receives
        assert recv_all(h, 100) == b"last words"  # then EOF
        h.sendall(b"still flowing")
        assert g.recv_exact(13) == b"still flowing"
        h.shutdown(socket.SHUT_WR)
        assert g.recv() == b""  # the host's EOF arrives as SHUTDOWN(SEND)
        assert g.peer_shut_send and not g.reset


def test_vsock_credit_guest_to_host_throttles_and_recovers(sockdir, vsock_proc):
    sock, uds = os.path.join(sockdir, "vm.sock"), os.path.join(sockdir, "vm.vsock")
    vsock_proc("--guest-cid", "3", "--socket", sock, "--uds-path", uds, "--tx-buffer-size", "32K",
               wait_for=sock)
    listener = host_listener(uds + "_6000")
    data = os.urandom(8 * MiB)
    with VsockDriver.attach(sock) as drv:
        g = drv.connect(6000)
        assert g.peer_buf_alloc == 32 << 10
        h, _ = listener.accept()
        with pytest.raises(TimeoutError):
            g.send(data, timeout=1.0)  # nobody reads on the host: credit runs out
        stalled_at = g.tx_cnt
        assert 0 < stalled_at < len(data)
        assert g.tx_cnt - g.peer_fwd_cnt <= g.peer_buf_alloc
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append(recv_all(h, len(data))))
        reader.start()
        g.send(data[stalled_at:], timeout=30)
        reader.join(30)
        assert sha(got[0]) == sha(data)


def test_vsock_credit_host_to_guest_respects_guest_buffer_and_recovers(one_vm):
    _, sock, uds = one_vm
    data = os.urandom(4 * MiB)
    with VsockDriver.attach(sock, buf_alloc=64 << 10) as drv:
        drv.listen(7000)
        h, _ = host_connect(uds, 7000)
        g = drv.accept(7000)
        assert read_line(h).startswith(b"OK")
        writer = threading.Thread(target=h.sendall, args=(data,))
        writer.start()
        end = time.monotonic() + 1.0
        while time.monotonic() < end:  # the guest application does not read
            drv.poll(0.05)
        assert len(g.rx) == 64 << 10  # exactly the window, no more
        assert g.credit_violations == 0
        assert writer.is_alive()  # the host writer is throttled
        assert sha(g.recv_exact(len(data), timeout=30)) == sha(data)
        writer.join(10)


def test_vsock_seqpacket_keeps_message_boundaries(one_vm):
    _, sock, uds = one_vm
    listener = host_listener(uds + "_8000", socket.SOCK_SEQPACKET)
    sizes = [1, 100, 4096, 4097, 20000, 60000, 7]
    msgs = [os.urandom(n) for n in sizes]
    with VsockDriver.attach(sock) as drv:
        g = drv.connect(8000, sock_type=SockType.SEQPACKET)
        h, _ = listener.accept()
        h.settimeout(10)
        for m in msgs:
            g.send_msg(m)
            assert h.recv(1 << 17) == m
        for m in msgs:
            h.send(m)
        assert [g.recv_msg() for _ in msgs] == msgs


def test_vsock_several_connections_at_once_stay_separate(one_vm):
    _, sock, uds = one_vm
    listener = host_listener(uds + "_9000")
    with VsockDriver.attach(sock) as drv:
        pairs = []
        for i in range(6):
            g = drv.connect(9000)
            h, _ = listener.accept()
            h.settimeout(10)
            pairs.append((g, h, os.urandom(100_000 + i)))
        for g, h, payload in pairs:
            g.send(payload[:50_000])
        for g, h, payload in pairs:
            g.send(payload[50_000:])
            assert recv_all(h, len(payload)) == payload
        for g, h, payload in reversed(pairs):
            h.sendall(payload[::-1])
        for g, h, payload in pairs:
            assert g.recv_exact(len(payload)) == payload[::-1]


def test_vsock_host_client_disconnect_mid_stream_resets_only_that_connection(one_vm):
    _, sock, uds = one_vm
    listener = host_listener(uds + "_9100")
    with VsockDriver.attach(sock) as drv:
        doomed, survivor = drv.connect(9100), drv.connect(9100)
        h1, _ = listener.accept()
        h2, _ = listener.accept()
        doomed.send(os.urandom(10_000))
        h1.recv(100)
        h1.close()  # the host program goes away mid-stream
        with pytest.raises((VsockReset, BrokenPipeError)):
            for _ in range(200):
                doomed.send(os.urandom(32_000), timeout=5)
                drv.poll(0.01)
        assert doomed.reset or doomed.peer_shut_send
        survivor.send(b"still here")
        assert h2.recv(100) == b"still here"


def test_vsock_reconnected_front_end_gets_transport_reset_event(one_vm):
    _, sock, uds = one_vm
    listener = host_listener(uds + "_9200")
    with VsockDriver.attach(sock) as drv:
        drv.connect(9200)
        listener.accept()
        drv.poll(0.2)
        assert drv.events == []
    with VsockDriver.attach(sock) as drv:
        drv.wait_for(lambda: drv.events, 10, "transport reset event")
        assert drv.events == [0]
        g = drv.connect(9200)  # and the device works afterwards
        h, _ = listener.accept()
        g.send(b"after reset")
        assert h.recv(100) == b"after reset"


def _three_vms(sockdir, vsock_proc):
    socks = {cid: os.path.join(sockdir, f"vm{cid}.sock") for cid in (3, 4, 5)}
    groups = {3: "blue", 4: "blue+red", 5: "green"}
    args = []
    for cid, s in socks.items():
        args += ["--vm", f"guest-cid={cid},socket={s},uds-path={s}.vsock,groups={groups[cid]}"]
    vsock_proc(*args, wait_for=socks[5])
    return socks


def _exchange(sock, out: bytes, expect: int, timeout: float = 30) -> bytes:
    """Send `out` while receiving `expect` bytes, interleaved, as a full-duplex program does."""
    got = bytearray()
    view = memoryview(out)
    deadline = time.monotonic() + timeout
    while view or len(got) < expect:
        assert time.monotonic() < deadline, f"stalled: {len(view)} left to send, {len(got)}/{expect} received"
        n = min(len(view), sock.credit(), 32 << 10)
        if n:
            sock.send(view[:n])
            view = view[n:]
        sock.drv.poll(0.01)
        if sock.rx:
            got += sock.recv(1 << 20)
    return bytes(got)


def test_vsock_vms_in_one_group_exchange_data_both_ways_at_once(sockdir, vsock_proc):
    socks = _three_vms(sockdir, vsock_proc)
    a_to_b, b_to_a = os.urandom(3 * MiB), os.urandom(3 * MiB + 1)
    with VsockDriver.attach(socks[3]) as a, VsockDriver.attach(socks[4]) as b:
        b.listen(7000)
        seen: dict = {}

        def guest_b():  # the other VM runs in its own thread, like a real guest
            gb = b.accept(7000)
            seen["peer"] = (gb.peer_cid, gb.peer_port)
            seen["data"] = _exchange(gb, b_to_a, len(a_to_b))
            b.wait_for(lambda: gb.reset, 10, "close from the other VM")

        t = threading.Thread(target=guest_b)
        t.start()
        try:
            ga = a.connect(7000, cid=4)
            got = _exchange(ga, a_to_b, len(b_to_a))
            ga.close()
        finally:
            t.join(40)
        assert seen["peer"] == (3, ga.local_port)
        assert sha(seen["data"]) == sha(a_to_b)
        assert sha(got) == sha(b_to_a)


def test_vsock_vms_in_different_groups_cannot_connect(sockdir, vsock_proc):
    socks = _three_vms(sockdir, vsock_proc)
    with VsockDriver.attach(socks[3]) as a, VsockDriver.attach(socks[5]) as c:
        c.listen(7000)
        with pytest.raises(VsockReset):
            a.connect(7000, cid=5)
        c.poll(0.2)
        assert not any(p.op == Op.REQUEST for p in c.received)  # never reached the other group
        with pytest.raises(VsockReset):
            a.connect(7000, cid=77)  # no such VM at all


def test_vsock_rx_buffers_split_into_header_and_payload_descriptors(one_vm):
    """Linux before 6.3 posts each rx buffer as two descriptors (header, payload)."""
    _, sock, uds = one_vm
    listener = host_listener(uds + "_9300")
    down = os.urandom(MiB + 3)
    with VsockDriver.attach(sock, rx_split=True) as drv:
        g = drv.connect(9300)
        h, _ = listener.accept()
        writer = threading.Thread(target=h.sendall, args=(down,))
        writer.start()
        assert sha(g.recv_exact(len(down))) == sha(down)
        writer.join(10)
        g.send(b"and back")
        assert h.recv(100) == b"and back"


def test_vsock_reattached_guest_gets_the_transport_reset_before_any_packet(one_vm):
    """A host program connects while no front-end is attached; the next front-end's rx
    ring must stay untouched until the reset event is in its event ring (before the fix
    the REQUEST was written at rx start, and the guest's reset then killed it)."""
    bp, sock, uds = one_vm
    listener = host_listener(uds + "_9300")
    with VsockDriver.attach(sock) as drv:
        drv.connect(9300)
        listener.accept()
    deadline = time.monotonic() + 10
    while bp.log().count("front-end disconnected") < 1:
        assert time.monotonic() < deadline, bp.log()
        time.sleep(0.02)
    h, _ = host_connect(uds, 1234)
    fe = Frontend(sock)
    try:
        fe.negotiate(DRIVER_FEATURES)
        fe.set_mem_table()
        rxq, _txq = fe.setup_queue(0, 64), fe.setup_queue(1, 64)
        buf = fe.ram.alloc(HEADER_SIZE + 4096, 64)
        rxq.ring.add([(buf, HEADER_SIZE + 4096, True)])
        rxq.ring.kick()
        rxq.ring.wait(1.0)   # the old back-end wrote the REQUEST here within milliseconds
        assert rxq.ring.reap() == [], "a packet of the new session came before the reset event"
        evq = fe.setup_queue(2, 8)
        ev = fe.ram.alloc(4, 4)
        evq.ring.add([(ev, 4, True)])
        evq.ring.kick()
        assert evq.ring.wait(10) and len(evq.ring.reap()) == 1
        assert unpack_event(fe.ram.read(ev, 4)) == 0   # VIRTIO_VSOCK_EVENT_TRANSPORT_RESET
        assert rxq.ring.wait(10)
        [(_, used)] = rxq.ring.reap()
        hdr = Header.unpack(fe.ram.read(buf, used))
        assert hdr.op == Op.REQUEST and hdr.dst_port == 1234
    finally:
        fe.close()
        h.close()
