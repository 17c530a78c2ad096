"""Hostile guests against the real vhost-user-vsock process: each violation gets one log
line and an RST or a drop, and nothing else (other connections, other VMs) is disturbed."""

from __future__ import annotations

import os
import select
import socket
import time

import pytest

from backends_proc import open_fds
from vhost_user.backends.vsock.packet import HEADER_SIZE, HOST_CID, Header, Op, SockType
from vhost_user.backends.vsock.driver import VsockDriver
from vhost_user.frontend.splitring import append_avail, write_desc
from vsock_proc import host_connect, host_listener, read_line


def _still_works(drv: VsockDriver, listener: socket.socket) -> None:
    g = drv.connect(int(listener.getsockname().rsplit("_", 1)[1]))
    h, _ = listener.accept()
    g.send(b"business as usual")
    assert h.recv(100) == b"business as usual"
    g.close()


def test_vsock_header_claiming_more_than_the_chain_is_dropped_and_reset(one_vm):
    bp, sock, uds = one_vm
    listener = host_listener(uds + "_5000")
    with VsockDriver.attach(sock) as drv:
        g = drv.connect(5000)
        h, _ = listener.accept()
        gpa = drv.fe.ram.alloc(HEADER_SIZE + 10)
        lie = g.header(Op.RW, len=1000)  # claims 1000 bytes, the chain holds 10
        drv.fe.ram.write(gpa, lie.pack() + b"0123456789")
        drv.send_chain([(gpa, HEADER_SIZE + 10, False)])
        drv.wait_for(lambda: g.reset, 10, "RST")
        bp.wait_log("header claims 1000 payload bytes, chain holds 10")
        h.settimeout(5)
        assert h.recv(100) == b""  # nothing of the bogus packet reached the host; connection closed
        _still_works(drv, listener)


def test_vsock_out_of_bounds_buffer_breaks_only_that_vms_queue(sockdir, vsock_proc):
    socks = {cid: os.path.join(sockdir, f"vm{cid}.sock") for cid in (3, 4)}
    bp = vsock_proc("--vm", f"guest-cid=3,socket={socks[3]},uds-path={socks[3]}.vsock",
                    "--vm", f"guest-cid=4,socket={socks[4]},uds-path={socks[4]}.vsock", wait_for=socks[4])
    listener = host_listener(socks[4] + ".vsock_5000")
    with VsockDriver.attach(socks[3]) as bad, VsockDriver.attach(socks[4]) as good:
        _publish_raw(bad, addr=1 << 40, length=4096)  # far outside guest RAM
        assert select.select([bad.txq.err_fd], [], [], 10)[0], "no error notification"
        bp.wait_log("queue 1")
        _still_works(good, listener)
        assert bp.running


def test_vsock_out_of_bounds_rx_buffer_under_a_host_stream_breaks_only_that_vms_queue(sockdir, vsock_proc):
    """The host loop (C, vsock_host.c) fills rx buffers straight from a host socket: a
    posted rx buffer that points outside guest RAM breaks that VM's rx queue there, with
    an error notification; the back-end and the other VM go on."""
    from vhost_user.frontend.splitring import DESC_F_WRITE
    socks = {cid: os.path.join(sockdir, f"vm{cid}.sock") for cid in (3, 4)}
    bp = vsock_proc("--vm", f"guest-cid=3,socket={socks[3]},uds-path={socks[3]}.vsock",
                    "--vm", f"guest-cid=4,socket={socks[4]},uds-path={socks[4]}.vsock", wait_for=socks[4])
    listener = host_listener(socks[4] + ".vsock_5000")
    with VsockDriver.attach(socks[3]) as bad, VsockDriver.attach(socks[4]) as good:
        bad.listen(7000)
        h, _ = host_connect(socks[3] + ".vsock", 7000)
        bad.accept(7000)
        assert read_line(h).startswith(b"OK")
        q = bad.rxq
        for i in range(q.size):  # every posted rx buffer now points far outside guest RAM
            write_desc(bad.fe.ram, q.ring.desc_gpa, i, 1 << 40, 4096, DESC_F_WRITE)
        h.setblocking(False)
        try:
            h.send(os.urandom(256 << 10))
        except BlockingIOError:
            pass
        assert select.select([q.err_fd], [], [], 10)[0], "no error notification on the rx queue"
        bp.wait_log("queue 0")
        _still_works(good, listener)
        assert bp.running
    assert "Traceback" not in bp.log()


def _publish_raw(drv: VsockDriver, *, addr: int, length: int) -> None:
    """Write descriptor 0 and an avail entry by hand, as a malicious driver would."""
    q, ram = drv.txq, drv.fe.ram
    write_desc(ram, q.ring.desc_gpa, 0, addr, length)
    append_avail(ram, q.ring.avail_gpa, q.size, 0)
    os.eventfd_write(q.kick_fd, 1)


def test_vsock_packet_for_unknown_connection_gets_rst(one_vm):
    bp, sock, uds = one_vm
    with VsockDriver.attach(sock) as drv:
        drv.send_packet(Header(src_cid=drv.cid, dst_cid=HOST_CID, src_port=777, dst_port=888,
                               len=5, type=SockType.STREAM, op=Op.RW), b"hello")
        drv.wait_for(lambda: any(p.op == Op.RST and p.dst_port == 777 for p in drv.received), 10, "RST")
        rst = next(p for p in drv.received if p.op == Op.RST)
        assert (rst.src_cid, rst.src_port, rst.dst_cid) == (HOST_CID, 888, drv.cid)
        bp.wait_log("RW 3:777 -> 2:888")


def test_vsock_guest_ignoring_credit_is_reset_and_logged(one_vm):
    bp, sock, uds = one_vm
    listener = host_listener(uds + "_5001")
    with VsockDriver.attach(sock) as drv:
        g = drv.connect(5001)
        h, _ = listener.accept()  # never reads: the back-end must not buffer without bound
        window = g.peer_buf_alloc
        chunk = os.urandom(60_000)
        sent = 0
        while not g.reset and sent < window + 16 * len(chunk) + (8 << 20):
            drv.send_packet(g.header(Op.RW, len=len(chunk)), chunk)  # ignoring credit
            sent += len(chunk)
            drv.poll(0)
        drv.wait_for(lambda: g.reset, 10, "RST for the credit violation")
        bp.wait_log("guest ignores credit")
        _still_works(drv, listener)


def test_vsock_spoofed_source_cid_is_dropped(one_vm):
    bp, sock, uds = one_vm
    listener = host_listener(uds + "_5002")
    with VsockDriver.attach(sock) as drv:
        drv.send_packet(Header(src_cid=99, dst_cid=HOST_CID, src_port=1, dst_port=5002,
                               type=SockType.STREAM, op=Op.REQUEST))
        bp.wait_log("source CID 99 dropped")
        listener.settimeout(0.3)
        with pytest.raises(socket.timeout):
            listener.accept()  # no connection was made on behalf of the spoofed CID
        listener.settimeout(10)
        _still_works(drv, listener)


def test_vsock_no_fd_leaks_in_backend_or_frontend(one_vm):
    bp, sock, uds = one_vm
    listener = host_listener(uds + "_5003")
    before_ours = open_fds()
    with VsockDriver.attach(sock) as drv:
        drv.listen(6000)
        backend_before = len(os.listdir(f"/proc/{bp.pid}/fd"))
        for _ in range(10):
            _still_works(drv, listener)
            h, _ = host_connect(uds, 6000)
            g = drv.accept(6000)
            assert read_line(h).startswith(b"OK")
            h.close()
            drv.wait_for(lambda: g.peer_shut_send, 10, "host EOF")
            g.close()
        drv.poll(0.2)
        time.sleep(0.2)
        assert len(os.listdir(f"/proc/{bp.pid}/fd")) == backend_before
    assert open_fds() - before_ours <= {listener.fileno()}


def test_vsock_sibling_flood_on_no_connection_is_refused_and_never_delivered(sockdir, vsock_proc):
    socks = {cid: os.path.join(sockdir, f"vm{cid}.sock") for cid in (3, 4)}
    bp = vsock_proc("--vm", f"guest-cid=3,socket={socks[3]},uds-path={socks[3]}.vsock",
                    "--vm", f"guest-cid=4,socket={socks[4]}", wait_for=socks[4])
    listener = host_listener(socks[3] + ".vsock_5000")
    with VsockDriver.attach(socks[3]) as a, VsockDriver.attach(socks[4]) as b:
        chunk = os.urandom(64 << 10)
        hdr = Header(src_cid=3, dst_cid=4, src_port=1000, dst_port=2000, len=len(chunk),
                     type=SockType.STREAM, op=Op.RW)
        for _ in range(200):  # 12.5 MiB of RW for a connection that was never opened
            a.send_packet(hdr, chunk)
            a.poll(0)
        a.wait_for(lambda: any(p.op == Op.RST and p.src_cid == 4 for p in a.received), 10, "RST")
        bp.wait_log("for no open sibling connection")
        _still_works(a, listener)
        b.poll(0.2)  # the flooded VM never saw a byte of it
        assert not any(p.op == Op.RW for p in b.received)


@pytest.mark.parametrize("line", [b"HELLO 5\n", b"CONNECT x\n", b"CONNECT " + b"9" * 100 + b"\n"])
def test_vsock_bad_connect_line_is_closed_and_logged(one_vm, line):
    bp, sock, uds = one_vm
    listener = host_listener(uds + "_5004")
    with VsockDriver.attach(sock) as drv:
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.settimeout(10)
        c.connect(uds)
        c.sendall(line)
        assert c.recv(100) == b""  # closed without an answer
        c.close()
        bp.wait_log("no valid CONNECT line")
        drv.poll(0.1)
        assert not any(p.op == Op.REQUEST for p in drv.received)  # the guest never heard of it
        _still_works(drv, listener)
