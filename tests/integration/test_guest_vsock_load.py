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

Every connection is open before any byte flows (each sender's data waits
for a go the host gives once the receiver is paused), so the pause always
meets 64 senders with a full window each. Should a guest connect still time
out in the sender's kernel (Linux's two-second vsock connect timeout), the
receiver later accepts that request and gets the sender's reset, an empty
stream, and the sender retries on a new connection: that is the guest
kernel's doing, not the back-end's (kernel vhost-vsock shows the same), so
empty streams are counted and must not outnumber the retries, and every
non-empty stream must match one the sender sent.
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
from vsock_proc import WAIT_VSOCK, connect_when_listening

pytestmark = pytest.mark.guest

STREAMS = 64
CHUNKS = 8          # x 64 KiB = 512 KiB per stream
PER_STREAM = CHUNKS * 64 * 1024
EMPTY = hashlib.sha256(b"").hexdigest()
GO_PORT = 7990     # host -> sender: the receiver is paused, send
DONE_PORT = 7998   # receiver -> sender: every stream arrived, power off

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
# a stream's file exists from its accept on; it holds a line once the stream ended
opened() {{ ls /tmp/r/ 2>/dev/null | grep -c "^$1\\."; }}
n=0
while [ "$(opened g)" -lt {STREAMS} ] || [ "$(opened h)" -lt {STREAMS} ]; do
    n=$((n + 1)); [ "$n" -gt 1500 ] && {{ echo "timeout: $(opened g) guest, $(opened h) host accepts"; break; }}
    sleep 0.1
done
vhu_mark accepted
# streams that carried data (an empty one is a timed-out connect, see above)
lines() {{ cat /tmp/r/$1.* 2>/dev/null | grep -vc '^{EMPTY} '; }}
n=0
while [ "$(lines g)" -lt {STREAMS} ] || [ "$(lines h)" -lt {STREAMS} ]; do
    n=$((n + 1)); [ "$n" -gt 1500 ] && {{ echo "timeout: $(lines g) guest, $(lines h) host streams"; break; }}
    sleep 0.1
done
kill $L1 $L2 $L3 2>/dev/null
# tell the sender every stream ended here: it may power off now (before that,
# its kernel may still hold bytes its programs wrote and closed)
timeout 60 socat -u VSOCK-LISTEN:{DONE_PORT} /dev/null
for f in /tmp/r/g.*; do echo "g $(cut -d' ' -f1 < $f)"; done
for f in /tmp/r/h.*; do echo "h $(cut -d' ' -f1 < $f)"; done
"""

# Each sender connects, then opens its FIFO, which blocks until the data is
# written into it: every connection is open before any byte flows. The host
# says go (by accepting on GO_PORT) once the receiver is paused.
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
    # connect first, then open the FIFO (it blocks until the go below);
    # a connect that times out sent nothing: try again
    mkfifo /tmp/f$i
    (until socat -U VSOCK-CONNECT:3:7000 OPEN:/tmp/f$i 2>/dev/null; do
        echo "retry $i"; sleep 0.5
     done) &
    i=$((i + 1))
done
n=0
until socat -u /dev/null VSOCK-CONNECT:2:{GO_PORT} 2>/dev/null; do
    n=$((n + 1)); [ "$n" -gt 3000 ] && {{ echo "never told to send"; exit 1; }}; sleep 0.1
done
i=0
while [ $i -lt {STREAMS} ]; do
    cat /tmp/s/$i > /tmp/f$i &
    i=$((i + 1))
done
wait
echo sent
n=0
until socat -u /dev/null VSOCK-CONNECT:3:{DONE_PORT} 2>/dev/null; do
    n=$((n + 1)); [ "$n" -gt 600 ] && {{ echo "the receiver never confirmed"; exit 1; }}; sleep 0.2
done
"""


def _values(result, label: str) -> list[str]:
    return sorted(line.split()[1] for line in result.lines if line.startswith(label + " "))


def _host_stream(uds: str, port: int, data: bytes, go: threading.Event, errors: list) -> None:
    """A host program: CONNECT to the guest's port (retry until it listens), then send
    `data` once `go` is set."""
    try:
        s, _ = connect_when_listening(uds, port, timeout=120, sock_timeout=180)
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
    uds_b = str(short_tmp / "vm4.vsock")
    argv = [sys.executable, "-m", "vhost_user.backends.vsock", "-v",
            "--vm", f"guest-cid=3,socket={socks[3]},uds-path={uds},groups=team",
            "--vm", f"guest-cid=4,socket={socks[4]},uds-path={uds_b},groups=team"]
    go_listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    go_listener.bind(f"{uds_b}_{GO_PORT}")
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
        # every connection open, no byte sent yet: pause the receiver, then let all send
        a.wait_for_marker("accepted", timeout=300)
        a.qmp("stop")     # the receiver stops: its queues stop, nothing is read
        go_listener.listen(1)
        go.set()
        log = backend.log_path
        deadline = time.monotonic() + 120
        while "its senders wait (back-pressure" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1)     # the senders sit on a full relay queue a while
        a.qmp("cont")
        rb = b.wait(timeout=300)
        ra = a.wait(timeout=300)
        for w in writers:
            w.join(60)
        assert not errors, errors
        assert "never" not in rb.output, rb.output
        assert "timeout" not in ra.output, ra.output + backend.log_tail()
        received = _values(ra, "g")
        empty = received.count(EMPTY)
        retries = rb.output.count("retry ")
        assert empty <= retries, f"{empty} empty guest streams but only {retries} connect retries"
        assert [h for h in received if h != EMPTY] == _values(rb, "s"), \
            "a guest-to-guest stream lost or changed bytes"
        assert _values(ra, "h") == sorted(hashlib.sha256(d).hexdigest() for d in host_data), \
            "a host-to-guest stream lost or changed bytes"
        log = backend.log_path.read_text()
        assert "breaks the credit" not in log and "ignores credit" not in log, backend.log_tail()
        assert "its senders wait (back-pressure" in log, "the pause never filled the relay queue"
    finally:
        go_listener.close()
        backend.stop()
