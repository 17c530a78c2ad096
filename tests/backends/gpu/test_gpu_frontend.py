"""Our vhost-user-gpu end to end: formats, scanouts, limits, hostile drivers, headless PNG.

Plain virtio-gpu semantics shared with QEMU's back-end are in test_gpu_parity.py;
these cover what QEMU's back-end does differently or not at all.
"""

from __future__ import annotations

import os
import struct
import time

import numpy as np

from backends_proc import open_fds
from pngread import read_png
from vhost_user.backends.gpu.commands import (
    FLAG_FENCE,
    CtrlHeader,
    CtrlType as T,
    Format,
    MemEntry,
    Rect,
    ResourceAttachBacking,
    ResourceUnref,
    RespEdid,
)
from vhost_user.backends.gpu.display_protocol import GpuRequest as G
from vhost_user.backends.gpu.edid import edid_checksum_ok, edid_preferred_mode
from vhost_user.backends.gpu.driver import Backing, DisplayListener, GpuDriver

# memory bytes of one pixel with R=0x11, G=0x22, B=0x33, A/X=0x44, per format
PIXEL = {
    Format.B8G8R8A8_UNORM: b"\x33\x22\x11\x44",
    Format.B8G8R8X8_UNORM: b"\x33\x22\x11\x44",
    Format.A8R8G8B8_UNORM: b"\x44\x11\x22\x33",
    Format.X8R8G8B8_UNORM: b"\x44\x11\x22\x33",
    Format.R8G8B8A8_UNORM: b"\x11\x22\x33\x44",
    Format.R8G8B8X8_UNORM: b"\x11\x22\x33\x44",
    Format.A8B8G8R8_UNORM: b"\x44\x33\x22\x11",
    Format.X8B8G8R8_UNORM: b"\x44\x33\x22\x11",
}


def _show(drv: GpuDriver, rid: int, w: int, h: int, data: bytes, *, scanout: int = 0,
          fmt: int = Format.B8G8R8X8_UNORM) -> None:
    assert drv.create_2d(rid, w, h, fmt) == T.RESP_OK_NODATA
    b = drv.alloc_backing(w * h * 4)
    drv.write_backing(b, data)
    assert drv.attach_backing(rid, b) == T.RESP_OK_NODATA
    assert drv.set_scanout(scanout, rid, Rect(0, 0, w, h)) == T.RESP_OK_NODATA
    assert drv.transfer(rid, Rect(0, 0, w, h)) == T.RESP_OK_NODATA
    assert drv.flush(rid, Rect(0, 0, w, h)) == T.RESP_OK_NODATA


def test_gpu_every_format_reaches_the_display_as_x8r8g8b8(gpu_backend):
    bp = gpu_backend("ours")
    with GpuDriver.connect(bp.socket) as drv:
        for n, fmt in enumerate(PIXEL, start=1):
            _show(drv, n, 4, 2, PIXEL[fmt] * 8, fmt=fmt)
            assert drv.listener.wait_for(G.UPDATE, n)
            assert drv.listener.rgb(0).tobytes() == b"\x11\x22\x33" * 8, Format(fmt).name


def test_gpu_two_scanouts_and_an_offset_scanout_show_their_own_pixels(gpu_backend):
    bp = gpu_backend("ours", "--outputs", "2")
    outputs = [(64, 32), (48, 16)]
    with GpuDriver.connect(bp.socket, outputs=outputs, enabled=0b11) as drv:
        assert drv.config.num_scanouts == 2
        info = drv.display_info()
        assert [(m.r.width, m.r.height, m.enabled) for m in info.pmodes[:2]] == [(64, 32, 1), (48, 16, 1)]
        a = np.full((32, 64 * 4), 0x10, np.uint8)
        _show(drv, 1, 64, 32, a.tobytes(), scanout=0)
        # resource 2 is 96x40; scanout 1 shows its window at (40, 20)
        b = np.random.default_rng(5).integers(0, 256, (40, 96 * 4), dtype=np.uint8)
        assert drv.create_2d(2, 96, 40) == T.RESP_OK_NODATA
        back = drv.alloc_backing(b.nbytes)
        drv.write_backing(back, b.tobytes())
        assert drv.attach_backing(2, back) == T.RESP_OK_NODATA
        assert drv.set_scanout(1, 2, Rect(40, 20, 48, 16)) == T.RESP_OK_NODATA
        assert drv.transfer(2, Rect(0, 0, 96, 40)) == T.RESP_OK_NODATA
        assert drv.flush(2, Rect(0, 0, 96, 40)) == T.RESP_OK_NODATA
        assert drv.listener.wait_for(G.UPDATE, 2)
        window = b.reshape(40, 96, 4)[20:36, 40:88][:, :, [2, 1, 0]]
        assert np.array_equal(drv.listener.rgb(1), window)
        assert np.all(drv.listener.rgb(0) == 0x10)


def test_gpu_host_memory_limit_per_client(gpu_backend):
    bp = gpu_backend("ours", "--max-hostmem", "1M")
    with GpuDriver.connect(bp.socket) as drv:
        assert drv.create_2d(1, 512, 512) == T.RESP_OK_NODATA       # exactly 1 MiB
        assert drv.create_2d(2, 1, 1) == T.RESP_ERR_OUT_OF_MEMORY
        assert drv.unref(1) == T.RESP_OK_NODATA
        assert drv.create_2d(2, 256, 256) == T.RESP_OK_NODATA
        assert drv.create_2d(3, 1 << 31, 1 << 31) == T.RESP_ERR_OUT_OF_MEMORY
    assert "needs" in bp.log()


def test_gpu_hostile_commands_get_errors_and_the_device_keeps_working(gpu_backend):
    bp = gpu_backend("ours")
    fds_before = open_fds()
    with GpuDriver.connect(bp.socket) as drv:
        assert drv.create_2d(1, 16, 16) == T.RESP_OK_NODATA
        # backing that runs off the end of guest memory
        end = drv.fe.ram.regions[0].size
        assert drv.attach_backing(1, Backing([MemEntry(end - 4096, 8192)])) == T.RESP_ERR_UNSPEC
        # entry count lies about what follows; more entries than allowed
        liar = ResourceAttachBacking(1, (MemEntry(0, 4096),), nr_entries=9).pack_all()
        assert CtrlHeader.unpack(drv.command(liar)).type == T.RESP_ERR_UNSPEC
        many = ResourceAttachBacking(1, (), nr_entries=20000).pack()
        assert CtrlHeader.unpack(drv.command(many)).type == T.RESP_ERR_UNSPEC
        # a backing shorter than the resource: what exists is copied, nothing else
        small = drv.alloc_backing(100, scatter=False)
        drv.write_backing(small, b"\x7f" * 100)
        assert drv.attach_backing(1, small) == T.RESP_OK_NODATA
        assert drv.transfer(1, Rect(0, 0, 16, 16)) == T.RESP_OK_NODATA
        assert drv.transfer(1, Rect(3, 3, 5, 5), offset=1 << 40) == T.RESP_OK_NODATA
        # unknown and 3D commands; a response buffer too small for the header
        assert drv.status(CtrlHeader(T.CMD_SUBMIT_3D).pack()) == T.RESP_ERR_UNSPEC
        assert drv.status(CtrlHeader(0xFFFF).pack()) == T.RESP_ERR_UNSPEC
        drv.command(ResourceUnref(99).pack(), resp_len=8)
        fenced = ResourceUnref(99, hdr=CtrlHeader(T.CMD_RESOURCE_UNREF, FLAG_FENCE, 5)).pack()
        err = CtrlHeader.unpack(drv.command(fenced))
        assert (err.type, err.flags, err.fence_id) == (T.RESP_ERR_INVALID_RESOURCE_ID, FLAG_FENCE, 5)
        assert drv.capset_info(0) == T.RESP_ERR_INVALID_PARAMETER
        assert drv.config.num_capsets == 0
        # cursor from a resource that cannot be a cursor: an empty image, no crash
        assert drv.update_cursor(0, 1, 1, 1) == 0
        assert drv.listener.wait_for(G.CURSOR_UPDATE, 1)
        assert drv.listener.cursors[0].image == bytes(64 * 64 * 4)
        assert drv.edid(40)[:4] == struct.pack("<I", T.RESP_ERR_INVALID_PARAMETER)
        # still serving
        assert drv.create_2d(2, 8, 8) == T.RESP_OK_NODATA
        assert drv.unref(2) == T.RESP_OK_NODATA
    assert bp.running
    assert open_fds() == fds_before


def test_gpu_display_socket_is_replaced_on_each_driver_start(gpu_backend):
    bp = gpu_backend("ours")
    with GpuDriver.connect(bp.socket) as drv:
        _show(drv, 1, 8, 8, b"\x01" * 256)
        assert drv.listener.wait_for(G.UPDATE, 1)
        second = DisplayListener()
        try:
            drv.set_display_socket(second)
            assert drv.set_scanout(0, 1, Rect(0, 0, 8, 8)) == T.RESP_OK_NODATA
            assert drv.flush(1, Rect(0, 0, 8, 8)) == T.RESP_OK_NODATA
            assert second.wait_for(G.UPDATE, 1)
            assert second.rgb(0).tobytes() == b"\x01" * 192
            assert drv.listener.count(G.UPDATE) == 1
        finally:
            second.close()


def test_gpu_headless_png_display_without_a_display_socket(gpu_backend, sockdir):
    out = os.path.join(sockdir, "png")
    bp = gpu_backend("ours", "--display", f"png:{out}", "--resolution", "320x200")
    with GpuDriver.connect(bp.socket, display=False) as drv:
        info = drv.display_info()
        assert (info.pmodes[0].r.width, info.pmodes[0].r.height, info.pmodes[0].enabled) == (320, 200, 1)
        edid = RespEdid.unpack(drv.edid(0)).edid
        assert edid_checksum_ok(edid) and edid_preferred_mode(edid) == (320, 200)
        img = np.random.default_rng(9).integers(0, 256, (20, 30 * 4), dtype=np.uint8)
        _show(drv, 1, 30, 20, img.tobytes())
        path = os.path.join(out, "scanout-0.png")
        deadline = time.monotonic() + 10
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert np.array_equal(read_png(path), img.reshape(20, 30, 4)[:, :, [2, 1, 0]])
        assert drv.unref(1) == T.RESP_OK_NODATA
        assert not os.path.exists(path)


def test_gpu_unaligned_backing_entries_gather_like_whole_pages(gpu_backend):
    """Entries of odd sizes at odd addresses take the per-segment path; pages the fast one."""
    bp = gpu_backend("ours")
    w, h = 50, 30
    img = np.random.default_rng(11).integers(0, 256, (h, w * 4), dtype=np.uint8)
    with GpuDriver.connect(bp.socket) as drv:
        base = drv.fe.ram.alloc(16 * 4096, 4096)
        sizes, entries, pos = [1000, 3, 2997, 777, 1223], [], 0
        while sum(e.length for e in entries) < img.nbytes:
            n = min(sizes[len(entries) % len(sizes)], img.nbytes - sum(e.length for e in entries))
            entries.append(MemEntry(base + 8 * 4096 - pos - n - 5 * len(entries), n))
            pos += n + 5 * len(entries)
        backing = Backing(entries)
        drv.write_backing(backing, img.tobytes())
        _show(drv, 1, w, h, b"")  # creates, attaches pages, shows; then swap the backing
        assert drv.detach_backing(1) == T.RESP_OK_NODATA
        assert drv.attach_backing(1, backing) == T.RESP_OK_NODATA
        assert drv.transfer(1, Rect(0, 0, w, h)) == T.RESP_OK_NODATA
        assert drv.flush(1, Rect(0, 0, w, h)) == T.RESP_OK_NODATA
        assert drv.listener.wait_for(G.UPDATE, 2)
        assert np.array_equal(drv.listener.rgb(0), img.reshape(h, w, 4)[:, :, [2, 1, 0]])


def test_gpu_display_that_goes_away_is_counted_and_the_guest_keeps_working(gpu_backend):
    """QEMU's display socket closing is a drop of pixels, never of guest work: the
    commands still succeed, the failure and every message not shown are counted in
    the SIGUSR1 stats line."""
    bp = gpu_backend("ours")
    with GpuDriver.connect(bp.socket) as drv:
        _show(drv, 1, 8, 8, b"\x02" * 256)
        assert drv.listener.wait_for(G.UPDATE, 1)
        drv.listener.close()  # the display peer is gone
        for _ in range(3):
            assert drv.transfer(1, Rect(0, 0, 8, 8)) == T.RESP_OK_NODATA
            assert drv.flush(1, Rect(0, 0, 8, 8)) == T.RESP_OK_NODATA
        (entry,) = bp.log_stats().values()
        assert entry["display_failures"] == 1
        assert entry["display_messages_dropped"] >= 2  # the first failing flush is the failure itself
        assert "display disabled" in bp.log()
