"""vhost-user-net killed and restarted under a TCP stream between two real guests.

Both QEMUs reconnect (`reconnect-ms`), so every SIGKILL is a back-end crash
the monitor recovers from: it restores the rings from the guest's used index
and the new back-end takes them from there. Frames in flight at the kill are
lost, as on a cable pulled and plugged back; TCP retransmits them, so the
stream must arrive whole, every byte checked (sha256 on both sides). The kill
count goes into the test output (RELIABILITY.md quotes it).
"""

from __future__ import annotations

import random
import sys
import threading

import pytest

from harness.backend import BackendProcess
from harness.guestnet import add_net, guest_ip, line_value, ping_until

pytestmark = pytest.mark.guest

NET = [sys.executable, "-m", "vhost_user.backends.net"]
MAC = ["52:54:00:12:35:%02x" % (i + 1) for i in range(2)]
STREAM_MB = 8


def test_tcp_between_guests_survives_backend_kills(guest_vm, short_tmp, tmp_path):
    socks = [short_tmp / "n0.sock", short_tmp / "n1.sock"]
    argv = NET + ["--socket", str(socks[0]), "--socket", str(socks[1]), "-v"]
    backend = BackendProcess(argv, socks[1], tmp_path / "net.log").start()
    kills = 0
    try:
        server, client = guest_vm(memory_mb=384), guest_vm(memory_mb=384)
        add_net(server, socks[0], MAC[0], reconnect_ms=100)
        add_net(client, socks[1], MAC[1], reconnect_ms=100)
        server.start(guest_ip("10.0.1.1") + ping_until("10.0.1.2", confirm=False) + """
            mkfifo /tmp/f; exec 3<>/tmp/f
            nc -l -p 5000 <&3 > /tmp/r
            echo "recv $(sha256sum < /tmp/r | cut -d' ' -f1) $(wc -c < /tmp/r)"
            vhu_mark received
            echo done | nc 10.0.1.2 5001
            sleep 2
        """)
        client.start(guest_ip("10.0.1.2") + f"""
            dd if=/dev/urandom of=/tmp/d bs=1M count={STREAM_MB} 2>/dev/null
            echo "sent $(sha256sum < /tmp/d | cut -d' ' -f1)"
        """ + ping_until("10.0.1.1", confirm=False) + f"""
            mkfifo /tmp/f; exec 3<>/tmp/f
            nc -l -p 5001 <&3 > /tmp/ack &
            vhu_mark sending
            # paced (a MiB a second: at least 8 s, while the third kill comes
            # 5-6 s in) so that the kills land inside the stream however fast
            # the switch moves it
            (for i in $(seq 0 {STREAM_MB - 1}); do
                dd if=/tmp/d bs=1M skip=$i count=1 2>/dev/null; sleep 1
             done) | nc 10.0.1.1 5000
            for i in $(seq 1 240); do
                [ -s /tmp/ack ] && break
                sleep 1
            done
        """)
        client.wait_for_marker("sending", timeout=300)
        # SIGKILL and restart every 0.7-2 s until the whole stream arrived.
        received = threading.Event()
        threading.Thread(target=lambda: (server.wait_for_marker("received", timeout=600), received.set()),
                         daemon=True).start()
        rng = random.Random(5)
        while not received.wait(rng.uniform(0.7, 2.0)):
            assert server.running and client.running, server.console_tail() + client.console_tail()
            backend.kill()
            backend.start()
            kills += 1
        got = server.wait(timeout=300)
        sent = client.wait(timeout=300)
    finally:
        backend.stop()
    print(f"net soak: {kills} back-end kills during a {STREAM_MB} MiB TCP stream, every byte checked")
    assert kills >= 3, "the stream ended before the back-end was killed three times"
    digest, size = line_value(got, "recv")
    assert int(size) == STREAM_MB << 20, got.output
    assert digest == line_value(sent, "sent")[0], "the TCP stream changed across back-end restarts"
