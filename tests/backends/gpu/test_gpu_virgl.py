"""3D (--virgl): virglrenderer on Mesa's software rasterizer, driven by the built-in front-end.

The 3D test renders for real: a virgl command stream creates a surface on a
3D resource and clears it red; the flushed scanout the display listener
receives must be red. Needs libvirglrenderer1 and Mesa's EGL (no GPU).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

from pngread import read_png

from vhost_user.backends.gpu.commands import CtrlHeader, CtrlType as T, GetCapsetInfo, MemEntry, Rect
from vhost_user.backends.gpu.commands3d import CtxCreate, CtxResource, GetCapset, ResourceCreate3d, Submit3d
from vhost_user.backends.gpu.display_protocol import GpuRequest as G
from vhost_user.backends.gpu.virgl import virgl_unavailable_reason
from vhost_user.backends.gpu.driver import DRIVER_FEATURES, Backing, GpuDriver
from vhost_user.frontend import CROSVM

VIRGL_FEATURE = 1 << 0
RESOURCE_UUID_FEATURE = 1 << 2
CONTEXT_INIT_FEATURE = 1 << 4
_BIND_RT_SAMPLER = (1 << 1) | (1 << 3)


@pytest.fixture(scope="module")
def virgl_ok():
    reason = virgl_unavailable_reason()
    if reason is not None:
        pytest.fail(reason) if os.environ.get("CI") else pytest.skip(reason)


def _f(v: float) -> int:
    return struct.unpack("<I", struct.pack("<f", v))[0]


def _clear_stream(surface: int, resource: int, rgba) -> bytes:
    """virgl: create a surface on `resource`, make it colour buffer 0, clear it to rgba."""
    def cmd0(cmd, obj, length):
        return cmd | obj << 8 | length << 16
    words = [cmd0(1, 8, 5), surface, resource, 2, 0, 0,           # CREATE_OBJECT SURFACE
             cmd0(5, 0, 3), 1, 0, surface,                          # SET_FRAMEBUFFER_STATE
             cmd0(7, 0, 8), 4, *(_f(c) for c in rgba), 0, 0, 0]     # CLEAR COLOR0
    return struct.pack(f"<{len(words)}I", *words)


def _type(resp: bytes) -> int:
    return CtrlHeader.unpack(resp).type


def _print_capabilities() -> list[str]:
    out = subprocess.run([sys.executable, "-m", "vhost_user.backends.gpu", "-c"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["features"]


def test_virgl_capabilities_list_virgl(virgl_ok):
    features = _print_capabilities()
    assert features[0] == "virgl" and "render-node" not in features
    assert "capset-virgl2" in features  # what the 3D tests below ask GET_CAPSET_INFO for


def _wait_png(path: str, want_rgb) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            img = read_png(path)
            if np.all(img == np.array(want_rgb, np.uint8)):
                return
        except (OSError, ValueError):
            pass   # not there yet, or being written
        time.sleep(0.05)
    raise AssertionError(f"{path} never showed {want_rgb}")


def test_virgl_context_init_under_crosvm(virgl_ok, gpu_backend, tmp_path):
    """crosvm offers the guest what the back-end offers (QEMU's front-end masks
    CONTEXT_INIT): a context created for the virgl2 capset renders, a UUID is assigned to
    its resource, and --print-capabilities says `context-init` exactly when GET_FEATURES
    has the bit. Hostile CTX_CREATEs: an unlisted capset, reserved bits, context_init
    without the feature negotiated; none creates a context, and the device goes on."""
    out = str(tmp_path / "png")
    bp = gpu_backend("ours", "--virgl", "--display", f"png:{out}")
    want = DRIVER_FEATURES | VIRGL_FEATURE | CONTEXT_INIT_FEATURE | RESOURCE_UUID_FEATURE
    with GpuDriver.connect(bp.socket, features=want, profile=CROSVM) as drv:
        offered = drv.fe.backend_features
        assert ("context-init" in _print_capabilities()) == bool(offered & CONTEXT_INIT_FEATURE)
        if not offered & CONTEXT_INIT_FEATURE:
            pytest.fail("virglrenderer here has context_create_with_flags, yet CONTEXT_INIT "
                        "is not offered") if VirglRenderer_has_flags() else pytest.skip(
                "this virglrenderer has no virgl_renderer_context_create_with_flags")
        assert drv.fe.features & CONTEXT_INIT_FEATURE and drv.fe.features & RESOURCE_UUID_FEATURE
        hdr = lambda t, ctx=1, **kw: CtrlHeader(t, ctx_id=ctx, **kw)
        create = lambda ctx, init: _type(drv.command(CtxCreate(hdr(T.CMD_CTX_CREATE, ctx), b"ci",
                                                               init).pack()))
        assert create(1, 2) == T.RESP_OK_NODATA                      # VIRTIO_GPU_CAPSET_VIRGL2
        assert create(3, 1) == T.RESP_OK_NODATA                      # VIRTIO_GPU_CAPSET_VIRGL
        assert create(4, 4) == T.RESP_ERR_INVALID_PARAMETER          # Venus: not listed
        assert create(5, 0x102) == T.RESP_ERR_INVALID_PARAMETER      # reserved bits
        assert create(6, 0xFF) == T.RESP_ERR_INVALID_PARAMETER
        assert _type(drv.command(Submit3d(b"", hdr(T.CMD_SUBMIT_3D, 4)).pack())) == \
            T.RESP_ERR_INVALID_CONTEXT_ID                            # refused: never created
        assert _type(drv.command(ResourceCreate3d(5, 2, 2, _BIND_RT_SAMPLER, 32, 24).pack())) == T.RESP_OK_NODATA
        assert _type(drv.command(CtxResource(hdr(T.CMD_CTX_ATTACH_RESOURCE), 5).pack())) == T.RESP_OK_NODATA
        submit = Submit3d(_clear_stream(1, 5, (0.0, 0.0, 1.0, 1.0)), hdr(T.CMD_SUBMIT_3D))
        assert _type(drv.command(submit.pack())) == T.RESP_OK_NODATA
        assert drv.set_scanout(0, 5, Rect(0, 0, 32, 24)) == T.RESP_OK_NODATA
        assert drv.flush(5, Rect(0, 0, 32, 24)) == T.RESP_OK_NODATA
        _wait_png(os.path.join(out, "scanout-0.png"), (0, 0, 255))
        rtype, first = drv.assign_uuid(5)
        assert rtype == T.RESP_OK_RESOURCE_UUID and len(first) == 16 and any(first)
        assert drv.assign_uuid(5) == (T.RESP_OK_RESOURCE_UUID, first)
        assert drv.assign_uuid(77)[0] == T.RESP_ERR_INVALID_RESOURCE_ID
        assert drv.set_scanout(0, 0, Rect(0, 0, 0, 0)) == T.RESP_OK_NODATA
        assert drv.unref(5) == T.RESP_OK_NODATA
        assert drv.assign_uuid(5)[0] == T.RESP_ERR_INVALID_RESOURCE_ID
    assert bp.running
    log = bp.log()
    assert "not one of [1, 2]" in log and "bits outside the capset id are reserved" in log
    bp.stop()  # the next back-end writes the same log file

    bp2 = gpu_backend("ours", "--virgl", "--display", f"png:{out}")
    with GpuDriver.connect(bp2.socket, features=want & ~CONTEXT_INIT_FEATURE, profile=CROSVM) as drv:
        assert not drv.fe.features & CONTEXT_INIT_FEATURE
        ctx = CtxCreate(CtrlHeader(T.CMD_CTX_CREATE, ctx_id=1), b"x", 2)
        assert _type(drv.command(ctx.pack())) == T.RESP_ERR_INVALID_PARAMETER
        plain = CtxCreate(CtrlHeader(T.CMD_CTX_CREATE, ctx_id=1), b"x")
        assert _type(drv.command(plain.pack())) == T.RESP_OK_NODATA
    assert bp2.running
    assert "without CONTEXT_INIT negotiated" in bp2.log()


def VirglRenderer_has_flags() -> bool:
    out = subprocess.run([sys.executable, "-c", "from vhost_user.backends.gpu.virgl import VirglRenderer as V; "
                          "print(V().context_init)"], capture_output=True, text=True, timeout=60)
    return out.stdout.strip() == "True"


def test_virgl_clear_renders_and_reaches_the_display(virgl_ok, gpu_backend):
    bp = gpu_backend("ours", "--virgl")
    with GpuDriver.connect(bp.socket, features=DRIVER_FEATURES | VIRGL_FEATURE) as drv:
        assert drv.fe.features & VIRGL_FEATURE
        assert drv.config.num_capsets == 2
        info = drv.command(GetCapsetInfo(1).pack(), 40)
        assert _type(info) == T.RESP_OK_CAPSET_INFO
        capset_id, version, size = struct.unpack_from("<III", info, 24)
        assert capset_id == 2 and version >= 1 and size > 0
        caps = drv.command(GetCapset(capset_id, version).pack(), 24 + size)
        assert _type(caps) == T.RESP_OK_CAPSET and any(caps[24:])

        hdr = lambda t, **kw: CtrlHeader(t, ctx_id=1, **kw)
        assert _type(drv.command(CtxCreate(hdr(T.CMD_CTX_CREATE), b"test").pack())) == T.RESP_OK_NODATA
        assert _type(drv.command(ResourceCreate3d(5, 2, 2, _BIND_RT_SAMPLER, 32, 24).pack())) == T.RESP_OK_NODATA
        assert _type(drv.command(CtxResource(hdr(T.CMD_CTX_ATTACH_RESOURCE), 5).pack())) == T.RESP_OK_NODATA
        submit = Submit3d(_clear_stream(1, 5, (1.0, 0.0, 0.0, 1.0)),
                          hdr(T.CMD_SUBMIT_3D, flags=1, fence_id=42))
        done = CtrlHeader.unpack(drv.command(submit.pack()))
        assert (done.type, done.flags, done.fence_id) == (T.RESP_OK_NODATA, 1, 42)
        assert drv.set_scanout(0, 5, Rect(0, 0, 32, 24)) == T.RESP_OK_NODATA
        assert drv.flush(5, Rect(0, 0, 32, 24)) == T.RESP_OK_NODATA
        assert drv.listener.wait_for(G.UPDATE, 1)
        assert np.all(drv.listener.rgb(0) == np.array([255, 0, 0], np.uint8))

        # hostile: garbage stream, unknown context, unknown resource; still serving after
        junk = Submit3d(struct.pack("<4I", 0xFFFF00FF, 1, 2, 3), hdr(T.CMD_SUBMIT_3D))
        assert _type(drv.command(junk.pack())) == T.RESP_ERR_INVALID_PARAMETER
        other = Submit3d(b"", CtrlHeader(T.CMD_SUBMIT_3D, ctx_id=9))
        assert _type(drv.command(other.pack())) == T.RESP_ERR_INVALID_CONTEXT_ID
        assert drv.transfer(77, Rect(0, 0, 1, 1)) == T.RESP_ERR_INVALID_RESOURCE_ID
        green = Submit3d(_clear_stream(2, 5, (0.0, 1.0, 0.0, 1.0)), hdr(T.CMD_SUBMIT_3D))
        assert _type(drv.command(green.pack())) == T.RESP_OK_NODATA
        assert drv.flush(5, Rect(0, 0, 32, 24)) == T.RESP_OK_NODATA
        assert drv.listener.wait_for(G.UPDATE, 2)
        assert np.all(drv.listener.rgb(0) == np.array([0, 255, 0], np.uint8))
    assert bp.running


def test_virgl_2d_resources_show_guest_pixels(virgl_ok, gpu_backend):
    bp = gpu_backend("ours", "--virgl")
    w, h = 40, 20
    img = np.random.default_rng(4).integers(0, 256, (h, w * 4), dtype=np.uint8)
    with GpuDriver.connect(bp.socket, features=DRIVER_FEATURES | VIRGL_FEATURE) as drv:
        assert drv.create_2d(1, w, h) == T.RESP_OK_NODATA
        back = drv.alloc_backing(img.nbytes)
        drv.write_backing(back, img.tobytes())
        assert drv.attach_backing(1, back) == T.RESP_OK_NODATA
        assert drv.set_scanout(0, 1, Rect(0, 0, w, h)) == T.RESP_OK_NODATA
        assert drv.transfer(1, Rect(0, 0, w, h)) == T.RESP_OK_NODATA
        assert drv.flush(1, Rect(0, 0, w, h)) == T.RESP_OK_NODATA
        assert drv.listener.wait_for(G.UPDATE, 1)
        assert np.array_equal(drv.listener.rgb(0), img.reshape(h, w, 4)[:, :, [2, 1, 0]])
        assert drv.detach_backing(1) == T.RESP_OK_NODATA
        assert drv.unref(1) == T.RESP_OK_NODATA
        assert drv.unref(1) == T.RESP_ERR_INVALID_RESOURCE_ID
        # hostile: huge resource, backing outside guest memory; then still serving
        assert drv.create_2d(2, 1 << 31, 1 << 31) == T.RESP_ERR_OUT_OF_MEMORY
        assert drv.create_2d(3, 8, 8) == T.RESP_OK_NODATA
        outside = Backing([MemEntry(1 << 40, 4096)])
        assert drv.attach_backing(3, outside) == T.RESP_ERR_UNSPEC
        assert drv.attach_backing(3, drv.alloc_backing(256)) == T.RESP_OK_NODATA
        assert drv.transfer(3, Rect(0, 0, 8, 8)) == T.RESP_OK_NODATA
    assert bp.running
