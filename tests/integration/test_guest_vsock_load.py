"""vhost-user-vsock under load from real Linux guests: nothing lost, whatever the receiver does.

Two guests (QEMU 10, vhost-user-vsock-pci) in one group of one back-end
process. Guest B opens 64 stream connections to guest A at once and host
programs open 64 more to guest A through the hybrid-vsock socket; each
stream carries its own random data. While they flow, guest A is paused
with QMP `stop` (its virtqueues stop: nothing is read) and resumed with
`cont`. Linux's default 256 KiB vsock buffer lets 64 x 256 KiB = 16 MiB
be in flight from guest B alone, twice the relay queue's limit, so the
back-end must hold the senders back instead of dropping anything. Every
stream's sha256 is compared on both sides.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import threading
import time

import pytest

from harness.backend import BackendProcess
from harness.fixtures import require_tool

pytestmark = pytest.mark.guest

STREAMS = 64
CHUNKS = 8          # x 64 KiB = 512 KiB per stream
PER_STREAM = CHUNKS * 64 * 1024

WAIT_VSOCK = """
n=0; while ! grep -q vmw_vsock_virtio_transport /proc/modules; do
    n=$((n + 1)); [ "$n" -gt 100 ] && { echo "no virtio vsock transport"; exit 1; }; sleep 0.1
done
"""

RECEIVER = WAIT_VSOCK + f"""
mkdir -p /tmp/r
socat -u VSOCK-LISTEN:7000,fork,backlog=128 SYSTEM:'sha256sum > /tmp/r/g.$$' &
L1=$!
socat -u VSOCK-LISTEN:6000,fork,backlog=128 SYSTEM:'sha256sum > /tmp/r/h.$$' &
L2=$!
sleep 0.5
socat -u VSOCK-LISTEN:7999 /dev/null &
L3=$!
vhu_mark listening
lines() {{ cat /tmp/r/$1.* 2>/dev/null | wc -l; }}
n=0
while [ "$(lines g)" -lt {STREAMS} ] || [ "$(lines h)" -lt {STREAMS} ]; do
    n=$((n + 1)); [ "$n" -gt 1500 ] && {{ echo "timeout: $(lines g) guest, $(lines h) host streams"; break; }}
    sleep 0.1
done
kill $L1 $L2 $L3 2>/dev/null
sleep 1
for f in /tmp/r/g.*; do echo "g $(cut -d' ' -f1 < $f)"; done
for f in /tmp/r/h.*; do echo "h $(cut -d' ' -f1 < $f)"; done
"""

SENDER = WAIT_VSOCK + f"""
mkdir -p /tmp/s
i=0
while [ $i -lt {STREAMS} ]; do
    dd if=/dev/urandom of=/tmp/s/$i bs=64k count={CHUNKS} 2>/dev/null
    echo "s $(sha256sum < /tmp/s/$i | cut -d' ' -f1)"
    i=$((i + 1))
done
n=0
until socat -u /dev/null VSOCK-CONNECT:3:7999 2>/dev/null; do
    n=$((n + 1)); [ "$n" -gt 600 ] && {{ echo "never connected"; exit 1; }}; sleep 0.2
done
i=0
while [ $i -lt {STREAMS} ]; do
    # a connect that times out (the receiver is paused) sent nothing: try again
    (until socat -u FILE:/tmp/s/$i VSOCK-CONNECT:3:7000 2>/dev/null; do
        echo "retry $i"; sleep 0.5
     done) &
    i=$((i + 1))
done
vhu_mark sending
wait
echo sent
"""


def _values(result, label: str) -> list[str]:
    return sorted(line.split()[1] for line in result.lines if line.startswith(label + " "))


def _host_stream(uds: str, port: int, data: bytes, go: threading.Event, errors: list) -> None:
    """A host program: CONNECT to the guest's port (retry until it listens), then send
    `data` once `go` is set."""
    try:
        deadline = time.monotonic() + 120
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(180)
            s.connect(uds)
            s.sendall(b"CONNECT %d\n" % port)
            line = b""
            while not line.endswith(b"\n"):
                chunk = s.recv(1)
                if not chunk:
                    break
                line += chunk
            if line.startswith(b"OK "):
                break
            s.close()
            if time.monotonic() > deadline:
                raise TimeoutError("guest never listened")
            time.sleep(0.3)
        if not go.wait(300):
            raise TimeoutError("never told to send")
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        s.settimeout(60)
        s.recv(1)  # the guest's close
        s.close()
    except Exception as exc:
        errors.append(exc)


def test_guest_vsock_128_streams_into_a_paused_guest_lose_nothing(guest_vm, short_tmp, tmp_path):
    require_tool("socat")
    socks = {cid: short_tmp / f"vm{cid}.sock" for cid in (3, 4)}
    uds = str(short_tmp / "vm3.vsock")
    argv = [sys.executable, "-m", "vhost_user.backends.vsock", "-v",
            "--vm", f"guest-cid=3,socket={socks[3]},uds-path={uds},groups=team",
            "--vm", f"guest-cid=4,socket={socks[4]},groups=team"]
    backend = BackendProcess(argv, socks[4], tmp_path / "vsock.log").start()
    try:
        a, b = guest_vm(cpus=1, memory_mb=256), guest_vm(cpus=1, memory_mb=384)
        for vm, sock in ((a, socks[3]), (b, socks[4])):
            vm.add_args("-chardev", f"socket,id=vs0,path={sock}",
                        "-device", "vhost-user-vsock-pci,chardev=vs0")
        a.start(RECEIVER)
        b.start(SENDER)
        a.wait_for_marker("listening", timeout=240)
        host_data = [os.urandom(PER_STREAM) for _ in range(STREAMS)]
        errors: list = []
        go = threading.Event()
        writers = [threading.Thread(target=_host_stream, args=(uds, 6000, d, go, errors), daemon=True)
                   for d in host_data]
        for w in writers:
            w.start()
        b.wait_for_marker("sending", timeout=240)
        go.set()
        time.sleep(3)          # connections open, data flowing
        a.qmp("stop")     # the receiver stops: its queues stop, nothing is read
        time.sleep(3)
        a.qmp("cont")
        rb = b.wait(timeout=300)
        ra = a.wait(timeout=300)
        for w in writers:
            w.join(60)
        assert not errors, errors
        assert "fail" not in rb.output, rb.output
        assert "timeout" not in ra.output, ra.output + backend.log_tail()
        assert _values(ra, "g") == _values(rb, "s"), "a guest-to-guest stream lost or changed bytes"
        assert _values(ra, "h") == sorted(hashlib.sha256(d).hexdigest() for d in host_data), \
            "a host-to-guest stream lost or changed bytes"
        log = backend.log_path.read_text()
        assert "breaks the credit" not in log and "ignores credit" not in log, backend.log_tail()
        assert "its senders wait (back-pressure" in log, "the pause never filled the relay queue"
    finally:
        backend.stop()
