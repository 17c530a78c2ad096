"""vhost-user-net under real Linux guests: two guests on the switch, and a TAP port.

Each test boots its guests once; the back-end runs with --pcap so the
capture of a real session is checked with tshark too.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.backend import BackendProcess
from harness.fixtures import require_tool
from harness.guestnet import add_net, guest_ip, line_value, ping_until, send_until_acked

pytestmark = pytest.mark.guest

NET = [sys.executable, "-m", "vhost_user.backends.net"]
MAC = ["52:54:00:12:34:%02x" % (i + 1) for i in range(2)]
MiB = 1 << 20


def test_two_guests_ping_and_move_32_mib_over_tcp(guest_vm, short_tmp, tmp_path):
    tshark = require_tool("tshark")
    socks = [short_tmp / "vm0.sock", short_tmp / "vm1.sock"]
    pcap = tmp_path / "session.pcap"
    argv = NET + ["--socket", str(socks[0]), "--socket", str(socks[1]), "--pcap", str(pcap), "-v"]
    backend = BackendProcess(argv, socks[1], tmp_path / "net.log").start()
    try:
        server, client = guest_vm(memory_mb=512), guest_vm(memory_mb=512)
        add_net(server, socks[0], MAC[0])
        add_net(client, socks[1], MAC[1])
        server.start(guest_ip("10.0.0.1") + ping_until("10.0.0.2") + """
            mkfifo /tmp/f; exec 3<>/tmp/f     # stdin that never ends nor sends
            vhu_mark listening
            nc -l -p 5000 <&3 > /tmp/r
            digest=$(sha256sum < /tmp/r | cut -d' ' -f1)
            echo "recv $digest $(wc -c < /tmp/r)"
            # Tell the client (it must not power off with data still unsent).
            echo "$digest" | nc 10.0.0.2 5001
            sleep 2
        """)
        client.start(guest_ip("10.0.0.2") + """
            dd if=/dev/urandom of=/tmp/d bs=1M count=32 2>/dev/null
            echo "sent $(sha256sum < /tmp/d | cut -d' ' -f1)"
        """ + ping_until("10.0.0.1") + send_until_acked("10.0.0.1", 5000, 5001, tries=60, ack_wait=240))
        sent = client.wait(timeout=300)
        got = server.wait(timeout=300)
    finally:
        backend.stop()
    assert "ping 10.0.0.1 ok" in sent.lines, sent.output
    assert "ping 10.0.0.2 ok" in got.lines, got.output
    digest, size = line_value(got, "recv")
    assert int(size) == 32 * MiB
    assert digest == line_value(sent, "sent")[0] == line_value(sent, "ack")[0]
    # The capture of this session shows the ICMP echo requests and replies.
    rows = _icmp_rows(tshark, pcap)
    assert ("10.0.0.2", "10.0.0.1", "8") in rows and ("10.0.0.1", "10.0.0.2", "0") in rows, rows
    assert ("10.0.0.1", "10.0.0.2", "8") in rows and ("10.0.0.2", "10.0.0.1", "0") in rows


@pytest.fixture
def netns():
    """A network namespace of our own (loopback addresses only), removed afterwards."""
    ip = require_tool("ip")
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    name = f"vhu-net-{secrets.token_hex(3)}"
    subprocess.run([ip, "netns", "add", name], check=True)
    try:
        subprocess.run([ip, "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run([ip, "netns", "del", name], check=False)


def _wait_log(path: Path, needle: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and needle in path.read_text(errors="replace"):
            return
        time.sleep(0.1)
    raise AssertionError(f"{needle!r} not in {path}")


def test_guest_reaches_a_tap_port_in_a_namespace(guest_vm, short_tmp, tmp_path, netns):
    ip = require_tool("ip")
    tshark = require_tool("tshark")
    sock = short_tmp / "tap.sock"
    log = tmp_path / "net.log"
    pcap = tmp_path / "tap.pcap"
    # Two queue pairs: QEMU negotiates MQ with the back-end (a 1-vCPU guest uses pair 0).
    argv = [ip, "netns", "exec", netns] + NET + ["--socket", str(sock), "--tap", "vhutap0",
                                                 "--pcap", str(pcap), "--num-queues", "2", "-v"]
    backend = BackendProcess(argv, sock, log).start()
    listener = None
    try:
        _wait_log(log, "TAP vhutap0 joined")
        subprocess.run([ip, "-n", netns, "addr", "add", "10.9.0.1/24", "dev", "vhutap0"], check=True)
        out = tmp_path / "received"
        # The namespace side receives, then tells the guest the digest it got.
        fifo = tmp_path / "fifo"
        script = (f"mkfifo {fifo}; exec 3<>{fifo}; busybox nc -l -p 5001 <&3 > {out}; "
                  f"busybox sha256sum < {out} | cut -d' ' -f1 | busybox nc 10.9.0.2 5002")
        listener = subprocess.Popen([ip, "netns", "exec", netns, "busybox", "sh", "-c", script],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        vm = guest_vm(memory_mb=512)
        add_net(vm, sock, MAC[0], pairs=2)
        result = vm.run(guest_ip("10.9.0.2") + ping_until("10.9.0.1") + """
            echo "mq-bit $(cut -c23 /sys/class/net/eth0/device/features)"
            dd if=/dev/urandom of=/tmp/d bs=1M count=8 2>/dev/null
            echo "sent $(sha256sum < /tmp/d | cut -d' ' -f1)"
        """ + send_until_acked("10.9.0.1", 5001, 5002, tries=30, ack_wait=120), timeout=240)
    finally:
        if listener is not None:
            listener.kill()
            listener.wait()
        backend.stop()
    assert "ping 10.9.0.1 ok" in result.lines, result.output
    # virtio feature bit 22 (VIRTIO_NET_F_MQ) as the guest driver sees it
    assert line_value(result, "mq-bit") == ["1"], result.output
    sent = line_value(result, "sent")[0]
    assert hashlib.sha256(out.read_bytes()).hexdigest() == sent == line_value(result, "ack")[0]
    # Both directions crossed the switch: the guest's echo requests and the host's replies.
    rows = _icmp_rows(tshark, pcap)
    assert ("10.9.0.2", "10.9.0.1", "8") in rows and ("10.9.0.1", "10.9.0.2", "0") in rows, rows


def _icmp_rows(tshark: str, pcap: Path) -> set[tuple[str, ...]]:
    out = subprocess.run([tshark, "-r", str(pcap), "-Y", "icmp", "-T", "fields",
                          "-e", "ip.src", "-e", "ip.dst", "-e", "icmp.type"],
                         capture_output=True, text=True, timeout=120)
    return {tuple(line.split("\t")) for line in out.stdout.splitlines()}


def test_tap_offloads_are_resolved_for_a_guest_without_them(guest_vm, short_tmp, tmp_path, netns):
    """The host stack sends TSO frames with partial checksums through the TAP; a guest
    that negotiated neither gets MSS-sized segments with full checksums from the switch."""
    ip = require_tool("ip")
    sock = short_tmp / "tap.sock"
    log = tmp_path / "net.log"
    argv = [ip, "netns", "exec", netns] + NET + ["--socket", str(sock), "--tap", "vhutap1", "-v"]
    backend = BackendProcess(argv, sock, log).start()
    data = tmp_path / "data"
    data.write_bytes(os.urandom(8 * MiB))
    try:
        _wait_log(log, "TAP vhutap1 joined")
        subprocess.run([ip, "-n", netns, "addr", "add", "10.9.1.1/24", "dev", "vhutap1"], check=True)
        vm = guest_vm(memory_mb=512)
        vm.add_args("-chardev", f"socket,id=n0,path={sock}",
                    "-netdev", "vhost-user,id=net0,chardev=n0",
                    "-device", f"virtio-net-pci,netdev=net0,mac={MAC[1]},guest_csum=off,"
                               "guest_tso4=off,guest_tso6=off,guest_ecn=off")
        vm.start(guest_ip("10.9.1.2") + ping_until("10.9.1.1") + """
            echo "guest-tso4-bit $(cut -c8 /sys/class/net/eth0/device/features)"
            mkfifo /tmp/f; exec 3<>/tmp/f
            vhu_mark listening
            nc -l -p 5003 <&3 > /tmp/in
            echo "in $(sha256sum < /tmp/in | cut -d' ' -f1) $(wc -c < /tmp/in)"
        """)
        vm.wait_for_marker("listening", timeout=120)
        subprocess.run([ip, "netns", "exec", netns, "busybox", "sh", "-c",
                        f"for i in $(seq 1 30); do busybox nc 10.9.1.2 5003 < {data} && break; "
                        "sleep 1; done"], check=True, timeout=120)
        result = vm.wait(timeout=180)
        os.kill(backend.pid, signal.SIGUSR1)
        _wait_log(log, " stats {")
    finally:
        backend.stop()
    assert line_value(result, "guest-tso4-bit") == ["0"], result.output
    assert line_value(result, "in") == [hashlib.sha256(data.read_bytes()).hexdigest(), str(8 * MiB)]
    stats_line = [l for l in log.read_text().splitlines() if " stats {" in l][-1]
    stats = json.loads(stats_line.split(" stats ", 1)[1])
    guest_port = next(v for k, v in stats.items() if k.endswith(f"({sock})"))
    assert guest_port["segmented"] > 0 and guest_port["csum_resolved"] > 0, guest_port


def test_guest_moves_traffic_on_four_queue_pairs_and_sees_host_mtu(guest_vm, short_tmp, tmp_path, netns):
    """QEMU keeps the control queue (ethtool -L goes to QEMU, which enables the four
    pairs with SET_VRING_ENABLE); the back-end offers VIRTIO_NET_F_MTU, so host_mtu=
    reaches the guest and NET_SET_MTU the switch. TCP flows from the guest (XPS off,
    so the guest hashes them over its tx queues) and their replies from a TAP port
    (the switch hashes those over the guest's rx queues) cross every pair."""
    ip = require_tool("ip")
    socat = require_tool("socat")
    sock = short_tmp / "mq.sock"
    log = tmp_path / "net.log"
    argv = [ip, "netns", "exec", netns] + NET + ["--socket", str(sock), "--tap", "vhutap2",
                                                 "--num-queues", "4", "-v"]
    backend = BackendProcess(argv, sock, log).start()
    listener = None
    try:
        _wait_log(log, "TAP vhutap2 joined")
        subprocess.run([ip, "-n", netns, "addr", "add", "10.9.2.1/24", "dev", "vhutap2"], check=True)
        listener = subprocess.Popen([ip, "netns", "exec", netns, socat,
                                     "TCP-LISTEN:5001,reuseaddr,fork", "SYSTEM:echo ok"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        vm = guest_vm(memory_mb=512)
        vm.add_args("-chardev", f"socket,id=n0,path={sock}",
                    "-netdev", "vhost-user,id=net0,chardev=n0,queues=4",
                    "-device", f"virtio-net-pci,netdev=net0,mac={MAC[0]},mq=on,vectors=10,host_mtu=9000")
        vm.start(guest_ip("10.9.2.2") + """
            echo "mtu $(cat /sys/class/net/eth0/mtu)"
            ethtool -L eth0 combined 4
            echo "combined $(ethtool -l eth0 | grep -i combined | tail -1 | tr -dc 0-9)"
            for f in /sys/class/net/eth0/queues/tx-*/xps_cpus; do echo 0 > $f; done
        """ + ping_until("10.9.2.1") + """
            busy() {   # every rx and tx queue has moved packets
                for q in 0 1 2 3; do
                    for d in rx tx; do
                        n=$(ethtool -S eth0 | grep " ${d}_queue_${q}_packets:" | awk '{print $2}')
                        [ "${n:-0}" -gt 0 ] || return 1
                    done
                done
            }
            for i in $(seq 1 200); do
                echo hi | socat -t2 - TCP:10.9.2.1:5001 > /dev/null
                busy && break
            done
            echo "flows $i"
            ethtool -S eth0 | grep -E '_queue_[0-3]_packets:' | tr -d ' ' | sed 's/^/qstat /'
            vhu_mark counted
            socat -u TCP-LISTEN:5003 - > /dev/null    # until the host has read its counters
        """)
        vm.wait_for_marker("counted", timeout=180)
        os.kill(backend.pid, signal.SIGUSR1)   # while the guest's session is live
        _wait_log(log, " stats {")
        subprocess.run([ip, "netns", "exec", netns, socat, "-u", "OPEN:/dev/null",
                        "TCP:10.9.2.2:5003,retry=30"], check=True, timeout=60)
        result = vm.wait(timeout=60)
    finally:
        if listener is not None:
            listener.kill()
            listener.wait()
        backend.stop()
    assert line_value(result, "mtu") == ["9000"], result.output
    assert line_value(result, "combined") == ["4"], result.output
    guest = dict(l.split()[1].split(":") for l in result.lines if l.startswith("qstat "))
    assert all(int(guest[f"{d}_queue_{q}_packets"]) > 0 for q in range(4) for d in ("rx", "tx")), guest
    text = log.read_text()
    assert "MTU 9000 (NET_SET_MTU)" in text
    stats = json.loads([l for l in text.splitlines() if " stats {" in l][-1].split(" stats ", 1)[1])
    port = next(v for k, v in stats.items() if k.endswith(f"({sock})"))
    assert port["mtu"] == 9000 and port["ctrl_commands"] == 0, port   # QEMU kept the control queue
    # The back-end's own per-queue counters: each of the 8 rings carried chains.
    assert all(port["queues"][str(i)]["requests"] > 0 for i in range(8)), port["queues"]
