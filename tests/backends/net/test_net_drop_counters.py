"""Every frame the net back-end drops on purpose is counted in the SIGUSR1 stats line.

A switch drops rather than waits (Ethernet semantics): a port with no rx
buffers posted, and a capture whose writer cannot keep up. Both must show
in the one JSON line every back-end logs on SIGUSR1, and what is delivered
stays intact (the capture holds whole records only).
"""

from __future__ import annotations

import os
import subprocess
import time

from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from vhost_user.backends.net.driver import NetDriver


def test_net_capture_and_rx_drops_show_in_the_sigusr1_line(net_backend):
    # --pcap - into a pipe nobody reads: the writer blocks, the 64 KiB capture ring fills
    r, w = os.pipe()
    try:
        bp = net_backend(2, "--pcap", "-", "--capture-buffer", "64K", stdout=w)
    finally:
        os.close(w)
    try:
        a, b = NetDriver.connect(bp.socks[0]), NetDriver.connect(bp.socks[1])
        frame = bytes(Ether(src="02:00:00:00:00:a1", dst="ff:ff:ff:ff:ff:ff") / IP() / UDP()
                      / (b"x" * 1400))
        # First a pipe's worth in small steps (40 frames is less than the ring), so the
        # drainer is blocked in its write before any drop: the count must still show
        # (it was once read only between writes).
        for _ in range(2):
            for _ in range(40):
                a.send(frame)
            time.sleep(0.3)
        for _ in range(320):  # 560 KB in all through the switch; b never reads, so its ring fills too
            a.send(frame)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            stats = bp.log_stats()
            port_b = next(v for k, v in stats.items() if k.startswith("port 1"))
            if stats.get("capture", {}).get("frames_dropped", 0) and port_b["rx_no_room"]:
                break
            time.sleep(0.2)
        assert stats["capture"]["frames_dropped"] > 0, stats
        assert port_b["rx_no_room"] > 0, stats
        a.close()
        b.close()
    finally:
        t0 = time.monotonic()
        assert bp.stop() == 0  # a capture reader that stopped reading does not hold up SIGTERM
        assert time.monotonic() - t0 < 9, "stop waited for the stuck capture writer"
        os.close(r)
