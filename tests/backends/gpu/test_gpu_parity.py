"""Parity: one driver sequence against QEMU's vhost-user-gpu and ours, same answers.

The built-in front-end plays guest and QEMU at once (GpuDriver + DisplayListener).
The transcript holds every response and what the display shows after each
step; both back-ends must produce the same transcript, and the pixels must be
the ones the "guest" wrote, so neither side is a mirror of the other.
"""

from __future__ import annotations

import numpy as np

from vhost_user.backends.gpu.commands import (
    FLAG_FENCE,
    CtrlHeader,
    CtrlType as T,
    Format,
    MemEntry,
    Rect,
    ResourceCreate2d,
    RespEdid,
)
from vhost_user.backends.gpu.display_protocol import GpuRequest as G
from vhost_user.backends.gpu.edid import edid_checksum_ok
from vhost_user.backends.gpu.driver import Backing, GpuDriver

W, H = 160, 100
STRIDE = W * 4


def _image(seed: int, h: int = H, w: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w * 4), dtype=np.uint8)


def _rgb(img: np.ndarray) -> np.ndarray:
    """What a B8G8R8X8 image looks like on screen."""
    return img.reshape(img.shape[0], -1, 4)[:, :, [2, 1, 0]]


def run_sequence(drv: GpuDriver) -> tuple[list, dict]:
    """Create, attach, scanout, transfer, flush, cursor, detach, unref and errors."""
    out: list = []
    lst = drv.listener
    note = out.append
    info = drv.display_info()
    note(("display_info", info.hdr.type, [(m.r, m.enabled) for m in info.pmodes]))
    resp = drv.edid(0)
    note(("edid", CtrlHeader.unpack(resp).type, RespEdid.unpack(resp).edid))
    note(("edid checksum", edid_checksum_ok(RespEdid.unpack(resp).edid)))

    note(("create", drv.create_2d(1, W, H, Format.B8G8R8X8_UNORM)))
    note(("create again", drv.create_2d(1, W, H)))
    note(("create id 0", drv.create_2d(0, W, H)))
    note(("create bad format", drv.create_2d(2, W, H, 999)))
    note(("create 2^31 x 2^31", drv.create_2d(3, 1 << 31, 1 << 31)))

    backing = drv.alloc_backing(W * H * 4, scatter=True)
    note(("attach", drv.attach_backing(1, backing)))
    note(("attach twice", drv.attach_backing(1, backing)))
    note(("attach to nothing", drv.attach_backing(42, backing)))
    note(("create 4", drv.create_2d(4, 8, 8)))
    note(("attach outside memory", drv.attach_backing(4, Backing([MemEntry(1 << 40, 4096)]))))
    note(("transfer without backing", drv.transfer(4, Rect(0, 0, 8, 8))))

    note(("set_scanout", drv.set_scanout(0, 1, Rect(0, 0, W, H))))
    note(("set_scanout 16", drv.set_scanout(16, 1, Rect(0, 0, W, H))))
    note(("set_scanout too big", drv.set_scanout(0, 1, Rect(1, 0, W, H))))
    note(("set_scanout no resource", drv.set_scanout(0, 77, Rect(0, 0, 1, 1))))

    first = _image(1)
    drv.write_backing(backing, first.tobytes())
    note(("transfer", drv.transfer(1, Rect(0, 0, W, H))))
    note(("flush", drv.flush(1, Rect(0, 0, W, H))))
    assert lst.wait_for(G.UPDATE, 1)
    note(("screen 1", lst.rgb(0).tobytes()))
    assert np.array_equal(lst.rgb(0), _rgb(first))

    second = _image(2)
    drv.write_backing(backing, second.tobytes())
    r = Rect(10, 20, 50, 30)
    note(("sub transfer", drv.transfer(1, r, offset=r.y * STRIDE + r.x * 4)))
    note(("sub flush", drv.flush(1, r)))
    assert lst.wait_for(G.UPDATE, 2)
    expect = first.copy()
    expect[20:50, 40:240] = second[20:50, 40:240]
    note(("screen 2", lst.rgb(0).tobytes()))
    assert np.array_equal(lst.rgb(0), _rgb(expect))

    # a packed sub-rectangle at offset 0 with the resource's stride (rows from the start)
    r2 = Rect(100, 60, 40, 20)
    note(("packed transfer", drv.transfer(1, r2, offset=0)))
    note(("partial flush", drv.flush(1, Rect(100, 60, 40, 10))))
    assert lst.wait_for(G.UPDATE, 3)
    expect[60:70, 400:560] = second[0:10, 0:160]
    note(("screen 3", lst.rgb(0).tobytes()))
    assert np.array_equal(lst.rgb(0), _rgb(expect))

    note(("transfer out of bounds", drv.transfer(1, Rect(W - 1, 0, 2, 1))))
    note(("flush out of bounds", drv.flush(1, Rect(0, H, 1, 1))))
    note(("flush nothing", drv.flush(77, Rect(0, 0, 1, 1))))

    fenced = ResourceCreate2d(5, Format.B8G8R8A8_UNORM, 64, 64,
                              hdr=CtrlHeader(T.CMD_RESOURCE_CREATE_2D, FLAG_FENCE, 0xABCDEF, 0))
    note(("fenced create", drv.command(fenced.pack())))
    cursor = _image(3, 64, 64)
    cb = drv.alloc_backing(64 * 64 * 4)
    drv.write_backing(cb, cursor.tobytes())
    note(("cursor attach", drv.attach_backing(5, cb)))
    note(("cursor transfer", drv.transfer(5, Rect(0, 0, 64, 64))))
    note(("update cursor", drv.update_cursor(0, 10, 20, 5, hot_x=3, hot_y=4)))
    note(("move cursor", drv.move_cursor(0, 30, 40, 5)))
    note(("hide cursor", drv.move_cursor(0, 31, 41, 0)))
    assert lst.wait_for(G.CURSOR_POS_HIDE, 1)
    c = lst.cursors[0]
    note(("cursor state", c.x, c.y, c.visible, c.hot_x, c.hot_y, c.image))
    assert c.image == cursor.tobytes() and (c.hot_x, c.hot_y) == (3, 4)

    note(("detach", drv.detach_backing(1)))
    note(("detach again", drv.detach_backing(1)))
    note(("transfer after detach", drv.transfer(1, Rect(0, 0, W, H))))
    note(("unref", drv.unref(1)))
    assert lst.wait_for(G.SCANOUT, 2)
    note(("scanout off", lst.rgb(0) is None))
    note(("unref again", drv.unref(1)))
    note(("short command", drv.command(b"\0" * 8)))
    note(("still alive", drv.create_2d(6, 4, 4)))
    kinds = [r for r, _ in lst.log if r not in (G.GET_PROTOCOL_FEATURES, G.SET_PROTOCOL_FEATURES)]
    return out, {"display messages": kinds}


def test_parity_same_responses_and_display_as_qemu_vhost_user_gpu(gpu_backend):
    transcripts = {}
    for which in ("qemu", "ours"):
        bp = gpu_backend(which)
        with GpuDriver.connect(bp.socket) as drv:
            transcripts[which] = run_sequence(drv)
            assert bp.running, bp.log()
    qemu, ours = transcripts["qemu"], transcripts["ours"]
    for a, b in zip(qemu[0], ours[0]):
        assert a == b, f"step {a[0]!r} differs"
    assert len(qemu[0]) == len(ours[0])
    assert qemu[1] == ours[1]
    steps = dict((s[0], s[1:]) for s in ours[0])
    assert steps["create 2^31 x 2^31"] == (T.RESP_ERR_OUT_OF_MEMORY,)
    assert steps["attach outside memory"] == (T.RESP_ERR_UNSPEC,)
    fence = CtrlHeader.unpack(steps["fenced create"][0])
    assert (fence.type, fence.flags, fence.fence_id) == (T.RESP_OK_NODATA, FLAG_FENCE, 0xABCDEF)
    assert steps["still alive"] == (T.RESP_OK_NODATA,)
