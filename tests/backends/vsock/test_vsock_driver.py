"""The C vsock stream load (backends/vsock/driver_vsock.c via `VsockDriver.stream_bench`) against the real
vhost-user-vsock process: bytes arrive exactly and intact, credit holds both ways, packets of
other connections are dropped, and the Python driver model carries on afterwards."""

from __future__ import annotations

import hashlib
import os
import threading

import pytest

from vsock_proc import host_connect, host_listener, read_line, start_vsock
from vhost_user.backends.vsock.packet import Op
from vhost_user.backends.vsock.driver import MAX_PKT, VsockDriver

KiB = 1 << 10


@pytest.fixture
def vm(sockdir):
    """Factory: one VM (CID 3) with the given back-end options; (process, socket, uds)."""
    started = []

    def make(*extra: str):
        sock, uds = os.path.join(sockdir, "vm3.sock"), os.path.join(sockdir, "vm3.vsock")
        bp = start_vsock(sockdir, "--guest-cid", "3", "--socket", sock, "--uds-path", uds, *extra,
                         wait_for=sock)
        started.append(bp)
        return bp, sock, uds

    yield make
    for bp in started:
        bp.stop()


def _model_buffers(drv: VsockDriver) -> tuple[set[int], set[int]]:
    return set(drv._rx_slots.values()), set(drv._tx_free) | {g for g in drv._tx_busy.values() if g}


def _check_model_carries_on(drv: VsockDriver, uds: str, port: int) -> None:
    """A new connection through the Python model exchanges bytes both ways and closes."""
    listener = host_listener(f"{uds}_{port}")
    g = drv.connect(port)
    h, _ = listener.accept()
    h.settimeout(10)
    g.send(b"after the C loop")
    assert h.recv(100) == b"after the C loop"
    h.sendall(b"reply")
    assert g.recv_exact(5) == b"reply"
    g.close()
    assert h.recv(1) == b""
    h.close()
    listener.close()


@pytest.mark.parametrize("tx_buffer,write_size", [("16K", 4096), ("64K", 65536), ("16K", 65536)])
def test_drvvsock_guest_to_host_delivers_exactly_the_counted_pattern(vm, tx_buffer, write_size):
    bp, sock, uds = vm("--tx-buffer-size", tx_buffer)
    window = int(tx_buffer[:-1]) * KiB
    listener = host_listener(f"{uds}_5000")
    received = {"n": 0, "sha": hashlib.sha256()}

    def sink():
        conn, _ = listener.accept()
        conn.settimeout(20)
        buf = bytearray(1 << 20)
        with conn:
            while n := conn.recv_into(buf):
                received["n"] += n
                received["sha"].update(memoryview(buf)[:n])

    t = threading.Thread(target=sink)
    t.start()
    payload = hashlib.sha256(b"drvvsock").digest() * (write_size // 32)
    with VsockDriver.attach(sock, tx_slots=64, buf_alloc=256 * KiB) as drv:
        rx_before, tx_before = _model_buffers(drv)
        g = drv.connect(5000)
        r = drv.stream_bench(g, "g2h", payload=payload, duration=0.4)
        assert not g.reset and g.state == "established"   # the back-end resets a guest over credit
        assert r.tx_bytes > 0 and r.errors == 0 and r.end_op == 0
        assert g.tx_cnt == r.tx_bytes
        g.close()
        t.join(30)
        assert received["n"] == r.tx_bytes
        packet = payload[:min(write_size, window)]  # a window smaller than a write: what fits
        assert received["n"] % len(packet) == 0
        assert received["sha"].hexdigest() == hashlib.sha256(packet * (received["n"] // len(packet))).hexdigest()
        assert _model_buffers(drv) == (rx_before, tx_before)
        assert drv.rxq.ring.in_flight == len(rx_before)
        _check_model_carries_on(drv, uds, 5001)
    listener.close()
    assert "ignores credit" not in bp.log()
    assert bp.running


def test_drvvsock_host_to_guest_counts_every_byte_and_ends_at_shutdown(vm):
    bp, sock, uds = vm()
    total = 8 << 20
    with VsockDriver.attach(sock, buf_alloc=128 * KiB) as drv:
        rx_before, tx_before = _model_buffers(drv)
        drv.listen(6000)
        h, _ = host_connect(uds, 6000)
        g = drv.accept(6000)
        assert read_line(h).startswith(b"OK ")
        writer = threading.Thread(target=lambda: (h.sendall(os.urandom(total)), h.close()))
        writer.start()
        r = drv.stream_bench(g, "h2g", stall_timeout=20)
        writer.join(20)
        assert r.rx_bytes == total
        assert r.end_op in (Op.SHUTDOWN, Op.RST) and r.errors == 0
        assert r.peer_credit_violations == 0 and g.credit_violations == 0
        assert r.credit_updates > 0          # 8 MiB through a 128 KiB window needs them
        assert g.fwd_cnt == g.rx_cnt == total
        assert _model_buffers(drv) == (rx_before, tx_before)
        g.close()
        assert g.state == "closed"
        _check_model_carries_on(drv, uds, 6001)
    assert bp.running


def test_drvvsock_drops_packets_of_other_connections(vm):
    _, sock, uds = vm()
    total = 2 << 20
    with VsockDriver.attach(sock) as drv:
        drv.listen(7000)
        drv.listen(7001)
        main, _ = host_connect(uds, 7000)
        g = drv.accept(7000)
        assert read_line(main).startswith(b"OK ")
        other, _ = host_connect(uds, 7001)
        g2 = drv.accept(7001)
        assert read_line(other).startswith(b"OK ")
        other.sendall(b"x" * 1000)   # lands during the run, on another connection

        def write_main():
            main.sendall(os.urandom(total))
            main.close()

        writer = threading.Thread(target=write_main)
        writer.start()
        r = drv.stream_bench(g, "h2g", stall_timeout=20)
        writer.join(20)
        assert r.rx_bytes == total and r.errors == 0
        assert r.other >= 1
        assert g2.rx_cnt == 0   # dropped, not delivered to the model's socket
        other.close()


def test_drvvsock_rejects_bad_arguments(vm):
    _, sock, uds = vm()
    listener = host_listener(f"{uds}_5000")
    with VsockDriver.attach(sock) as drv:
        g = drv.connect(5000)
        with pytest.raises(ValueError):
            drv.stream_bench(g, "g2h", payload=bytes(MAX_PKT + 1), duration=0.1)
        with pytest.raises(ValueError):
            drv.stream_bench(g, "g2h", payload=b"", duration=0.1)
        with pytest.raises(ValueError):
            drv.stream_bench(g, "sideways", payload=b"x", duration=0.1)
        g.close()
        with pytest.raises(ValueError):
            drv.stream_bench(g, "g2h", payload=b"x", duration=0.1)
    listener.close()


# -- a device that breaks the rules (no back-end: the rings in a memfd, used entries by hand) --

GPA_BASE = 0x1000_0000
RX_BUF = 44 + 4096


class _Rings:
    """tx and rx driver queues in one memfd region, rx buffers posted; the test plays device."""

    def __init__(self, size: int = 16) -> None:
        import mmap

        from vhost_user.frontend.driver_ring import DriverQueue, ring_layout

        self.fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, 1 << 20)
        self.map = mmap.mmap(self.fd, 1 << 20)
        self.fds = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(4)]
        desc, avail, used, total = ring_layout(size)
        self.q = []
        for i in range(2):
            base = i * total
            self.q.append(DriverQueue(self.map, GPA_BASE, size, desc_offset=base + desc,
                                      avail_offset=base + avail, used_offset=base + used,
                                      kick_fd=self.fds[2 * i], call_fd=self.fds[2 * i + 1],
                                      event_idx=False))
        self.tx, self.rx = self.q
        data = 2 * total
        self.tx_slots = [GPA_BASE + data + k * (44 + 65536) for k in range(4)]
        rx_base = data + 4 * (44 + 65536)
        self.rx_posted = []
        for k in range(8):
            gpa = GPA_BASE + rx_base + k * RX_BUF
            self.rx_posted.append((self.rx.add([(gpa, RX_BUF, True)]), gpa))

    def publish_rx(self, entries: list[tuple[int, int, bytes]]) -> None:
        """Device side: write each (slot, used_len, bytes) into the slot's buffer, then used->idx."""
        import struct

        used = self.rx.used_gpa - GPA_BASE
        for k, (slot, used_len, raw) in enumerate(entries):
            head, gpa = self.rx_posted[slot]
            self.map[gpa - GPA_BASE:gpa - GPA_BASE + len(raw)] = raw
            struct.pack_into("<II", self.map, used + 4 + 8 * k, head, used_len)
        struct.pack_into("<H", self.map, used + 2, len(entries))

    def close(self) -> None:
        for q in self.q:
            q.close()
        self.map.close()
        for fd in [self.fd, *self.fds]:
            os.close(fd)


def test_drvvsock_counts_malformed_and_foreign_packets_and_reposts_every_buffer():
    from vhost_user.backends.vsock.packet import Header
    from vhost_user.backends.vsock.driver_load import VsockConnState, run_vsock_stream_bench

    r = _Rings()
    try:
        conn = VsockConnState(3, 2, 50000, 1234, 64 << 10, 64 << 10, 0, 0, 0, 0, 0)

        def hdr(op, length=0, **kw):
            fields = dict(src_cid=2, dst_cid=3, src_port=1234, dst_port=50000, op=op, len=length,
                          buf_alloc=32768, fwd_cnt=0)
            fields.update(kw)
            return Header(**fields).pack()

        r.publish_rx([
            (0, 10, hdr(Op.RW, 0)),                      # used length shorter than a header
            (1, RX_BUF + 1, hdr(Op.RW, 0)),              # used length beyond the buffer
            (2, 44 + 10, hdr(Op.RW, 4000)),              # header claims more than was written
            (3, 44 + 100, hdr(Op.RW, 100, dst_port=50001) + bytes(100)),  # another connection
            (4, 44 + 100, hdr(Op.RW, 100) + bytes(100)),  # ours
            (5, 44, hdr(Op.SHUTDOWN, flags=3)),           # ours: ends the run
        ])
        run = run_vsock_stream_bench(r.tx, r.rx, conn, direction="h2g", tx_slots=r.tx_slots,
                                     tx_slot_size=44 + 65536, rx_posted=r.rx_posted,
                                     rx_buf_len=RX_BUF, stall_timeout_s=5)
        res = run.result
        assert run.error is None and not res.timed_out
        assert res.errors == 3 and res.other == 1
        assert res.rx_bytes == 100 and conn.rx_cnt == conn.fwd_cnt == 100
        assert (res.end_op, res.end_flags) == (Op.SHUTDOWN, 3)
        assert conn.peer_buf_alloc == 32768
        # every buffer is posted again, at a head the queue has in flight, same gpas
        assert sorted(g for _, g in run.rx_posted) == sorted(g for _, g in r.rx_posted)
        assert all(h >= 0 for h, _ in run.rx_posted)
        assert len({h for h, _ in run.rx_posted}) == len(r.rx_posted) == r.rx.in_flight
        assert run.tx_busy == [] and r.tx.in_flight == 0   # nothing to say back
    finally:
        r.close()


def test_drvvsock_refuses_rx_heads_that_are_not_in_flight():
    from vhost_user.backends.vsock.driver_load import VsockConnState, run_vsock_stream_bench

    r = _Rings()
    try:
        conn = VsockConnState(3, 2, 50000, 1234, 64 << 10, 64 << 10, 0, 0, 0, 0, 0)
        bad = [(r.rx_posted[0][0], gpa) for _, gpa in r.rx_posted]  # one head given for all
        run = run_vsock_stream_bench(r.tx, r.rx, conn, direction="h2g", tx_slots=r.tx_slots,
                                     tx_slot_size=44 + 65536, rx_posted=bad, rx_buf_len=RX_BUF,
                                     stall_timeout_s=1)
        assert isinstance(run.error, ValueError)
        outside = [(h, GPA_BASE + (1 << 20)) for h, _ in r.rx_posted]   # buffers past the area
        run = run_vsock_stream_bench(r.tx, r.rx, conn, direction="h2g", tx_slots=r.tx_slots,
                                     tx_slot_size=44 + 65536, rx_posted=outside, rx_buf_len=RX_BUF,
                                     stall_timeout_s=1)
        assert isinstance(run.error, ValueError) and "outside" in str(run.error)
        assert r.rx.in_flight == len(r.rx_posted) and not r.rx.broken
    finally:
        r.close()


def test_vsock_bench_reports_both_directions_and_runs_twice_on_one_backend(vm):
    from vhost_user.backends.vsock.bench import run_vsock_bench

    bp, sock, uds = vm()
    for port in (5555, 5655):   # the second attach gets a TRANSPORT_RESET first
        reports = run_vsock_bench(sock, uds, write_sizes=(4096,), runtime=0.3, port=port, pid=bp.pid)
        assert [r["direction"] for r in reports] == ["guest-to-host", "host-to-guest"]
        for r in reports:
            assert r["bytes"] > 0 and r["elapsed_s"] > 0 and r["mb_s"] == r["bytes"] / r["elapsed_s"] / 1e6
            assert r["backend_cpu_s"] is not None
            assert r["unix_socket_mb_s"] > 0 and r["ratio_to_unix_socket"] == r["mb_s"] / r["unix_socket_mb_s"]
    assert "ignores credit" not in bp.log()
