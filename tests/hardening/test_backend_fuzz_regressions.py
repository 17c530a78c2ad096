"""Findings of the back-end fuzz targets (net-header, vsock-packet, gpu-commands), pinned."""
from __future__ import annotations

import struct

from vhost_user.backends.gpu.commands import CtrlHeader, CtrlType as T, FLAG_FENCE
from vhost_user.backends.gpu.device import GpuDevice, GpuOptions
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
