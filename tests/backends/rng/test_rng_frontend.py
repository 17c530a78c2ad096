"""vhost-user-rng through the built-in front-end (backends/rng/driver.py).

Entropy arrives in every buffer the driver posts; a --rng-source file is
passed through byte for byte; a rate limit holds the guest back (buffers
wait in the ring, none is lost or returned empty) and the SIGUSR1 line
counts it; bad options are one line each.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from backends_proc import spawn
from vhost_user.backends.rng.driver import RngDriver


def _start(tmp_path, *args: str, name: str = "rng"):
    sock = str(tmp_path / f"{name}.sock")
    argv = [sys.executable, "-m", "vhost_user.backends.rng", "--socket", sock, "-v", *args]
    return spawn(argv, sock, str(tmp_path / f"{name}.log")), sock


def _stats(proc, log_path) -> dict:
    mark = len(open(log_path).read())
    os.kill(proc.proc.pid, signal.SIGUSR1)
    for _ in range(200):
        for line in open(log_path).read()[mark:].splitlines():
            if " stats {" in line:
                return next(iter(json.loads(line.split(" stats ", 1)[1]).values()))
        time.sleep(0.025)
    raise AssertionError("no stats line")


def test_rng_fills_every_posted_buffer_with_entropy(tmp_path):
    proc, sock = _start(tmp_path)
    try:
        with RngDriver.connect(sock, queue_size=256, buf_size=256) as drv:
            assert drv.post(256) == 256
            got: list[bytes] = []
            while len(got) < 256:
                more = drv.reap(10)
                assert more, "the back-end stopped answering"
                got += more
            assert all(len(b) == 256 for b in got)
            blob = b"".join(got)
            assert len(set(blob)) == 256 and len(set(got)) == 256  # no value missing, no buffer repeated
            assert drv.read(4096) != drv.read(4096)
        stats = _stats(proc, str(tmp_path / "rng.log"))
        assert stats["requests"] >= 256 + 2 and stats["bytes"] >= 65536 + 8192, stats
    finally:
        proc.stop()


def test_rng_source_file_is_passed_through_in_order(tmp_path):
    data = os.urandom(1 << 16)
    src = tmp_path / "entropy.bin"
    src.write_bytes(data)
    proc, sock = _start(tmp_path, "--rng-source", str(src))
    try:
        with RngDriver.connect(sock, buf_size=100) as drv:
            assert drv.read(50_000) == data[:50_000]
    finally:
        proc.stop()


def test_rate_limit_holds_buffers_back_without_losing_or_emptying_any(tmp_path):
    proc, sock = _start(tmp_path, "--max-bytes", "1024", "--period", "100")
    try:
        start = time.monotonic()
        with RngDriver.connect(sock, queue_size=64, buf_size=64) as drv:
            drv.post(64)  # 4096 bytes wanted, 1024 allowed per 100 ms
            got: list[bytes] = []
            while len(got) < 64:
                more = drv.reap(10)
                assert more, "rate-limited buffers were never completed"
                got += more
                elapsed = time.monotonic() - start
                # an upper bound only: periods start at least 100 ms apart, so at most
                # elapsed/0.1 + 1 of them began since `start`, plus the one running then
                assert sum(map(len, got)) <= 1024 * (elapsed / 0.1 + 2), (len(got), elapsed)
            assert all(len(b) == 64 for b in got)
        stats = _stats(proc, str(tmp_path / "rng.log"))
        assert stats["rate_limited"] > 0 and stats["bytes"] == 4096, stats
    finally:
        proc.stop()


@pytest.mark.parametrize("args, code, message", [
    (["--rng-source", "{d}/missing"], 1, "{d}/missing: cannot open entropy source: No such file or directory"),
    (["--max-bytes", "-1"], 2, "--max-bytes -1: must be 0 (no limit) or more"),
    (["--period", "0"], 2, "--period 0: must be 1..3600000 milliseconds"),
    (["--queue-size", "3"], 2, "--queue-size 3 must be a power of two in 4..32768"),
])
def test_rng_bad_options_are_one_line(tmp_path, args, code, message):
    d = str(tmp_path)
    argv = [sys.executable, "-m", "vhost_user.backends.rng", "--socket", f"{d}/s",
            *[a.replace("{d}", d) for a in args]]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert out.returncode == code, out.stderr
    lines = out.stderr.strip().splitlines()
    assert "Traceback" not in out.stderr, out.stderr
    if code == 1:
        assert len(lines) == 1, out.stderr
    else:  # argparse's convention: the usage, then the one error line
        assert lines[0].startswith("usage: vhost-user-rng"), out.stderr
    assert lines[-1] == f"vhost-user-rng: error: {message.replace('{d}', d)}", lines
