"""`vhost-user-bench net` drives two ports of a real back-end (no timing asserted)."""

import json
import subprocess
import sys

BENCH = [sys.executable, "-m", "vhost_user.frontend.bench"]


def test_bench_net_moves_frames_and_reports_both_sizes(net_backend):
    bp = net_backend(2)
    out = subprocess.run(BENCH + ["net", "--pair", ",".join(bp.socks), "--pid", str(bp.pid),
                                  "--runtime", "0.4", "--rounds", "2", "--json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["frame_size"] for r in rows] == [64, 1500]
    for r in rows:
        # A loaded machine may deliver a ring's worth (256) of a slice's frames
        # only after that slice ended; they are counted in the next one.
        assert 0 < r["received"] <= r["sent"] + 256
        assert (r["received"] - 256) * r["frame_size"] <= r["rx_bytes"] <= r["received"] * 1500
        assert r["cpu_s"] > 0
    stats = bp.stats()
    assert stats[1]["rx_frames"] >= sum(r["received"] for r in rows)
    assert stats[0]["tx_frames"] >= sum(r["sent"] for r in rows)
