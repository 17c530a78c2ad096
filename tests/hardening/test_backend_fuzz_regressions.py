"""Findings of the back-end fuzz targets (net-header, vsock-packet, gpu-commands, gpu-3d), pinned."""
from __future__ import annotations

import os
import struct

import pytest

from vhost_user.backends.gpu.commands import CtrlHeader, CtrlType as T, FLAG_FENCE
from vhost_user.backends.gpu.device import GpuDevice, GpuOptions
from vhost_user.backends.gpu.fuzz_3d import shared_device, unavailable_reason
from vhost_user.fuzzing.guestram import FuzzRam


def test_gpu_fenced_command_refused_by_the_parser_still_echoes_its_fence():
    """gpu-commands: an ATTACH_BACKING announcing more entries than it carries was
    answered with a bare error header, so the guest's fence was never signalled."""
    ram = FuzzRam()
    memory = ram.memory()
    dev = GpuDevice(GpuOptions())
    try:
        hdr = CtrlHeader(T.CMD_RESOURCE_ATTACH_BACKING, FLAG_FENCE, 0xDEADBEEF12, 0, 0).pack()
        cmd = hdr + struct.pack("<II", 1, 5) + struct.pack("<QI4x", 0, 4096)  # 5 announced, 1 carried
        resp = CtrlHeader.unpack(dev.execute(cmd, memory))
        assert resp.type == T.RESP_ERR_UNSPEC
        assert resp.flags & FLAG_FENCE and resp.fence_id == 0xDEADBEEF12
        # unfenced and short commands keep a bare error header
        assert CtrlHeader.unpack(dev.execute(cmd[:10], memory)).fence_id == 0
    finally:
        dev.close()
        memory.close()
        ram.close()



def _need_virgl():

    reason = unavailable_reason()
    if reason is not None:
        pytest.fail(reason) if os.environ.get("CI") else pytest.skip(reason)


def test_gpu_virgl_ids_and_fence_ids_past_2_31_get_answers_and_reset_works():
    """gpu-3d: cffi refused u32 values >= 2^31 for the parameters virglrenderer.h declares
    int (resource and context handles, transfer level, fence id): OverflowError escaped
    `execute` (the chain was never completed, the guest's fence never signalled) and
    `reset`. Every such command now gets its response, fence echoed."""
    from vhost_user.backends.gpu.commands import MemEntry, ResourceAttachBacking
    from vhost_user.backends.gpu.commands3d import CtxCreate, CtxResource, ResourceCreate3d, Submit3d

    _need_virgl()
    dev, ram = shared_device()  # virglrenderer allows one renderer per process
    ram.reset()
    memory = ram.memory()
    ctx, rid, fence = 0x80000001, 0x80000002, (1 << 32) | 0x80000005
    hdr = lambda t, **kw: CtrlHeader(t, ctx_id=ctx, **kw)
    try:
        cmds = [CtxCreate(hdr(T.CMD_CTX_CREATE), b"fuzz").pack(),
                ResourceCreate3d(rid, 2, 2, (1 << 1) | (1 << 3), 16, 16).pack(),
                ResourceAttachBacking(rid, (MemEntry(0, 16 * 16 * 4),)).pack_all(),
                CtxResource(hdr(T.CMD_CTX_ATTACH_RESOURCE), rid).pack(),
                Submit3d(b"", hdr(T.CMD_SUBMIT_3D)).pack()]
        for cmd in cmds:
            assert CtrlHeader.unpack(dev.execute(cmd, memory)).type == T.RESP_OK_NODATA
        fenced = Submit3d(b"", hdr(T.CMD_SUBMIT_3D, flags=FLAG_FENCE, fence_id=fence)).pack()
        resp = CtrlHeader.unpack(dev.execute(fenced, memory))
        assert (resp.type, resp.flags & FLAG_FENCE, resp.fence_id) == (T.RESP_OK_NODATA, FLAG_FENCE, fence)
        assert dev.virgl.fence == fence & 0xFFFFFFFF  # virglrenderer signalled this very fence
        dev.reset()  # detaches the backing of resource 0x80000002
        assert not dev.res3d and not dev.contexts
    finally:
        dev.reset()
        memory.close()


_LEVEL_PROBE = """
import logging, struct
logging.disable(logging.CRITICAL)
from vhost_user.backends.gpu.commands import CtrlHeader, CtrlType as T, MemEntry, ResourceAttachBacking
from vhost_user.backends.gpu.commands3d import Box, ResourceCreate3d, Transfer3d
from vhost_user.backends.gpu.device import GpuOptions
from vhost_user.backends.gpu.device3d import VirglGpuDevice
from vhost_user.fuzzing.guestram import FuzzRam
ram = FuzzRam(); memory = ram.memory(); dev = VirglGpuDevice(GpuOptions())
dev.execute(ResourceCreate3d(5, 2, 2, 10, 16, 16, last_level=1).pack(), memory)
dev.execute(ResourceAttachBacking(5, (MemEntry(0, 2048),)).pack_all(), memory)
for t in (T.CMD_TRANSFER_TO_HOST_3D, T.CMD_TRANSFER_FROM_HOST_3D):
    for level in (1, 2, 0x80000000):
        cmd = Transfer3d(Box(0, 0, 0, 8, 8, 1), 0, 5, level=level, hdr=CtrlHeader(t)).pack()
        print(hex(t), level, hex(CtrlHeader.unpack(dev.execute(cmd, memory)).type), flush=True)
"""


def test_gpu_virgl_transfer_past_the_last_level_is_refused_before_virglrenderer():
    """gpu-3d: TRANSFER_TO_HOST_3D at level 0x80000000 segfaulted virglrenderer 0.10.4
    (its bounds check lets that level through; TRANSFER_FROM_HOST_3D even succeeded).
    The device refuses any level past the resource's last_level (run in a child: a
    regression kills the process)."""
    import subprocess
    import sys

    _need_virgl()
    out = subprocess.run([sys.executable, "-c", _LEVEL_PROBE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    ok, bad = hex(T.RESP_OK_NODATA), hex(T.RESP_ERR_INVALID_PARAMETER)
    expect = [f"{hex(t)} {lvl} {ok if lvl == 1 else bad}"
              for t in (T.CMD_TRANSFER_TO_HOST_3D, T.CMD_TRANSFER_FROM_HOST_3D) for lvl in (1, 2, 0x80000000)]
    assert out.stdout.split("\n")[:6] == expect, out.stdout


def test_gpu_virgl_zero_height_buffer_counts_against_the_host_memory_limit():
    """gpu-3d (libFuzzer out-of-memory, RSS 240 MB -> 3.4 GB in one command): a PIPE_BUFFER
    of width 3492550765 and height 0 was counted as 0 bytes, so virglrenderer allocated it
    past any max_hostmem. Zero sizes now count as 1, texels up to 32 bytes, levels, samples."""
    from vhost_user.backends.gpu.commands3d import ResourceCreate3d
    _need_virgl()
    dev, ram = shared_device()
    assert dev.opts.max_hostmem == 16 << 20
    memory = ram.memory()
    try:
        huge = ResourceCreate3d(1, 0, 134, (1 << 3) | (1 << 7), 3492550765, 0).pack()
        assert CtrlHeader.unpack(dev.execute(huge, memory)).type == T.RESP_ERR_OUT_OF_MEMORY
        wide = ResourceCreate3d(2, 2, 31, 1 << 3, 2048, 1024).pack()  # R32G32B32A32: 32 MiB, not 8
        assert CtrlHeader.unpack(dev.execute(wide, memory)).type == T.RESP_ERR_OUT_OF_MEMORY
        fits = ResourceCreate3d(3, 2, 2, (1 << 1) | (1 << 3), 1024, 1024).pack()  # B8G8R8X8: 4 MiB
        assert CtrlHeader.unpack(dev.execute(fits, memory)).type == T.RESP_OK_NODATA
    finally:
        dev.reset()
        memory.close()


def test_vsock_host_thread_survives_a_socket_closed_while_it_registers_it():
    """Found by vsock-packet (60 s mutation run, the thread died with EBADF): the tx
    worker closed a connection's socket between the host I/O thread's fileno check
    and its selector register(); the exception killed the thread and the VM's host
    side stopped for good. The close is placed at exactly that point here."""
    import selectors
    import socket
    import threading
    import time

    from vhost_user.backends.vsock.device import VmOptions, VsockDevice
    from vhost_user.backends.vsock.fastpath import ConnCounters

    dev = VsockDevice(VmOptions(guest_cid=3, socket=None, uds_path=None))
    host = dev.host
    ours, peer = socket.socketpair()
    applied = threading.Event()

    class FakeConn:  # the fields the host thread reads
        sock, interest = ours, 0
        rec = ConnCounters(2, 1, 1, -1, 1)  # not in the C loop

        def describe(self):
            return "conn under test"

    conn = FakeConn()
    dev.host_interest = lambda c: selectors.EVENT_READ
    dev.host_loop_ok = lambda c: False  # the selector's register() path, not the C loop's
    real_get_map = host._sel.get_map

    def get_map():
        if not applied.is_set():
            ours.close()  # what the tx worker did, at the worst moment
            applied.set()
        return real_get_map()

    host._sel.get_map = get_map
    try:
        host.update(conn)
        assert applied.wait(10), "the host thread never applied the update"
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and host._thread.is_alive():
            time.sleep(0.05)
        assert host._thread.is_alive(), "the vsock host I/O thread died"
    finally:
        peer.close()
        dev.close()
