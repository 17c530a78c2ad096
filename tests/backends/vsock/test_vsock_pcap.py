"""`--pcap`: every packet in both directions, in the vsockmon format tshark dissects."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import threading

from backends_proc import require_tool, wait_for_socket
from harness.backend import BackendProcess
from vhost_user.backends.vsock.packet import HEADER_SIZE, Header, Op
from vhost_user.backends.vsock.pcap import LINKTYPE_VSOCK
from vhost_user.backends.vsock.driver import VsockDriver
from vsock_proc import guest_stream_to_host, host_connect, host_listener, host_stream_to_guest, read_line, recv_all, sha


def _session(sockdir, vsock_proc) -> str:
    sock, uds = os.path.join(sockdir, "vm.sock"), os.path.join(sockdir, "vm.vsock")
    pcap = os.path.join(sockdir, "vsock.pcap")
    bp = vsock_proc("--guest-cid", "3", "--socket", sock, "--uds-path", uds, "--pcap", pcap, wait_for=sock)
    listener = host_listener(uds + "_5000")
    with VsockDriver.attach(sock) as drv:
        g = drv.connect(5000)
        h, _ = listener.accept()
        g.send(b"guest says hi")
        assert h.recv(100) == b"guest says hi"
        drv.listen(6000)
        c, _ = host_connect(uds, 6000, b"host says hi")
        gc = drv.accept(6000)
        assert read_line(c).startswith(b"OK")
        assert gc.recv_exact(12) == b"host says hi"
        g.close()
    bp.stop()
    return pcap


def test_vsock_pcap_records_both_directions_in_vsockmon_frames(sockdir, vsock_proc):
    from scapy.utils import PcapReader

    pcap = _session(sockdir, vsock_proc)
    with PcapReader(pcap) as reader:
        assert reader.linktype == LINKTYPE_VSOCK
        frames = [bytes(p) for p in reader]
    headers = [Header.unpack(f[32:32 + HEADER_SIZE]) for f in frames]
    seen = {(h.op, h.src_cid, h.dst_cid) for h in headers}
    assert (Op.REQUEST, 3, 2) in seen and (Op.RESPONSE, 2, 3) in seen  # guest -> host set-up
    assert (Op.REQUEST, 2, 3) in seen and (Op.RESPONSE, 3, 2) in seen  # host -> guest set-up
    payloads = {f[32 + HEADER_SIZE:] for f, h in zip(frames, headers) if h.op == Op.RW}
    assert {b"guest says hi", b"host says hi"} <= payloads
    assert any(h.op == Op.SHUTDOWN for h in headers) and any(h.op == Op.RST for h in headers)


def test_vsock_pcap_is_dissected_by_tshark(sockdir, vsock_proc):
    tshark = require_tool("tshark")
    pcap = _session(sockdir, vsock_proc)
    out = subprocess.run([tshark, "-r", pcap, "-V"], capture_output=True, text=True, timeout=60).stdout
    assert "Linux vsock" in out
    assert "Source cid: 3" in out and "Destination cid: 2" in out
    assert "Destination port: 5000" in out and "Source port: 6000" in out
    for op in ("Operation: Request (1)", "Operation: Response (2)", "Operation: RW (5)",
               "Operation: Shutdown (4)", "Operation: Rst (3)",  # virtio header
               "Op: Connect", "Op: Payload", "Op: Disconnect"):  # af_vsockmon header
        assert op in out, op
    assert "Payload (13B)" in out  # "guest says hi"


def test_vsock_pcap_to_stdout(sockdir):
    import signal
    import sys

    from scapy.utils import PcapReader

    from backends_proc import wait_for_socket

    sock = os.path.join(sockdir, "vm.sock")
    out_path = os.path.join(sockdir, "stdout.pcap")
    with open(out_path, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "vhost_user.backends.vsock", "--guest-cid", "3",
                                 "--socket", sock, "--pcap", "-"], stdout=out, stderr=subprocess.DEVNULL)
    try:
        wait_for_socket(sock, proc)
        with VsockDriver.attach(sock) as drv:
            drv.send_packet(Header(src_cid=3, dst_cid=2, src_port=1, dst_port=2, op=Op.REQUEST))
            drv.wait_for(lambda: drv.received, 10, "RST")  # no --uds-path: refused
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    with PcapReader(out_path) as reader:
        assert reader.linktype == LINKTYPE_VSOCK
        ops = [Header.unpack(bytes(p)[32:32 + HEADER_SIZE]).op for p in reader]
    assert ops == [Op.REQUEST, Op.RST]


# -- capture under a load that takes the C data path ------------------------------------

MiB = 1 << 20
_MON = struct.Struct("<QQIIHHH2s")       # struct af_vsockmon_hdr (linux/vsockmon.h)
_VIRTIO = struct.Struct("<QQIIIHHIII")   # struct virtio_vsock_hdr (virtio 1.2, 5.10.6)
_MON_OP = {1: 1, 2: 1, 3: 2, 4: 2, 5: 4, 6: 3, 7: 3}  # virtio op -> af_vsockmon op


def _vm(stats: dict, cid: int) -> dict:
    return next(v for k, v in stats.items() if k.startswith(f"cid {cid} "))


def _frames(path: str) -> list[tuple[dict, dict, bytes, int]]:
    """Every record, read by scapy (the tests' own pcap reader), split with struct here:
    (af_vsockmon fields, virtio header fields, payload, original length)."""
    from scapy.utils import RawPcapReader

    out = []
    with RawPcapReader(path) as reader:
        assert reader.linktype == LINKTYPE_VSOCK
        while True:
            try:  # scapy's iterator cuts records at 65535 bytes; a vsock frame can be 65612
                raw, meta = reader._read_packet(size=1 << 18)  # (scapy: "use _read_packet()")
            except EOFError:
                break
            assert meta.caplen == len(raw)
            mon = dict(zip(("src_cid", "dst_cid", "src_port", "dst_port", "op", "transport", "len",
                            "reserved"), _MON.unpack_from(raw)))
            hdr = dict(zip(("src_cid", "dst_cid", "src_port", "dst_port", "len", "type", "op", "flags",
                            "buf_alloc", "fwd_cnt"), _VIRTIO.unpack_from(raw, _MON.size)))
            out.append((mon, hdr, raw[_MON.size + _VIRTIO.size:], meta.wirelen))
    return out


def _check_headers(frames, *, snaplen: int | None = None) -> None:
    """The af_vsockmon header agrees with the virtio header it wraps; lengths add up."""
    for mon, hdr, payload, wirelen in frames:
        where = f"{hdr}"
        for k in ("src_cid", "dst_cid", "src_port", "dst_port"):
            assert mon[k] == hdr[k], where
        assert (mon["op"], mon["transport"], mon["len"], mon["reserved"]) == \
            (_MON_OP[hdr["op"]], 2, _VIRTIO.size, b"\0\0"), where
        assert hdr["type"] in (1, 5) and {hdr["src_cid"], hdr["dst_cid"]} <= {2, 3, 4}, where
        assert wirelen == _MON.size + _VIRTIO.size + hdr["len"], where
        kept = wirelen if snaplen is None else min(wirelen, snaplen)
        assert _MON.size + _VIRTIO.size + len(payload) == kept, where
        assert hdr["op"] == Op.RW or hdr["len"] == 0, where


def _stream(frames, src: tuple[int, int], dst: tuple[int, int]) -> bytes:
    """The RW payloads of one direction of one connection, in capture order; its fwd_cnt
    never goes back and buf_alloc never changes (what a credit-keeping peer sends; an RST
    carries no credit)."""
    data, fwd, alloc = bytearray(), 0, None
    for _, hdr, payload, _ in frames:
        if (hdr["src_cid"], hdr["src_port"]) == src and (hdr["dst_cid"], hdr["dst_port"]) == dst:
            if hdr["op"] == Op.RST:
                continue
            assert hdr["fwd_cnt"] >= fwd and alloc in (None, hdr["buf_alloc"]), hdr
            fwd, alloc = hdr["fwd_cnt"], hdr["buf_alloc"]
            if hdr["op"] == Op.RW:
                data += payload
    return bytes(data)


def _host_stream(drv, listener, uds: str, up: bytes, down: bytes):
    """guest -> host `up` on port 5000, then host -> guest `down` on port 6000."""
    g, h, got_up = guest_stream_to_host(drv, listener, 5000, up)
    gc, c, back = host_stream_to_guest(drv, uds, 6000, down)
    assert sha(got_up) == sha(up) and sha(back) == sha(down)  # the data path is intact
    return g, gc, h, c


def test_vsock_pcap_under_c_load_holds_every_packet_and_each_streams_bytes(sockdir, vsock_proc):
    """Host streams (C path both ways) and a sibling stream (relay) under --pcap: every
    frame's headers are consistent, each direction's payloads are the stream's bytes, and
    the C engine still moved the host streams (the SIGUSR1 path counters)."""
    socks = {cid: os.path.join(sockdir, f"vm{cid}.sock") for cid in (3, 4)}
    uds = os.path.join(sockdir, "vm3.vsock")
    pcap = os.path.join(sockdir, "load.pcap")
    # a ring larger than everything sent: no drop can happen, whatever the disk does
    bp = vsock_proc("--vm", f"guest-cid=3,socket={socks[3]},uds-path={uds},groups=g",
                    "--vm", f"guest-cid=4,socket={socks[4]},groups=g",
                    "--pcap", pcap, "--capture-buffer", "64M", wait_for=socks[4])
    listener = host_listener(uds + "_5000")
    up, down = os.urandom(3 * MiB + 7), os.urandom(2 * MiB + 5)
    a_to_b, b_to_a = os.urandom(MiB + 1), os.urandom(MiB // 2 + 3)
    with VsockDriver.attach(socks[3]) as a, VsockDriver.attach(socks[4]) as b:
        g, gc, h, c = _host_stream(a, listener, uds, up, down)
        b.listen(7000)
        sib: dict = {}

        def guest_b():  # the other VM runs in its own thread, like a real guest
            gb = b.accept(7000, timeout=30)
            sib["got"] = gb.recv_exact(len(a_to_b), timeout=60)
            gb.send(b_to_a, timeout=60)
            b.wait_for(lambda: gb.reset, 30, "close from the other VM")

        t = threading.Thread(target=guest_b)
        t.start()
        ga = a.connect(7000, cid=4)
        ga.send(a_to_b, timeout=60)
        back = ga.recv_exact(len(b_to_a), timeout=60)
        assert sha(sib["got"]) == sha(a_to_b) and sha(back) == sha(b_to_a)
        stats = bp.log_stats()
        ports = {"g": g.local_port, "gc": gc.local_port, "gc_peer": gc.peer_port, "ga": ga.local_port}
        for s in (g, gc, ga):
            s.close()
        t.join(60)
    bp.stop()
    vm3 = _vm(stats, 3)
    # The host streams' RW packets moved in C with the capture on (when --pcap meant the
    # Python path these were 0). Host -> guest is all C; guest -> host, Python takes what
    # a full host socket cut and what the guest sent while that waited (a slow host reader,
    # or a slow sanitizer build, makes that up to about half).
    assert vm3["c_tx_bytes"] >= len(up) // 4, vm3
    assert vm3["c_rx_bytes"] >= len(down) // 2, vm3
    assert stats["capture"]["frames_dropped"] == 0, stats
    frames = _frames(pcap)
    assert len(frames) >= stats["capture"]["frames"]
    _check_headers(frames)
    assert sha(_stream(frames, (3, ports["g"]), (2, 5000))) == sha(up)
    assert sha(_stream(frames, (2, ports["gc_peer"]), (3, 6000))) == sha(down)
    assert sha(_stream(frames, (3, ports["ga"]), (4, 7000))) == sha(a_to_b)
    assert sha(_stream(frames, (4, 7000), (3, ports["ga"]))) == sha(b_to_a)
    # one record per packet: a sibling's packet is captured once, not at both VMs
    ops = [(hdr["op"], hdr["src_cid"], hdr["dst_cid"]) for _, hdr, _, _ in frames]
    assert ops.count((Op.REQUEST, 3, 4)) == 1 and ops.count((Op.RESPONSE, 4, 3)) == 1
    h.close()
    c.close()


def test_vsock_pcap_full_capture_ring_drops_frames_not_stream_bytes(sockdir):
    """--pcap - into a pipe nobody reads: the writer blocks, the 64 KiB ring fills, and
    frames are dropped from the capture only; the streams stay whole and in C, the drops
    are counted, and what the pipe finally gets is valid pcap."""
    sock, uds = os.path.join(sockdir, "vm.sock"), os.path.join(sockdir, "vm.vsock")
    log_path = os.path.join(sockdir, "vsock.log")
    r, w = os.pipe()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "vhost_user.backends.vsock", "-v", "--guest-cid", "3",
                                 "--socket", sock, "--uds-path", uds, "--pcap", "-",
                                 "--capture-buffer", "64K"], stdout=w, stderr=log)
    os.close(w)
    bp = BackendProcess.adopt(proc, sock, log_path)
    chunks: list[bytes] = []
    drain = threading.Thread(target=lambda: chunks.extend(iter(lambda: os.read(r, 1 << 20), b"")))
    try:
        wait_for_socket(sock, proc, log_path=log_path)
        listener = host_listener(uds + "_5000")
        up, down = os.urandom(3 * MiB), os.urandom(2 * MiB)
        with VsockDriver.attach(sock) as drv:
            g, gc, h, c = _host_stream(drv, listener, uds, up, down)
            stats = bp.log_stats()
            g.close()
            gc.close()
        vm3 = _vm(stats, 3)
        assert stats["capture"]["frames_dropped"] > 0, stats
        assert vm3["c_tx_bytes"] >= len(up) // 4 and vm3["c_rx_bytes"] >= len(down) // 2, vm3
        assert "capture: " in bp.log() and "frame(s) dropped" in bp.log()
        drain.start()  # now read: the writer unblocks and SIGTERM finishes the file
        assert bp.stop() == 0
    finally:
        bp.stop()
        if not drain.is_alive() and not chunks:
            drain.start()
        drain.join(20)
        os.close(r)
    path = os.path.join(sockdir, "cut.pcap")
    with open(path, "wb") as f:
        f.write(b"".join(chunks))
    frames = _frames(path)  # scapy reads every record: whole records only
    assert stats["capture"]["frames"] <= len(frames) < stats["capture"]["frames"] + 1000
    _check_headers(frames)


def test_vsock_pcap_snaplen_cuts_frames_and_keeps_the_original_length(sockdir, vsock_proc):
    sock, uds = os.path.join(sockdir, "vm.sock"), os.path.join(sockdir, "vm.vsock")
    pcap = os.path.join(sockdir, "snap.pcap")
    bp = vsock_proc("--guest-cid", "3", "--socket", sock, "--uds-path", uds, "--pcap", pcap,
                    "--capture-snaplen", "100", wait_for=sock)
    listener = host_listener(uds + "_5000")
    data = os.urandom(256 << 10)
    with VsockDriver.attach(sock) as drv:
        g = drv.connect(5000)
        h, _ = listener.accept()
        h.settimeout(20)
        g.send(data)
        assert recv_all(h, len(data)) == data
        g.close()
    bp.stop()
    frames = _frames(pcap)
    _check_headers(frames, snaplen=100)
    rw = [(payload, wirelen) for _, hdr, payload, wirelen in frames if hdr["op"] == Op.RW]
    assert sum(w - 76 for _, w in rw) == len(data)   # original lengths kept
    assert all(len(p) == 100 - 76 for p, w in rw)    # each cut to 100 bytes
    with open(pcap, "rb") as f:
        assert struct.unpack("=IHHiIII", f.read(24))[5] == 100  # snaplen in the file header


def test_vsock_pcap_of_the_c_path_is_dissected_by_tshark(sockdir, vsock_proc):
    tshark = require_tool("tshark")
    sock, uds = os.path.join(sockdir, "vm.sock"), os.path.join(sockdir, "vm.vsock")
    pcap = os.path.join(sockdir, "c.pcap")
    bp = vsock_proc("--guest-cid", "3", "--socket", sock, "--uds-path", uds, "--pcap", pcap, wait_for=sock)
    listener = host_listener(uds + "_5000")
    up, down = os.urandom(MiB), os.urandom(MiB)
    with VsockDriver.attach(sock) as drv:
        g, gc, h, c = _host_stream(drv, listener, uds, up, down)
        stats = bp.log_stats()
        g.close()
        gc.close()
    bp.stop()
    assert _vm(stats, 3)["c_tx_packets"] > 0 and _vm(stats, 3)["c_rx_packets"] > 0, stats
    fields = ("vsock.op", "vsock.virtio.op", "vsock.virtio.len", "frame.len", "_ws.malformed")
    out = subprocess.run([tshark, "-r", pcap, "-T", "fields", "-E", "occurrence=f"]
                         + [a for f in fields for a in ("-e", f)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = [dict(zip(fields, line.split("\t"))) for line in out.stdout.splitlines()]
    assert len(rows) == len(_frames(pcap))
    assert not any(row["_ws.malformed"] for row in rows), "tshark found malformed frames"
    assert all(int(row["frame.len"]) == 76 + int(row["vsock.virtio.len"]) for row in rows)
    rw = [row for row in rows if row["vsock.virtio.op"] == "5"]
    assert all(row["vsock.op"] == "4" for row in rw)  # af_vsockmon: payload
    assert sum(int(row["vsock.virtio.len"]) for row in rw) == len(up) + len(down)


def test_vsock_credit_updates_of_a_guest_stream_are_written_by_c_and_captured(sockdir, vsock_proc):
    """Guest -> host at the default 256 KiB window: the credit updates the guest needs
    come from the tx thread's C path (no trip through Python) while the host reader
    keeps up; Python sends the rest (after a short write to the host socket). Each
    is a whole CREDIT_UPDATE in the capture carrying our window; no byte is lost."""
    sock, uds = os.path.join(sockdir, "vm.sock"), os.path.join(sockdir, "vm.vsock")
    pcap = os.path.join(sockdir, "credit.pcap")
    bp = vsock_proc("--guest-cid", "3", "--socket", sock, "--uds-path", uds, "--pcap", pcap, wait_for=sock)
    listener = host_listener(uds + "_5000")
    up = os.urandom(8 * MiB)
    with VsockDriver.attach(sock) as drv:
        g, h, got = guest_stream_to_host(drv, listener, 5000, up)
        stats = _vm(bp.log_stats(), 3)
        g.close()
    bp.stop()
    assert got == up
    assert stats["c_credit_updates"] > 0, stats
    frames = _frames(pcap)
    _check_headers(frames)  # C's control frames are vsockmon CONTROL records
    updates = [hdr for _, hdr, _, _ in frames
               if hdr["op"] == Op.CREDIT_UPDATE and hdr["src_cid"] == 2 and hdr["dst_port"] == g.local_port]
    assert len(updates) == stats["c_credit_updates"] + stats["py_credit_updates"], stats
    assert all(u["buf_alloc"] == 256 << 10 and u["len"] == 0 for u in updates)
    assert [u["fwd_cnt"] for u in updates] == sorted(u["fwd_cnt"] for u in updates)
