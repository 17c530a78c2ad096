"""vhost-user-net as users meet it: CLI conventions, pcap capture, SEND_RARP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from scapy.layers.inet import ICMP, IP
from scapy.layers.l2 import ARP, Ether
from scapy.utils import rdpcap

from backends_proc import open_fds, require_tool
from vhost_user.backends.net.driver import NetDriver
from vhost_user.protocol import FrontendRequest as R, ProtocolFeature as PF, U64

NET = [sys.executable, "-m", "vhost_user.backends.net"]
A, B = "02:00:00:00:00:c1", "02:00:00:00:00:c2"


def test_print_capabilities_is_vhost_user_json_net():
    out = subprocess.run(NET + ["--print-capabilities"], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == {"type": "net", "features": []}


def test_print_description_names_installed_binary():
    out = subprocess.run(NET + ["--print-description"], capture_output=True, text=True, check=True)
    desc = json.loads(out.stdout)
    assert desc["type"] == "net" and os.access(desc["binary"], os.X_OK)


def test_missing_socket_is_a_usage_error():
    out = subprocess.run(NET, capture_output=True, text=True)
    assert out.returncode == 2 and "--socket" in out.stderr


def test_features_offered_as_qemu_expects_and_no_config(net_backend):
    bp = net_backend(1)
    with NetDriver.connect(bp.socks[0]) as d:
        fe = d.fe
        for bit in (15, 32, 29, 28, 0, 1, 7, 8, 9, 11, 12):   # MRG_RXBUF, VERSION_1, EVENT_IDX, ...
            assert fe.backend_features >> bit & 1, bit
        assert fe.backend_protocol_features >> PF.RARP & 1
        assert fe.backend_protocol_features >> PF.MQ & 1
        assert not fe.backend_protocol_features >> PF.CONFIG & 1   # QEMU warns if offered
        assert d.hdr_size == 12


def test_sigterm_stops_cleanly_and_removes_sockets(net_backend):
    bp = net_backend(2)
    with NetDriver.connect(bp.socks[0]):
        pass
    assert bp.stop() == 0
    assert not any(os.path.exists(s) for s in bp.socks)


def test_driver_leaks_no_fds(net_backend):
    bp = net_backend(2)
    before = open_fds()
    for _ in range(3):
        with NetDriver.connect(bp.socks[0]) as d:
            d.fill_rx()
    assert open_fds() == before


def test_send_rarp_announces_the_mac_and_teaches_the_switch(net_backend):
    bp = net_backend(2)
    a = NetDriver.connect(bp.socks[0])
    b = NetDriver.connect(bp.socks[1])
    b.fill_rx()
    mac = bytes.fromhex("020000000042")
    a.fe.call(R.SEND_RARP, U64(int.from_bytes(mac, "little")), ack=False)
    ((_, got),) = b.recv()
    pkt = Ether(got)
    assert pkt.type == 0x8035 and pkt.src == "02:00:00:00:00:42" and pkt.dst == "ff:ff:ff:ff:ff:ff"
    assert got[14 + 6:14 + 8] == b"\x00\x03"          # RARP reverse request
    assert got[14 + 8:14 + 14] == mac
    # The switch learnt the MAC on a's port: b's unicast to it is not flooded.
    b.send(bytes(Ether(src=B, dst="02:00:00:00:00:42") / IP() / ICMP()))
    b.wait_tx()
    assert bp.stats()[1]["flooded"] == 0


def _traffic(bp) -> list[bytes]:
    a, b = NetDriver.connect(bp.socks[0]), NetDriver.connect(bp.socks[1])
    a.fill_rx()
    b.fill_rx()
    frames = [bytes(Ether(src=A, dst="ff:ff:ff:ff:ff:ff") / ARP(psrc="10.0.0.1", pdst="10.0.0.2")),
              bytes(Ether(src=A, dst=B) / IP(src="10.0.0.1", dst="10.0.0.2") / ICMP(id=7, seq=1)),
              bytes(Ether(src=B, dst=A) / IP(src="10.0.0.2", dst="10.0.0.1") / ICMP(type=0, id=7, seq=1))]
    a.send(frames[0])
    b.recv()
    a.send(frames[1])
    b.recv()
    b.send(frames[2])
    a.recv()
    a.close()
    b.close()
    return frames


def test_pcap_file_holds_every_switched_frame_for_scapy_and_tshark(net_backend, sockdir):
    tshark = require_tool("tshark")
    path = os.path.join(sockdir, "cap.pcap")
    bp = net_backend(2, "--pcap", path)
    frames = _traffic(bp)
    assert bp.stop() == 0
    assert [bytes(p) for p in rdpcap(path)] == frames
    out = subprocess.run([tshark, "-r", path, "-T", "fields", "-e", "icmp.type"],
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["8", "0"], out.stderr


def test_pcap_to_stdout_streams_valid_pcap(net_backend, sockdir):
    path = os.path.join(sockdir, "stdout.pcap")
    with open(path, "wb") as out:
        bp = net_backend(2, "--pcap", "-", stdout=out)
        frames = _traffic(bp)
        time.sleep(0.2)
        assert bp.stop() == 0
    assert [bytes(p) for p in rdpcap(path)] == frames


def test_capture_overflow_drops_from_the_capture_not_the_switch(net_backend, sockdir):
    # A tiny ring: the capture drops, the data path does not.
    path = os.path.join(sockdir, "small.pcap")
    bp = net_backend(2, "--pcap", path, "--capture-buffer", "2k")
    a, b = NetDriver.connect(bp.socks[0]), NetDriver.connect(bp.socks[1])
    b.fill_rx()
    big = bytes(Ether(src=A, dst="ff:ff:ff:ff:ff:ff") / IP() / (b"z" * 3000))
    a.send(big)
    assert [f for _, f in b.recv()] == [big]
    bp.wait_log("capture: 1 frame(s) dropped")
    a.close()
    b.close()


def test_inherited_listening_fds_serve_ports(sockdir):
    import socket as so

    from harness.backend import BackendProcess

    paths = [os.path.join(sockdir, f"fd{i}.sock") for i in range(2)]
    listeners = []
    for p in paths:
        s = so.socket(so.AF_UNIX, so.SOCK_STREAM)
        s.bind(p)
        s.listen(1)
        listeners.append(s)
    argv = NET + [a for s in listeners for a in ("--fd", str(s.fileno()))] + ["-v"]
    log_path = os.path.join(sockdir, "fd.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=log, pass_fds=[s.fileno() for s in listeners])
    bp = BackendProcess.adopt(proc, paths[0], log_path)
    try:
        for s in listeners:
            s.close()
        a, b = NetDriver.connect(paths[0]), NetDriver.connect(paths[1])
        b.fill_rx()
        frame = bytes(Ether(src=A, dst="ff:ff:ff:ff:ff:ff") / IP() / ICMP())
        a.send(frame)
        assert [f for _, f in b.recv()] == [frame]
        a.close()
        b.close()
    finally:
        assert bp.stop() == 0, open(log_path).read()[-3000:]


@pytest.mark.parametrize("args, needle", [
    (["--mac", "zz:00:00:00:00:01"], "not a MAC address"),
    (["--mac", "02:00:00:00:01"], "not a MAC address"),
    (["--mac", "01:00:5e:00:00:01"], "must be unicast"),
    (["--mtu", "67"], "MTU 67 must be 68..65535"),
    (["--mtu", "65536"], "must be 68..65535"),
    (["--mtu", "big"], "is not a number"),
    (["--port", "socket=/tmp/x,colour=red"], "unknown or malformed item"),
    (["--port", "mac=02:00:00:00:00:01"], "needs one of socket= or fd="),
    (["--port", "socket=/tmp/x,mtu=10"], "must be 68..65535"),
])
def test_bad_mac_or_mtu_is_a_one_line_usage_error(args, needle):
    out = subprocess.run(NET + ["--socket", "/tmp/never.sock"] + args, capture_output=True, text=True)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("vhost-user-net: error: ") and needle in last, out.stderr


def test_mac_for_several_ports_and_duplicate_macs_are_usage_errors(tmp_path):
    a, b = str(tmp_path / "a.sock"), str(tmp_path / "b.sock")
    for extra in (["--socket", a, "--socket", b, "--mac", A],
                  ["--port", f"socket={a},mac={A}", "--port", f"socket={b},mac={A}"]):
        out = subprocess.run(NET + extra, capture_output=True, text=True)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        assert out.stderr.strip().splitlines()[-1].startswith("vhost-user-net: error: ")
    assert not os.path.exists(a) and not os.path.exists(b)


def test_mac_option_names_the_one_port_and_mtu_applies_to_it(net_backend):
    bp = net_backend(1, "--mac", "02-00-00-00-00-c7", "--mtu", "4000")
    with NetDriver.connect(bp.socks[0]) as d:
        assert d.fe.get_config(12) == bytes.fromhex("0200000000c7") + bytes([1, 0, 1, 0]) \
            + (4000).to_bytes(2, "little")
