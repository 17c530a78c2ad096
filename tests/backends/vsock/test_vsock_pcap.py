"""`--pcap`: every packet in both directions, in the vsockmon format tshark dissects."""

from __future__ import annotations

import os
import subprocess

from backends_proc import require_tool
from vhost_user.backends.vsock.packet import HEADER_SIZE, Header, Op
from vhost_user.backends.vsock.pcap import LINKTYPE_VSOCK
from vhost_user.drivers.vsock import VsockDriver
from vsock_proc import host_connect, host_listener, read_line


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
