"""`vhost-user-bench gpu`: both update modes do the work they claim, on ours and QEMU's."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from vhost_user.backends.gpu.driver import BLOB_FEATURES, GpuDriver
from vhost_user.backends.gpu.display_protocol import GpuRequest as G

from .conftest import start_gpu

W, H = 64, 48


def _guest_rgb(drv: GpuDriver, backing) -> np.ndarray:
    """What the guest's B8G8R8X8 pages hold, as the listener's RGB image."""
    raw = np.concatenate([np.frombuffer(drv.fe.ram.read(e.addr, e.length), np.uint8)
                          for e in backing.entries]).reshape(H, W, 4)
    return raw[:, :, 2::-1]


def test_blob_flush_cycles_show_the_guest_pages_without_a_transfer(gpu_backend):
    bp = gpu_backend("ours")
    drv = GpuDriver.connect(bp.socket, outputs=[(W, H)], features=BLOB_FEATURES)
    try:
        backing = drv.setup_blob_frame(1, W, H)
        assert drv.listener.wait_for(G.UPDATE, 1)
        drv.write_backing(backing, np.random.default_rng(7).integers(0, 256, W * H * 4, np.uint8))
        assert drv.flush_cycles(1, W, H, 3) == 0
        assert drv.listener.wait_for(G.UPDATE, 4)
        assert np.array_equal(drv.listener.rgb(0), _guest_rgb(drv, backing))
    finally:
        drv.close()
    assert "scanout 0 shows blob 1" in bp.log()


def test_bench_runs_each_mode_side_by_side_with_qemus_backend(sockdir):
    procs = [start_gpu(sockdir, "qemu"), start_gpu(sockdir, "ours", name="t"),
             start_gpu(sockdir, "ours", name="b")]
    try:
        out = subprocess.run(
            [sys.executable, "-m", "vhost_user.frontend.bench", "gpu", "--json",
             "--width", str(W), "--height", str(H), "--runtime", "0.6", "--rounds", "2",
             *[a for p, label, mode in zip(procs, ("qemu", "ours", "ours-blob"),
                                           ("transfer", "transfer", "blob"))
               for a in ("--socket", p.socket, "--pid", str(p.pid), "--label", label,
                         "--mode", mode)]],
            capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        rows = [json.loads(line) for line in out.stdout.splitlines()]
        assert [(r["label"], r["mode"]) for r in rows] == [
            ("qemu", "transfer"), ("ours", "transfer"), ("ours-blob", "blob")]
        for r in rows:
            assert r["errors"] == 0 and r["cycles"] > 0 and r["cpu_ms_per_cycle"] > 0
        assert "scanout 0 shows blob 1" in procs[2].log()
        assert "shows blob" not in procs[1].log()
    finally:
        for p in procs:
            p.stop()


def test_bench_says_when_modes_outnumber_sockets(capsys):
    from vhost_user.frontend.bench import main
    assert main(["gpu", "--socket", "/nonexistent", "--mode", "blob", "--mode", "blob"]) == 2
    assert capsys.readouterr().err.strip() == (
        "vhost-user-bench: error: --mode: one per --socket at most")

