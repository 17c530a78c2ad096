"""Native libFuzzer harnesses (csrc/fuzz/): built with clang, run briefly, and shown able to fail.

Each harness is built by tools/fuzz-native.sh with libFuzzer, ASan and
UBSan and run for NATIVE_FUZZ_RUNS executions (default 20000) with a fixed
seed, from an empty corpus plus fuzz/regressions/native-TARGET/. A harness
that cannot find a planted bug proves nothing, so one test builds the ring
harness against a walker whose region-end split was removed and requires a
report. RELIABILITY.md records the 10-million-execution runs.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess

import pytest

from backends_proc import on_ram_fs, require_tool

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TARGETS = ["ring", "blk", "net", "vsock"]
REGRESSIONS = sorted(glob.glob(os.path.join(REPO, "fuzz", "regressions", "native-*", "*")))
RUNS = int(os.environ.get("NATIVE_FUZZ_RUNS", "20000"))


def _copy_tree(tree) -> None:
    """The C and the build script, as fuzz-native.sh finds them: core in csrc/, devices in backends/."""
    shutil.copytree(os.path.join(REPO, "csrc"), tree / "csrc")
    shutil.copytree(os.path.join(REPO, "backends"), tree / "backends",
                    ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    shutil.copytree(os.path.join(REPO, "tools"), tree / "tools")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> str:
    require_tool("clang-16")
    out = str(tmp_path_factory.mktemp("native-fuzz"))
    proc = subprocess.run(["bash", os.path.join(REPO, "tools", "fuzz-native.sh"), "build", out],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def _fuzz(binary: str, corpus: str, *extra: str, runs: int = RUNS) -> subprocess.CompletedProcess:
    os.makedirs(corpus, exist_ok=True)
    argv = [binary, f"-runs={runs}", "-seed=1", "-print_final_stats=1",
            f"-artifact_prefix={corpus}/", corpus, *extra]
    return subprocess.run(argv, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("target", TARGETS)
def test_native_harness_runs_clean(built, tmp_path, target):
    seeds = os.path.join(REPO, "fuzz", "regressions", f"native-{target}")
    extra = [seeds] if os.path.isdir(seeds) else []
    proc = _fuzz(os.path.join(built, target), str(tmp_path / "corpus"), *extra)
    assert proc.returncode == 0, proc.stderr[-4000:]
    done = re.search(r"stat::number_of_executed_units:\s+(\d+)", proc.stderr)
    assert done and int(done.group(1)) >= RUNS, proc.stderr[-2000:]
    cov = re.search(r"DONE\s+cov: (\d+)", proc.stderr)
    assert cov and int(cov.group(1)) > 100, "the harness barely reaches the code under test"


def test_native_ring_harness_finds_a_planted_bounds_bug(tmp_path):
    """Segments no longer split at a region's end must be caught (trap or ASan)."""
    require_tool("clang-16")
    tree = tmp_path / "tree"
    _copy_tree(tree)
    mem = tree / "csrc" / "memory.c"
    text = mem.read_text()
    planted = text.replace("*chunk = rest < len ? rest : len;", "*chunk = len;")
    assert planted != text, "memory.c changed: update the planted bug"
    mem.write_text(planted)
    out = tmp_path / "bin"
    proc = subprocess.run(["bash", str(tree / "tools" / "fuzz-native.sh"), "build", str(out), "ring"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    proc = _fuzz(str(out / "ring"), str(tmp_path / "corpus"), runs=2_000_000)
    assert proc.returncode != 0, "the ring harness did not notice segments past a region's end"
    assert "deadly signal" in proc.stderr or "AddressSanitizer" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("path", REGRESSIONS, ids=lambda p: os.path.relpath(p, os.path.join(REPO, "fuzz", "regressions")))
def test_native_regression_input_replays_clean_alone(built, path):
    """Each stored finding, run alone in a fresh process, passes on today's code."""
    target = os.path.basename(os.path.dirname(path))[len("native-"):]
    proc = subprocess.run([os.path.join(built, target), path], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Executed " in proc.stderr, proc.stderr[-2000:]


def _tx_break_revert(text: str) -> tuple[str, int]:
    return re.subn(r"int rc = vr_pop\(q, c\);.*?if \(rc == 0\)\n\s*break;",
                   "if (vr_pop(q, c) <= 0)\n                break;", text, flags=re.S)


def _iov_revert(which: int):
    """The old chain_iov bound: IOV_CAP iovecs from iov + niov (0: tx, 1: rx)."""
    def revert(text: str) -> tuple[str, int]:
        parts = text.split("IOV_CAP - niov)")
        if len(parts) != 3:
            return text, 0
        return "IOV_CAP - niov)".join(parts[:which + 1]) + "IOV_CAP)" + "IOV_CAP - niov)".join(parts[which + 1:]), 1
    return revert


# (input under fuzz/regressions/native-vsock/, how to put the bug back, what must report it)
VSOCK_FIXES = [
    ("tx-queue-breaks-after-a-short-write", _tx_break_revert, ["deadly signal", "guest_to_host"]),
    ("tx-iovecs-past-iov-cap", _iov_revert(0), ["stack-buffer-overflow", "in vs_tx_burst"]),
    ("rx-iovecs-past-iov-cap", _iov_revert(1), ["stack-buffer-overflow", "in vs_rx_fill"]),
]


@pytest.mark.parametrize("name,revert,report", VSOCK_FIXES, ids=[v[0] for v in VSOCK_FIXES])
def test_vsock_regression_input_fails_on_the_code_before_its_fix(tmp_path, name, revert, report):
    """Each stored vsock input catches its bug when the fix is taken out of vsock.c.
    tx-queue-breaks-after-a-short-write: a batch of RW packets, a chain that breaks the
    queue, then a short write; before the fix the batch was written anyway, the cut packet
    could not be popped again on the broken queue, and its first bytes reached the host
    socket with no packet reporting them (the harness's byte count traps).
    tx-/rx-iovecs-past-iov-cap: chains of many tiny descriptors after others in one batch;
    the old bound let vr_segs_iov write IOV_CAP iovecs from iov + niov (ASan reports it)."""
    require_tool("clang-16")
    tree = tmp_path / "tree"
    _copy_tree(tree)
    vsock = tree / "backends" / "vsock" / "vsock.c"
    old, n = revert(vsock.read_text())
    assert n == 1, "vsock.c changed: update the reverted fix"
    vsock.write_text(old)
    out = tmp_path / "bin"
    proc = subprocess.run(["bash", str(tree / "tools" / "fuzz-native.sh"), "build", str(out), "vsock"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    case = os.path.join(REPO, "fuzz", "regressions", "native-vsock", name)
    proc = subprocess.run([str(out / "vsock"), case], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0, f"{name} no longer reaches the code of its bug"
    for text in report:
        assert text in proc.stderr, proc.stderr[-3000:]


def test_native_blk_harness_reaches_the_mapped_reads_and_their_sigbus_guard(built, tmp_path):
    """The blk seeds copy from the image's mapping (a file on a disk file system, not
    tmpfs), in the worker and in pool threads, and read past the short image's end:
    SIGBUS inside the guarded copy, under ASan, is an IOERR and no report."""
    seeds = os.path.join(REPO, "fuzz", "regressions", "native-blk")
    if on_ram_fs("/var/tmp"):
        pytest.fail("/var/tmp is on tmpfs or hugetlbfs here: the harness's mapped image needs a disk file system")
    proc = subprocess.run([os.path.join(built, "blk"), "-runs=0", "-print_coverage=1", seeds],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    covered = {m.group(1) for m in re.finditer(r"^COVERED_FUNC: .* (\w+) \S+$", proc.stderr, re.M)}
    assert {"map_read", "on_sigbus", "resident", "piece_run"} <= covered, sorted(covered)
