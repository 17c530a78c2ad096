"""The C data path of vhost-user-vsock (backends/vsock/vsock.c): which packets it takes, that it
keeps order and credit when the host socket is full, and what stays in Python.

Each connection's close line in the back-end log says how many bytes C moved
("guest->host N bytes (M by C, K short writes), host->guest ..."); the tests
read it to prove which path carried the bytes."""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from contextlib import contextmanager

from vsock_proc import (guest_stream_to_host, host_connect, host_listener, host_stream_to_guest, read_line,
                        recv_all, sha)
from vhost_user.backends.vsock.driver import VsockDriver

MiB = 1 << 20
_CLOSED = re.compile(r"closed stream guest port (\d+) .*: guest->host (\d+) bytes \((\d+) by C, (\d+) short "
                     r"writes\), host->guest (\d+) bytes \((\d+) by C\)")


def _close_line(bp, guest_port: int, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for m in _CLOSED.finditer(bp.log()):
            if int(m.group(1)) == guest_port:
                out, c_out, short, into, c_in = (int(m.group(k)) for k in range(2, 7))
                return {"out": out, "c_out": c_out, "short": short, "in": into, "c_in": c_in}
        time.sleep(0.05)
    raise AssertionError(f"no close line for guest port {guest_port}:\n{bp.log()[-3000:]}")


def test_vsock_stream_bytes_move_in_c_both_ways(one_vm):
    bp, sock, uds = one_vm
    listener = host_listener(uds + "_7000")
    up, down = os.urandom(4 * MiB + 3), os.urandom(3 * MiB + 1)
    with VsockDriver.attach(sock) as drv:
        g, h, got = guest_stream_to_host(drv, listener, 7000, up, timeout=30)
        writer = threading.Thread(target=h.sendall, args=(down,))
        writer.start()
        back = g.recv_exact(len(down), timeout=30)
        writer.join(30)
        g.close()
        port = g.local_port
    assert sha(got) == sha(up)
    assert sha(back) == sha(down)
    line = _close_line(bp, port)
    assert line["out"] == len(up) and line["in"] == len(down)
    # Most bytes went through C; Python takes only the rest of a packet the full host
    # socket cut, and what the guest sends while that rest waits.
    assert line["c_out"] >= len(up) // 2
    assert line["c_in"] >= len(down) // 2


@contextmanager
def _stream_to_a_late_reader(sockdir, vsock_proc, port: int, nbytes: int, *, tx_slots: int, delay: float):
    """A back-end with a 1 MiB tx buffer and a guest stream to host `port`, whose host
    reader has a 4 KiB receive buffer and starts `delay` s late (so the host socket
    fills). Yields (bp, g, received): `received()` waits for the reader and returns
    the `nbytes` it read. The stream is closed at the end."""
    sock, uds = os.path.join(sockdir, "vm.sock"), os.path.join(sockdir, "vm.vsock")
    bp = vsock_proc("--guest-cid", "3", "--socket", sock, "--uds-path", uds, "--tx-buffer-size", "1M",
                    wait_for=sock)
    listener = host_listener(f"{uds}_{port}")
    with VsockDriver.attach(sock, tx_slots=tx_slots) as drv:
        g = drv.connect(port)
        h, _ = listener.accept()
        h.settimeout(30)
        h.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append(recv_all(h, nbytes, delay=delay)))
        reader.start()

        def received() -> bytes:
            reader.join(60)
            return got[0]

        yield bp, g, received
        g.close()


def test_vsock_full_host_socket_gives_short_writes_and_keeps_every_byte_in_order(sockdir, vsock_proc):
    """The host program reads late: the socket fills mid-packet, C hands the packet back
    with the count it wrote, Python queues the rest; the guest's credit bounds the queue."""
    data = os.urandom(16 * MiB)
    with _stream_to_a_late_reader(sockdir, vsock_proc, 7001, len(data), tx_slots=64, delay=1.0) as (bp, g, received):
        g.send(data, timeout=60)
        got = received()
        assert g.tx_cnt - g.peer_fwd_cnt <= g.peer_buf_alloc
    port = g.local_port
    assert sha(got) == sha(data)
    line = _close_line(bp, port)
    assert line["out"] == len(data)
    assert line["short"] >= 1, line
    assert 0 < line["c_out"] < len(data), line
    assert "credit" not in bp.log().lower().replace("credit_update", "")


def test_vsock_host_data_after_connect_line_keeps_order_before_c_takes_over(one_vm):
    """Bytes sent with the CONNECT line go first (Python), the stream after them in C."""
    bp, sock, uds = one_vm
    head, body = b"first-bytes-with-the-connect-line", os.urandom(2 * MiB)
    with VsockDriver.attach(sock) as drv:
        drv.listen(7002)
        h, _ = host_connect(uds, 7002, extra=head)
        g = drv.accept(7002)
        assert read_line(h).startswith(b"OK ")
        writer = threading.Thread(target=h.sendall, args=(body,))
        writer.start()
        got = g.recv_exact(len(head) + len(body), timeout=30)
        writer.join(30)
        assert got == head + body
        h.close()
        g.recv(timeout=10)  # EOF
        g.close()
        port = g.local_port
    line = _close_line(bp, port)
    assert line["in"] == len(head) + len(body)
    assert len(body) // 2 <= line["c_in"] <= len(body)


def test_vsock_guest_credit_updates_are_taken_in_c_and_a_closed_window_reopens(one_vm):
    """A guest with a 16 KiB window reads slowly: the window closes again and again and
    each CREDIT_UPDATE that reopens it is taken by C (the tx burst), which hands the
    connection back to Python only when the window opens from zero. Every byte arrives,
    in order, most of them by C, and the window is never overrun."""
    bp, sock, uds = one_vm
    body = os.urandom(2 * MiB + 5)
    with VsockDriver.attach(sock, buf_alloc=16 << 10) as drv:
        g, h, got = host_stream_to_guest(drv, uds, 7003, body)
        assert g.credit_violations == 0
        stats = next(v for k, v in bp.log_stats().items() if k.startswith("cid 3 "))
        h.close()
        g.recv(timeout=10)  # EOF
        g.close()
        port = g.local_port
    assert sha(got) == sha(body)
    assert stats["c_credit_updates_in"] >= len(body) // (16 << 10) // 2, stats
    line = _close_line(bp, port)
    assert line["in"] == len(body)
    assert line["c_in"] >= len(body) // 2, line


def test_vsock_pcap_leaves_the_bytes_on_the_c_path(sockdir, vsock_proc):
    """With --pcap, C still moves the stream (it appends each packet to the capture ring
    itself; test_vsock_pcap.py reads the file)."""
    sock, uds = os.path.join(sockdir, "vm.sock"), os.path.join(sockdir, "vm.vsock")
    pcap = os.path.join(sockdir, "cap.pcap")
    bp = vsock_proc("--guest-cid", "3", "--socket", sock, "--uds-path", uds, "--pcap", pcap, wait_for=sock)
    listener = host_listener(uds + "_7003")
    data = os.urandom(256 << 10)
    with VsockDriver.attach(sock) as drv:
        g = drv.connect(7003)
        h, _ = listener.accept()
        h.settimeout(10)
        g.send(data)
        assert recv_all(h, len(data)) == data
        h.sendall(data)
        assert g.recv_exact(len(data)) == data
        g.close()
        port = g.local_port
    line = _close_line(bp, port)
    assert line["out"] == line["in"] == len(data)
    assert line["c_out"] >= len(data) // 4 and line["c_in"] >= len(data) // 2, line


def test_vsock_small_packets_in_flight_with_a_slow_reader_arrive_in_order(sockdir, vsock_proc):
    """Many 4 KiB packets queued at once (C writes a run of them with one writev) while the
    host socket keeps filling: a short write cuts a run; what was cut and what followed must
    still arrive once each, in order."""
    data = os.urandom(8 * MiB)
    with _stream_to_a_late_reader(sockdir, vsock_proc, 7004, len(data), tx_slots=128, delay=0.5) as (bp, g, received):
        view = memoryview(data)
        for off in range(0, len(data), 4096):
            g.send(view[off:off + 4096], timeout=60)
        got = received()
    port = g.local_port
    assert sha(got) == sha(data)
    line = _close_line(bp, port)
    assert line["out"] == len(data) and line["short"] >= 1 and line["c_out"] > 0, line
