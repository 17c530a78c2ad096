"""The C extensions under AddressSanitizer + UndefinedBehaviorSanitizer.

tools/build-sanitized.sh builds them into an overlay (the in-tree build is
left alone); these tests prove the overlay catches a real overflow (a
canary), then run the ring, blk-engine and hostile tests, and the ring,
blk, session, net-header and vsock-packet fuzz targets (the last one
through the C vsock data path), under it with zero reports. The back-end processes the
hostile tests start inherit the overlay and LD_PRELOAD, so the session and
engines in them run sanitized too.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from backends_proc import require_tool

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REPORT_MARKERS = ("ERROR: AddressSanitizer", "runtime error:", "ERROR: LeakSanitizer", "SUMMARY: UndefinedBehavior")


@pytest.fixture(scope="module")
def sanitized(tmp_path_factory):
    gcc = require_tool("gcc")
    libasan = subprocess.run([gcc, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(libasan):
        require_tool("libasan.so (gcc's AddressSanitizer runtime)")
    out = tmp_path_factory.mktemp("sanitized")
    build = subprocess.run(["bash", os.path.join(REPO, "tools", "build-sanitized.sh"), str(out)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-4000:]
    env = dict(os.environ, LD_PRELOAD=libasan, VHOST_USER_SANITIZED_DIR=str(out),
               PYTHONPATH=str(out) + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""),
               ASAN_OPTIONS="detect_leaks=0:halt_on_error=1",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
    return env


def _run(env, argv, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _reports(proc) -> list[str]:
    text = proc.stdout + proc.stderr
    return [line for line in text.splitlines() if any(m in line for m in REPORT_MARKERS)]


def test_sanitized_overlay_is_loaded_and_catches_an_overflow(sanitized):
    canary = textwrap.dedent("""
        import vhost_user._native
        print("loaded", vhost_user._native.__file__)
        from ringlayout import GuestRam, SplitRing
        from vhost_user.virtqueue import Virtqueue, ffi
        ram = GuestRam([(0, 1 << 20)])
        ring = SplitRing(ram, 8)
        vq = Virtqueue(0)
        ring.setup(vq)
        vq.start(ram.memory(), None)
        vq._segs = ffi.new("struct vr_seg[]", 1)  # deliberately smaller than the chain's cap
        vq._chain.segs = vq._segs
        ring.publish(ring.add_chain([(ram.alloc(16), 16) for _ in range(3)]))
        vq.pop()
        print("no report")
    """)
    env = dict(sanitized, PYTHONPATH=sanitized["PYTHONPATH"] + os.pathsep + os.path.join(REPO, "tests"))
    proc = _run(env, [sys.executable, "-c", canary], timeout=120)
    assert f"loaded {sanitized['VHOST_USER_SANITIZED_DIR']}/overlay/" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    assert "heap-buffer-overflow" in proc.stderr and "no report" not in proc.stdout


def test_ring_engine_and_hostile_tests_pass_under_asan_ubsan_with_zero_reports(sanitized):
    # The tests that run the C ring and engines in this process or in back-ends
    # the built-in front-end drives with hostile rings, and real vsock streams
    # both ways through its C host loop and queue handlers; the process-convention
    # tests of tests/vhost_user (CLI, systemd, crosvm profile) add no C coverage,
    # and neither do the hostile-front-end cases that end in the message codec
    # (bad headers, unknown requests, wrong sizes and fd counts: NACKed before any
    # C runs), so those run unsanitized only. The hostile-front-end cases reach the
    # core's C (memory table, ring start), the same for every device: they run here
    # on the three devices with C of their own, not on gpu and rng.
    c_tests = [os.path.join("tests/vhost_user", name) for name in (
        "test_virtqueue.py", "test_inflight.py", "test_memory.py",
        "test_driver_ring.py", "test_crosvm_sizes.py", "test_core_knows_no_device.py")]
    codec_only = " and ".join(f"not {name}" for name in (
        "hostile_header_drops", "hostile_unknown_request", "hostile_reply_flag",
        "hostile_wrong_payload", "hostile_too_many_fds", "hostile_missing_fd"))
    runs = [
        [*c_tests, "tests/backends/blk/test_blk_engine.py", "tests/backends/vsock/test_vsock_native.py",
         "tests/backends/vsock/test_vsock_fastpath.py", "tests/integration/test_hostile_blk.py"],
        ["tests/hardening/test_hostile_frontend.py", "-k", f"(blk or net or vsock) and {codec_only}"],
    ]
    for args in runs:
        proc = _run(sanitized, [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args])
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        assert " passed" in proc.stdout.splitlines()[-1], proc.stdout[-2000:]
        assert not _reports(proc), _reports(proc)[:20]


@pytest.mark.parametrize("target", ["ring", "blk", "session", "net-header", "vsock-packet"])
def test_fuzz_target_under_asan_ubsan_has_zero_reports(sanitized, target, tmp_path):
    proc = _run(sanitized, [sys.executable, "-m", "vhost_user.fuzzing", target, "--seconds", "3",
                            "--artifacts", str(tmp_path), "--corpus", os.path.join(REPO, "fuzz", "corpus", target)],
                timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "executions" in proc.stderr
    assert not _reports(proc), _reports(proc)[:20]


def test_sanitized_blk_backend_process_runs_the_overlay(sanitized, sockdir):
    from backends_proc import wait_for_socket
    from harness.backend import BackendProcess
    from vhost_user.backends.blk.driver import BlkDriver

    sock = os.path.join(sockdir, "san.sock")
    log_path = os.path.join(sockdir, "san.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "vhost_user.backends.blk", "--socket", sock, "-v",
                                 "--size", "8M"], env=sanitized, stdout=log, stderr=subprocess.STDOUT)
    bp = BackendProcess.adopt(proc, sock, log_path)
    try:
        wait_for_socket(sock, proc, log_path=log_path)
        with BlkDriver.connect(sock) as drv:
            drv.write(0, b"asan" * 128)
            assert drv.read(0, 512) == b"asan" * 128
        with open(f"/proc/{bp.pid}/maps") as f:
            maps = f.read()
        assert os.path.join(sanitized["VHOST_USER_SANITIZED_DIR"], "overlay", "_native") in maps
        assert "libasan" in maps
    finally:
        assert bp.stop() == 0
    assert not [line for line in bp.log().splitlines() if any(m in line for m in REPORT_MARKERS)]
