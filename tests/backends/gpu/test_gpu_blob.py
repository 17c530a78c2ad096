"""Guest-memory blob resources and UUIDs (virtio 1.2+, 5.7.6.8) on our vhost-user-gpu.

The driver model sends what Linux's virtio-gpu sends for a dumb buffer when
the device offers RESOURCE_BLOB without 3D: CREATE_BLOB (blob_mem GUEST,
USE_SHAREABLE, the shmem pages as entries), SET_SCANOUT_BLOB, then
TRANSFER_TO_HOST_2D + RESOURCE_FLUSH per damaged rectangle. Hostile variants
get their virtio-gpu error, one log line each, and the device goes on.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from backends_proc import open_fds
from pngread import read_png
from vhost_user.backends.gpu.blob import MAX_BLOB_SIZE
from vhost_user.backends.gpu.commands import (
    CtrlType as T, Format, GpuFeature, MemEntry, Rect, ResourceUnref, parse)
from vhost_user.backends.gpu.commands_blob import (
    BlobMem,
    ResourceAssignUuid,
    ResourceCreateBlob,
    RespResourceUuid,
    SetScanoutBlob,
    PARSERS_BLOB,
)
from vhost_user.backends.gpu.display_protocol import GpuRequest as G
from vhost_user.backends.gpu.driver import BLOB_FEATURES, Backing, GpuDriver
from vhost_user.frontend import CROSVM, Frontend, GuestRam
from vhost_user.frontend.migration import load_device_state, save_device_state
from vhost_user.frontend.profiles import crosvm_ram_layout

OK = T.RESP_OK_NODATA
W, H = 64, 40


def _frame(seed: int, w: int = W, h: int = H, stride: int | None = None) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, stride or w * 4), dtype=np.uint8)


def _rgb(fb: np.ndarray, w: int, h: int) -> np.ndarray:
    """What the display shows of B8G8R8X8 framebuffer bytes."""
    return fb[:h, :w * 4].reshape(h, w, 4)[:, :, [2, 1, 0]]


def _blob(drv: GpuDriver, rid: int, data: np.ndarray, seed: int = 1) -> Backing:
    backing = drv.alloc_backing(data.nbytes, seed=seed)
    drv.write_backing(backing, data.tobytes())
    assert drv.create_blob(rid, backing) == OK
    return backing


def _connect(bp, **kw) -> GpuDriver:
    return GpuDriver.connect(bp.socket, features=BLOB_FEATURES, **kw)


def test_blob_commands_have_the_spec_sizes_and_round_trip():
    assert ResourceCreateBlob.SIZE == 56 and SetScanoutBlob.SIZE == 96
    assert ResourceAssignUuid.SIZE == 32 and RespResourceUuid.SIZE == 40
    entries = (MemEntry(0x1000, 4096), MemEntry(0x9000, 100))
    for cmd in (ResourceCreateBlob(3, 1, 2, 4196, 0, entries, nr_entries=2),
                SetScanoutBlob(Rect(1, 2, 3, 4), 1, 7, 640, 480, 2, (2560, 0, 0, 0), (64, 0, 0, 0)),
                ResourceAssignUuid(9)):
        data = cmd.pack_all() if isinstance(cmd, ResourceCreateBlob) else cmd.pack()
        assert parse(data, PARSERS_BLOB)[1] == cmd
    assert parse(ResourceAssignUuid(9).pack())[1] is None   # not a 2D command


def test_blob_features_are_offered_in_2d_only(gpu_backend):
    bp = gpu_backend("ours")
    with _connect(bp) as drv:
        offered = drv.fe.backend_features
        assert offered & (1 << GpuFeature.VIRTIO_GPU_F_RESOURCE_BLOB)
        assert offered & (1 << GpuFeature.VIRTIO_GPU_F_RESOURCE_UUID)
    from vhost_user.backends.gpu.device3d import VirglGpuDevice
    assert not VirglGpuDevice.device_features & (1 << GpuFeature.VIRTIO_GPU_F_RESOURCE_BLOB)


def test_blob_scanout_shows_guest_memory_and_flush_rereads_it(gpu_backend):
    """No TRANSFER needed: SET_SCANOUT_BLOB shows the pages; a flush shows what the guest
    wrote since, on scattered pages, with a stride wider than the row and an offset."""
    bp = gpu_backend("ours")
    stride, offset = W * 4 + 256, 4096
    with _connect(bp) as drv:
        fb = _frame(1, stride=stride)
        data = np.concatenate([np.zeros(offset, np.uint8), fb.reshape(-1)])
        backing = _blob(drv, 5, data)
        assert drv.set_scanout_blob(0, 5, W, H, stride=stride, offset=offset) == OK
        assert drv.listener.wait_for(G.UPDATE, 1)
        assert np.array_equal(drv.listener.rgb(0), _rgb(fb, W, H))
        fb2 = _frame(2, stride=stride)
        drv.write_backing(backing, fb2.tobytes(), offset)
        assert drv.transfer(5, Rect(0, 0, W, H)) == OK   # accepted, nothing to copy
        assert drv.flush(5, Rect(8, 4, 16, 8)) == OK      # only this rectangle is re-read
        assert drv.listener.wait_for(G.UPDATE, 2)
        want = _rgb(fb, W, H).copy()
        want[4:12, 8:24] = _rgb(fb2, W, H)[4:12, 8:24]
        assert np.array_equal(drv.listener.rgb(0), want)
        assert drv.flush(5, Rect(0, 0, W, H)) == OK
        assert drv.listener.wait_for(G.UPDATE, 3)
        assert np.array_equal(drv.listener.rgb(0), _rgb(fb2, W, H))
    assert "scanout 0 shows blob 5" in bp.log()


def test_blob_scanout_window_and_formats(gpu_backend):
    """A scanout rect inside the framebuffer and a non-BGRX format."""
    bp = gpu_backend("ours")
    with _connect(bp, outputs=[(32, 16)]) as drv:
        fb = _frame(3)
        _blob(drv, 1, fb)
        r = Rect(10, 20, 32, 16)
        assert drv.set_scanout_blob(0, 1, W, H, fmt=Format.R8G8B8X8_UNORM, r=r) == OK
        assert drv.listener.wait_for(G.UPDATE, 1)
        px = fb.reshape(H, W, 4)[20:36, 10:42]
        assert np.array_equal(drv.listener.rgb(0), px[:, :, [0, 1, 2]])


def test_blob_uuid_is_stable_random_and_per_resource(gpu_backend):
    bp = gpu_backend("ours")
    with _connect(bp) as drv:
        _blob(drv, 1, _frame(1))
        assert drv.create_2d(2, 8, 8) == OK
        t1, u1 = drv.assign_uuid(1)
        t2, u2 = drv.assign_uuid(2)
        assert t1 == t2 == T.RESP_OK_RESOURCE_UUID and len(u1) == 16 and u1 != u2
        assert drv.assign_uuid(1) == (T.RESP_OK_RESOURCE_UUID, u1)
        assert drv.assign_uuid(99)[0] == T.RESP_ERR_INVALID_RESOURCE_ID
        assert drv.unref(1) == OK and drv.assign_uuid(1)[0] == T.RESP_ERR_INVALID_RESOURCE_ID


def test_blob_unref_and_detach_of_a_shown_blob_turn_the_scanout_off(gpu_backend):
    bp = gpu_backend("ours")
    with _connect(bp) as drv:
        for rid, how in ((1, "unref"), (2, "detach")):
            _blob(drv, rid, _frame(rid), seed=rid)
            assert drv.set_scanout_blob(0, rid, W, H) == OK
            assert drv.listener.wait_for(G.UPDATE, rid)
            assert (drv.unref(rid) if how == "unref" else drv.detach_backing(rid)) == OK
            assert drv.listener.rgb(0) is None or drv.listener.wait_for(G.SCANOUT, 2 * rid)
            assert drv.listener.rgb(0) is None, how
        assert drv.flush(2, Rect(0, 0, W, H)) == OK        # shown nowhere: nothing read
        assert drv.set_scanout_blob(0, 2, W, H) == T.RESP_ERR_UNSPEC   # no pages any more
        assert drv.attach_backing(2, drv.alloc_backing(100)) == T.RESP_ERR_INVALID_PARAMETER
        back = drv.alloc_backing(W * H * 4)
        assert drv.attach_backing(2, back) == OK
        assert drv.set_scanout_blob(0, 2, W, H) == OK


def test_blob_hostile_commands_get_their_error_and_the_device_goes_on(gpu_backend):
    bp = gpu_backend("ours")
    with _connect(bp) as drv:
        size = W * H * 4
        good = drv.alloc_backing(size)
        outside = Backing([MemEntry(1 << 40, 4096)])
        wrap = Backing([MemEntry((1 << 64) - 4096, 8192)])
        cases = [
            ("host3d", drv.create_blob(1, good, blob_mem=BlobMem.VIRTIO_GPU_BLOB_MEM_HOST3D),
             T.RESP_ERR_INVALID_PARAMETER),
            ("host3d-guest", drv.create_blob(1, good, blob_mem=BlobMem.VIRTIO_GPU_BLOB_MEM_HOST3D_GUEST),
             T.RESP_ERR_INVALID_PARAMETER),
            ("blob_mem 0", drv.create_blob(1, good, blob_mem=0), T.RESP_ERR_INVALID_PARAMETER),
            ("id 0", drv.create_blob(0, good), T.RESP_ERR_INVALID_RESOURCE_ID),
            ("size 0", drv.create_blob(1, good, 0), T.RESP_ERR_INVALID_PARAMETER),
            ("size > entries", drv.create_blob(1, good, size + 1), T.RESP_ERR_INVALID_PARAMETER),
            ("size huge", drv.create_blob(1, good, MAX_BLOB_SIZE + 1), T.RESP_ERR_INVALID_PARAMETER),
            ("size u64 max", drv.create_blob(1, good, (1 << 64) - 1), T.RESP_ERR_INVALID_PARAMETER),
            ("outside RAM", drv.create_blob(1, outside), T.RESP_ERR_UNSPEC),
            ("wrapping entry", drv.create_blob(1, wrap, 4096), T.RESP_ERR_UNSPEC),
            ("entries missing", drv.create_blob(1, good, nr_entries=len(good.entries) + 3),
             T.RESP_ERR_UNSPEC),
        ]
        assert drv.create_2d(7, 8, 8) == OK
        cases.append(("id of a 2D resource", drv.create_blob(7, good), T.RESP_ERR_INVALID_RESOURCE_ID))
        assert drv.create_blob(1, good) == OK
        cases.append(("id of a blob", drv.create_blob(1, good), T.RESP_ERR_INVALID_RESOURCE_ID))
        sb = drv.set_scanout_blob
        cases += [
            ("scanout id", sb(1, 1, W, H), T.RESP_ERR_INVALID_SCANOUT_ID),
            ("scanout id u32", sb(0xFFFFFFFF, 1, W, H), T.RESP_ERR_INVALID_SCANOUT_ID),
            ("no resource", sb(0, 42, W, H), T.RESP_ERR_INVALID_RESOURCE_ID),
            ("not a blob", sb(0, 7, 8, 8), T.RESP_ERR_INVALID_PARAMETER),
            ("format", sb(0, 1, W, H, fmt=999), T.RESP_ERR_INVALID_PARAMETER),
            ("format 0", sb(0, 1, W, H, fmt=0), T.RESP_ERR_INVALID_PARAMETER),
            ("width 0", sb(0, 1, 0, H), T.RESP_ERR_INVALID_PARAMETER),
            ("stride short", sb(0, 1, W, H, stride=W * 4 - 4), T.RESP_ERR_INVALID_PARAMETER),
            ("past the end", sb(0, 1, W, H + 1), T.RESP_ERR_INVALID_PARAMETER),
            ("offset past", sb(0, 1, W, H, offset=4), T.RESP_ERR_INVALID_PARAMETER),
            ("offset u32", sb(0, 1, W, H, offset=0xFFFFFFFF), T.RESP_ERR_INVALID_PARAMETER),
            ("stride u32", sb(0, 1, W, H, stride=0xFFFFFFFF), T.RESP_ERR_INVALID_PARAMETER),
            ("wrapping stride", sb(0, 1, 1 << 14, 1 << 14, stride=0xFFFFFFFC), T.RESP_ERR_INVALID_PARAMETER),
            ("rect outside", sb(0, 1, W, H, r=Rect(1, 0, W, H)), T.RESP_ERR_INVALID_PARAMETER),
            ("rect wraps", sb(0, 1, W, H, r=Rect(0xFFFFFFFF, 0, 2, 1)), T.RESP_ERR_INVALID_PARAMETER),
            ("2D scanout on a blob", drv.set_scanout(0, 1, Rect(0, 0, W, H)), T.RESP_ERR_INVALID_PARAMETER),
            ("attach to a blob", drv.attach_backing(1, good), T.RESP_ERR_UNSPEC),
        ]
        bad = [(name, T(got).name, T(want).name) for name, got, want in cases if got != want]
        assert not bad, bad
        assert drv.listener.count(G.UPDATE) == 0
        fb = _frame(9)
        drv.write_backing(good, fb.tobytes())
        assert drv.set_scanout_blob(0, 1, W, H) == OK   # still serving
        assert drv.listener.wait_for(G.UPDATE, 1)
        assert np.array_equal(drv.listener.rgb(0), _rgb(fb, W, H))
        assert drv.set_scanout_blob(0, 0, 0, 0) == OK   # resource 0: scanout off
    log = bp.log()
    assert log.count("only guest blobs here") == 3, log
    assert "past the blob's" in log and "which is not a blob" in log


def _wait_png(path: str, want: np.ndarray) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if np.array_equal(read_png(path), want):
                return
        except (OSError, ValueError):
            pass   # not there yet, or being written
        time.sleep(0.05)
    raise AssertionError(f"{path} never showed the expected frame")


def test_blob_pages_are_found_again_through_a_new_memory_table(gpu_backend, tmp_path):
    """crosvm's sleep and wake send SET_MEM_TABLE again: the blob's entries are translated
    against the new table on first use (headless PNG display: crosvm sends no socket)."""
    out = str(tmp_path / "png")
    bp = gpu_backend("ours", "--display", f"png:{out}")
    with GpuDriver.connect(bp.socket, features=BLOB_FEATURES, profile=CROSVM) as drv:
        fb = _frame(4)
        backing = _blob(drv, 1, fb)
        assert drv.set_scanout_blob(0, 1, W, H) == OK
        _wait_png(os.path.join(out, "scanout-0.png"), _rgb(fb, W, H))
        drv.fe.resume(drv.fe.suspend())
        fb2 = _frame(5)
        drv.write_backing(backing, fb2.tobytes())
        assert drv.flush(1, Rect(0, 0, W, H)) == OK
        _wait_png(os.path.join(out, "scanout-0.png"), _rgb(fb2, W, H))


def test_blob_snapshot_restores_blobs_and_their_scanout_into_a_new_process(gpu_backend, tmp_path):
    """crosvm's snapshot with a shown guest blob and a UUID: a new back-end process gets
    them (LOAD), and the guest's next flush shows its pages through the restored blob."""
    ram = GuestRam(crosvm_ram_layout(160 << 20, pci_start=32 << 20), single_fd=True, alloc_region=3)
    out_a, out_b = str(tmp_path / "png-a"), str(tmp_path / "png-b")
    try:
        a = gpu_backend("ours", "--display", f"png:{out_a}")
        fe = Frontend(a.socket, ram, profile=CROSVM)
        fe.negotiate(BLOB_FEATURES)
        drv = GpuDriver(fe, None)
        fb = _frame(1)
        backing = _blob(drv, 3, fb)
        assert drv.set_scanout_blob(0, 3, W, H) == OK
        _wait_png(os.path.join(out_a, "scanout-0.png"), _rgb(fb, W, H))
        _, uuid = drv.assign_uuid(3)
        fe.suspend()
        state = save_device_state(fe)
        fe.close()
        a.stop()

        b = gpu_backend("ours", "--display", f"png:{out_b}")
        fe = Frontend(b.socket, ram, profile=CROSVM)
        fe.negotiate(BLOB_FEATURES)
        load_device_state(fe, state)
        drv = GpuDriver(fe, None)
        fb2 = _frame(2)
        drv.write_backing(backing, fb2.tobytes())
        assert drv.transfer(3, Rect(0, 0, W, H)) == OK
        assert drv.flush(3, Rect(0, 0, W, H)) == OK
        _wait_png(os.path.join(out_b, "scanout-0.png"), _rgb(fb2, W, H))
        assert drv.assign_uuid(3) == (T.RESP_OK_RESOURCE_UUID, uuid)
        assert drv.create_blob(3, backing) == T.RESP_ERR_INVALID_RESOURCE_ID   # the id is taken
        fe.close()
        assert "restored 1 resource(s), 1 scanout(s), 1 guest blob(s)" in b.log()
    finally:
        ram.close()


def _device_with_blob(fb_stride: int = W * 4):
    from vhost_user.backends.gpu.device import GpuDevice
    from vhost_user.fuzzing.guestram import FuzzRam
    ram = FuzzRam()
    memory = ram.memory()
    dev = GpuDevice()
    for cmd in (ResourceCreateBlob(1, 1, 2, 0x4000, 0, (MemEntry(0x1000, 0x4000),)).pack_all(),
                SetScanoutBlob(Rect(0, 0, 16, 16), 0, 1, 16, 16, 2, (fb_stride, 0, 0, 0)).pack()):
        assert dev.execute(cmd, memory)[:4] == OK.to_bytes(4, "little")
    return ram, memory, dev


def test_blob_state_round_trips_and_a_damaged_framebuffer_is_refused():
    import json
    from vhost_user.backends.gpu.device import GpuDevice
    ram, memory, dev = _device_with_blob()
    other = GpuDevice()
    try:
        state = dev.save_state()
        other.load_state(state)
        assert other.resources.blobs() == [1]
        assert other.scanouts[0].fb == dev.scanouts[0].fb and other.scanouts[0].resource_id == 1
        n = int.from_bytes(state[:4], "little")
        meta = json.loads(state[4:4 + n])
        for damage in (lambda m: m["scanouts"][0][5].__setitem__(4, 0x4000),    # offset past the end
                       lambda m: m["scanouts"][0][5].__setitem__(0, 999),       # format
                       lambda m: m["blobs"][0].__setitem__("blob_mem", 2),       # host3d
                       lambda m: m["blobs"][0].__setitem__("size", 0x5000),      # entries too short
                       lambda m: m["scanouts"][0].__setitem__(5, None)):         # blob without fb
            bad = json.loads(json.dumps(meta))
            damage(bad)
            text = json.dumps(bad).encode()
            with pytest.raises(ValueError):
                other.load_state(len(text).to_bytes(4, "little") + text + state[4 + n:])
            assert len(other.resources) == 0
        assert dev.execute(ResourceUnref(1).pack(), memory)[:4] == OK.to_bytes(4, "little")
        assert dev.scanouts[0].resource_id == 0
    finally:
        for d in (dev, other):
            d.close()
        memory.close()
        ram.close()


def test_blob_device_keeps_no_fds_after_many_blobs(gpu_backend):
    before = open_fds()
    bp = gpu_backend("ours")
    with _connect(bp) as drv:
        for rid in range(1, 30):
            _blob(drv, rid, _frame(rid, 16, 16), seed=rid)
            assert drv.set_scanout_blob(0, rid, 16, 16) == OK
            assert drv.unref(rid) == OK
    bp.stop()
    assert open_fds() == before


def test_blob_commands_are_in_the_fuzz_target_and_get_past_validation(monkeypatch):
    """gpu-commands builds CREATE_BLOB / SET_SCANOUT_BLOB / ASSIGN_UUID with fuzzed fields;
    random inputs reach their success paths, and every invariant of the target holds."""
    import logging
    import random
    from vhost_user.backends.gpu import fuzz

    ok: set[int] = set()
    real = fuzz.control_round

    def counting(dev, cmd, memory, *args):
        good = real(dev, cmd, memory, *args)
        if good:
            ok.add(int.from_bytes(cmd[:4], "little"))
        return good

    monkeypatch.setattr(fuzz, "control_round", counting)
    rng = random.Random(7)
    logging.disable(logging.CRITICAL)
    try:
        for _ in range(3000):
            fuzz.run_one(rng.randbytes(rng.randrange(600)))
    finally:
        logging.disable(logging.NOTSET)
    assert {T.CMD_RESOURCE_CREATE_BLOB, T.CMD_SET_SCANOUT_BLOB} <= ok, sorted(map(hex, ok))
