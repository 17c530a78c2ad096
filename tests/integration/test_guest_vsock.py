"""vhost-user-vsock under real Linux guests (QEMU 10, vhost-user-vsock-pci, socat in the guest).

Each test boots its guests once: 64 MiB each way between a guest and host
programs on the hybrid-vsock Unix sockets (sha256 on both sides), two
guests of one group talking through the same back-end process, and the
capture of that session dissected by tshark.
"""

from __future__ import annotations

import hashlib
import os
import subprocess

import pytest

from harness.fixtures import require_tool
from vsock_proc import (WAIT_VSOCK, add_guest_vsock, connect_when_listening, guest_vsock_backend,
                        hash_one_connection)

pytestmark = pytest.mark.guest

MiB = 1 << 20
BIG = 64 * MiB



def _guest_value(result, label: str) -> str:
    for line in result.lines:
        if line.startswith(label + " "):
            return line.split()[1]
    raise AssertionError(f"guest printed no {label!r} line:\n{result.output}")


def _host_connect_and_send(uds: str, port: int, data: bytes, timeout: float = 120) -> bytes:
    """CONNECT <port> until the guest listens (an early try is refused), then send `data`."""
    s, line = connect_when_listening(uds, port, timeout=timeout)
    s.sendall(data)
    s.close()
    return line


def test_guest_vsock_64mib_each_way_with_host_programs(guest_vm, short_tmp, tmp_path):
    require_tool("socat")
    uds = str(short_tmp / "vm3.vsock")
    sock = short_tmp / "vm3.sock"
    backend = guest_vsock_backend(sock, tmp_path / "vsock.log", "--guest-cid", "3",
                                  "--socket", str(sock), "--uds-path", uds)
    try:
        received: dict = {}
        listener = hash_one_connection(uds + "_5000", received)
        vm = guest_vm(cpus=1, memory_mb=512)
        add_guest_vsock(vm, backend.socket)
        vm.start(WAIT_VSOCK + f"""
            set -e
            dd if=/dev/urandom of=/tmp/p bs=1M count={BIG // MiB} 2>/dev/null
            echo "up $(sha256sum < /tmp/p | cut -d' ' -f1)"
            socat -u FILE:/tmp/p VSOCK-CONNECT:2:5000
            rm /tmp/p
            vhu_mark listening
            socat -u VSOCK-LISTEN:5001 STDOUT | sha256sum | cut -d' ' -f1 > /tmp/down
            echo "down $(cat /tmp/down)"
        """)
        down = os.urandom(BIG)
        vm.wait_for_marker("listening", timeout=240)
        line = _host_connect_and_send(uds, 5001, down)
        result = vm.wait(timeout=240)
        listener.join(30)
        assert received.get("bytes") == BIG, backend.log_tail()
        assert received["sha"] == _guest_value(result, "up")
        assert int(line[3:]) >= 1024  # the assigned host port
        assert _guest_value(result, "down") == hashlib.sha256(down).hexdigest()
    finally:
        backend.stop()


def test_guest_vsock_two_guests_in_one_group_and_pcap(guest_vm, short_tmp, tmp_path):
    require_tool("socat")
    tshark = require_tool("tshark")
    pcap = tmp_path / "guests.pcap"
    socks = {cid: short_tmp / f"vm{cid}.sock" for cid in (3, 4)}
    backend = guest_vsock_backend(
        short_tmp / "vm4.sock", tmp_path / "vsock.log",
        "--vm", f"guest-cid=3,socket={socks[3]},groups=team",
        "--vm", f"guest-cid=4,socket={socks[4]},groups=team",
        "--pcap", str(pcap))
    try:
        a, b = guest_vm(cpus=1, memory_mb=256), guest_vm(cpus=1, memory_mb=256)
        add_guest_vsock(a, socks[3])
        add_guest_vsock(b, socks[4])
        a.start(WAIT_VSOCK + """
            socat -u VSOCK-LISTEN:7000 STDOUT | sha256sum | cut -d' ' -f1 > /tmp/got
            echo "got $(cat /tmp/got)"
        """)
        b.start(WAIT_VSOCK + """
            dd if=/dev/urandom of=/tmp/p bs=1M count=4 2>/dev/null
            echo "sent $(sha256sum < /tmp/p | cut -d' ' -f1)"
            n=0
            until socat -u FILE:/tmp/p VSOCK-CONNECT:3:7000 2>/dev/null; do
                n=$((n + 1)); [ "$n" -gt 300 ] && { echo "never connected"; exit 1; }; sleep 0.2
            done
        """)
        rb = b.wait(timeout=240)
        ra = a.wait(timeout=240)
        assert _guest_value(ra, "got") == _guest_value(rb, "sent")
    finally:
        backend.stop()
    out = subprocess.run([tshark, "-r", str(pcap), "-V", "-c", "400"], capture_output=True, text=True,
                         timeout=120).stdout
    for field in ("Source cid: 4", "Destination cid: 3", "Destination port: 7000",
                  "Operation: Request (1)", "Operation: Response (2)", "Operation: RW (5)",
                  "Op: Connect", "Op: Payload"):
        assert field in out, field
