"""Fuzz targets: bounded runs, corpus and regression replays, and oracles that can fail.

CI runs each target for FUZZ_SECONDS (default 3) through the real
`vhost-user-fuzz` entry point; RELIABILITY.md records longer runs.
"""
from __future__ import annotations

import functools
import importlib
import os
import re
import subprocess
import sys

import pytest

from vhost_user.fuzzing import TARGET_MODULES, load_targets
from vhost_user.fuzzing.guestram import GUARD_SIZE, FuzzRam

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FUZZ_SECONDS = float(os.environ.get("FUZZ_SECONDS", "3"))


@functools.lru_cache(maxsize=None)
def _unavailable(target: str) -> str | None:
    """A target module may say why it cannot run here (gpu-3d: no virglrenderer / EGL)."""
    probe = getattr(importlib.import_module(TARGET_MODULES[target]), "unavailable_reason", None)
    return probe() if probe else None


def _need(target: str) -> None:
    reason = _unavailable(target)
    if reason is not None:
        pytest.fail(reason) if os.environ.get("CI") else pytest.skip(reason)


def _inputs(kind: str, target: str) -> list[str]:
    d = os.path.join(REPO, "fuzz", kind, target)
    return sorted(os.path.join(d, f) for f in os.listdir(d)) if os.path.isdir(d) else []


@pytest.mark.parametrize("target", sorted(TARGET_MODULES))
def test_fuzz_target_has_committed_seed_corpus_that_replays_clean(target):
    _need(target)
    files = _inputs("corpus", target)
    assert files, f"fuzz/corpus/{target} is empty"
    run_one = load_targets([target])[target].run_one
    for path in files:
        with open(path, "rb") as f:
            run_one(f.read())


@pytest.mark.parametrize("target", sorted(TARGET_MODULES))
def test_fuzz_regression_inputs_stay_fixed(target):
    _need(target)
    run_one = load_targets([target])[target].run_one
    for path in _inputs("regressions", target):
        with open(path, "rb") as f:
            run_one(f.read())


@pytest.mark.parametrize("target", sorted(TARGET_MODULES))
def test_fuzz_target_runs_bounded_without_findings(target, tmp_path):
    _need(target)
    argv = [sys.executable, "-m", "vhost_user.fuzzing", target, "--seconds", str(FUZZ_SECONDS),
            "--artifacts", str(tmp_path), "--corpus", os.path.join(REPO, "fuzz", "corpus", target)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120 + 2 * FUZZ_SECONDS, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    m = re.search(rf"target {re.escape(target)}: (\d+) executions", proc.stderr)
    assert m and int(m.group(1)) > 0, proc.stderr[-2000:]
    assert not [p for p in os.listdir(tmp_path) if p.startswith("crash-")]


def test_fuzz_write_oracle_catches_a_guard_page_write():
    ram = FuzzRam()
    try:
        before = ram.snapshot()
        ram.spans[0].mm[GUARD_SIZE - 1] = 0  # the byte just before region 0
        with pytest.raises(AssertionError, match="guard page"):
            ram.check_writes(before, [(0, 0, 0x10000)])
    finally:
        ram.close()


def test_fuzz_write_oracle_catches_a_write_outside_allowed_spans():
    ram = FuzzRam()
    try:
        before = ram.snapshot()
        ram.write(0x100, b"x")
        ram.check_writes(before, [(0, 0x100, 1)])  # allowed: no error
        with pytest.raises(AssertionError, match="region offset 0x100"):
            ram.check_writes(before, [(0, 0x101, 16)])
    finally:
        ram.close()


def test_fuzz_codec_input_format_delivers_fds_with_the_chunk():
    from vhost_user.fuzzing.codec import frame, run_one
    from vhost_user.protocol import BadVersion, MessageDecoder

    data = frame(True, [(b"\x01\0\0\0\x02\0\0\0\0\0\0\0", 3)])  # bad version, 3 fds
    assert data == b"\0\x03\x0c" + b"\x01\0\0\0\x02\0\0\0\0\0\0\0"
    decoder = MessageDecoder.for_backend()
    decoder.feed(data[3:], [7, 8, 9])
    with pytest.raises(BadVersion) as err:
        decoder.next_message()
    assert err.value.fds == (7, 8, 9) and not err.value.recoverable
    run_one(data)  # the target's own accounting agrees


def test_fuzz_entry_point_lists_every_target():
    proc = subprocess.run([sys.executable, "-m", "vhost_user.fuzzing", "--list"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for name in TARGET_MODULES:
        assert re.search(rf"^{re.escape(name)}\s", proc.stdout, re.M), proc.stdout


def test_fuzz_vsock_target_reaches_the_c_data_path(monkeypatch):
    """The vsock-packet seed for C really has C finish an RW packet (atheris only sees
    Python coverage, so without this seed the C path could go unfuzzed unnoticed)."""
    from vhost_user.backends.vsock import fastpath as fast
    from vhost_user.backends.vsock import device
    from vhost_user.backends.vsock import fuzz as vsock_packet

    finished = []
    real = fast.tx_burst

    def counting(*args, **kwargs):
        out = real(*args, **kwargs)
        finished.append(out.bytes)
        return out

    monkeypatch.setattr(device.fast, "tx_burst", counting)
    vsock_packet.run_one(vsock_packet._c_path_seed())
    assert sum(finished) == 1000


def test_fuzz_gpu3d_corpus_reaches_submit_and_both_transfers(monkeypatch):
    """The committed gpu-3d corpus gets SUBMIT_3D and TRANSFER_TO/FROM_HOST_3D past our
    checks into virglrenderer (atheris sees only Python coverage, so without such inputs
    the renderer's side could go unfuzzed unnoticed)."""
    from vhost_user.backends.gpu.commands import CtrlHeader, CtrlType as T
    from vhost_user.backends.gpu import fuzz_3d as gpu3d

    _need("gpu-3d")
    succeeded = set()
    real = gpu3d._control

    def counting(dev, cmd, memory):
        ok = real(dev, cmd, memory)
        if ok:
            succeeded.add(CtrlHeader.unpack(cmd).type)
        return ok

    monkeypatch.setattr(gpu3d, "_control", counting)
    for path in _inputs("corpus", "gpu-3d"):
        with open(path, "rb") as f:
            gpu3d.run_one(f.read())
    want = {T.CMD_SUBMIT_3D, T.CMD_TRANSFER_TO_HOST_3D, T.CMD_TRANSFER_FROM_HOST_3D, T.CMD_CTX_ATTACH_RESOURCE}
    assert want <= succeeded, sorted(hex(t) for t in want - succeeded)


def test_fuzz_gpu3d_corpus_reaches_context_init_and_uuids(monkeypatch):
    """The committed gpu-3d corpus creates a context for a chosen capset (CONTEXT_INIT
    acked) and has a UUID assigned to a virgl resource: the new commands are fuzzed past
    their checks, not only refused."""
    import struct
    from vhost_user.backends.gpu.commands import CtrlHeader, CtrlType as T
    from vhost_user.backends.gpu import fuzz_3d as gpu3d

    _need("gpu-3d")
    reached = set()
    real = gpu3d._control

    def counting(dev, cmd, memory):
        ok = real(dev, cmd, memory)
        hdr = CtrlHeader.unpack(cmd) if len(cmd) >= CtrlHeader.SIZE else None
        if ok and hdr is not None and hdr.type == T.CMD_RESOURCE_ASSIGN_UUID:
            reached.add("uuid")
        if ok and hdr is not None and hdr.type == T.CMD_CTX_CREATE and len(cmd) >= 32 \
                and struct.unpack_from("<I", cmd, 28)[0]:
            reached.add("context_init")
        return ok

    monkeypatch.setattr(gpu3d, "_control", counting)
    for path in _inputs("corpus", "gpu-3d"):
        with open(path, "rb") as f:
            gpu3d.run_one(f.read())
    assert reached == {"uuid", "context_init"}, reached
