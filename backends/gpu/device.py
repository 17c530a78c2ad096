"""The virtio-gpu device (2D): control and cursor queues behind vhost-user.

Each queue's worker thread calls a Python handler on every kick (virtio
spec 5.7): the control handler decodes one command at a time through
`commands.parse`, runs it through one dispatch table and writes the response
(fence id and context echoed when VIRTIO_GPU_FLAG_FENCE is set; commands
finish in order, so a fenced command's response is its fence). Pixel
copies are numpy (see `resources`); guest blobs (`blob`) are read straight
from guest memory on every display update. Every failure becomes a virtio-gpu error
response and one log line; nothing the guest sends stops the device.

The display is QEMU's (a `SocketDisplay` on the GPU_SET_SOCKET fd, replaced
on every driver start), else the headless fallback (`--display png:DIR`) or
nothing. Error codes follow QEMU's vhost-user-gpu, so the two answer a
driver alike.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from vhost_user.device import VirtioDevice
from vhost_user.errors import DeviceError, GuestMemoryError
from vhost_user.protocol import ProtocolFeature

from .commands import (
    CURSOR_CMD_SIZE,
    MAX_BACKING_ENTRIES,
    MAX_SCANOUTS,
    BadCommand,
    CtrlHeader,
    CtrlType as T,
    GpuConfig,
    GpuFeature,
    Rect,
    RespEdid,
    ResourceAttachBacking,
    UpdateCursor,
    parse,
    parse_cursor,
)
from . import blob as _blob
from .commands_blob import PARSERS_BLOB, ResourceCreateBlob
from .display import Display, NullDisplay, PngDisplay, SocketDisplay, default_modes
from .display_protocol import CursorPosMsg, CursorUpdateMsg, ScanoutMsg, UpdateMsg
from .resources import DEFAULT_MAX_HOSTMEM, GpuError, ResourceTable, to_x8r8g8b8
from . import sandbox as _sandbox  # noqa: F401 (registers the seccomp profile)
from . import state as gpu_state
from .spec import SPEC

__all__ = ["GpuDevice", "GpuOptions", "CAPABILITIES"]

log = logging.getLogger(__name__)

# docs/interop/vhost-user.json, VHostUserBackendCapabilitiesGPU: only what works.
CAPABILITIES = SPEC.capabilities()  # static; the program may add run-time probes

_CTRL, _CURSOR = 0, 1
# The most command bytes read from one chain: create-blob with its largest entry list.
_MAX_CMD_BYTES = max(ResourceAttachBacking.SIZE, ResourceCreateBlob.SIZE) + 16 * MAX_BACKING_ENTRIES


@dataclass
class GpuOptions:
    display: str | None = None      # None (QEMU's socket only) or "png:DIR"
    outputs: int = 1
    width: int = 1280
    height: int = 800
    max_hostmem: int = DEFAULT_MAX_HOSTMEM


@dataclass
class _Scanout:
    resource_id: int = 0
    rect: Rect = Rect(0, 0, 0, 0)
    fb: _blob.BlobFb | None = None   # set when the scanout shows a guest blob


def _read_prefix(memory, segments, limit: int) -> bytes:
    """At most `limit` device-readable bytes of a chain (a hostile chain may be huge)."""
    out, left = [], limit
    regions = memory.regions
    for i, off, n in segments:
        if left <= 0:
            break
        take = min(n, left)
        out.append(regions[i].read(off, take))
        left -= take
    return b"".join(out)


class GpuDevice(VirtioDevice):
    device_type = SPEC.name
    virtio_id = SPEC.virtio_id
    num_queues = 2
    max_queue_size = 32768
    device_features = ((1 << GpuFeature.VIRTIO_GPU_F_EDID)
                       | (1 << GpuFeature.VIRTIO_GPU_F_RESOURCE_UUID)
                       | (1 << GpuFeature.VIRTIO_GPU_F_RESOURCE_BLOB))
    device_protocol_features = 1 << ProtocolFeature.CONFIG
    # TRANSFER_FROM_HOST and virgl write resource backing pages outside any
    # chain: not logged, so no migration offer (QEMU's vhost-user-gpu has none).
    dirty_log = False
    # QEMU 10's vhost-user-gpu-pci passes the guest's VIRTIO_F_RING_RESET (bit 40) through
    # although no back-end offers it; the Linux driver never resets a GPU queue.
    ignored_acked_features = 1 << 40

    def __init__(self, opts: GpuOptions | None = None):
        super().__init__()
        opts = opts or GpuOptions()
        if not 1 <= opts.outputs <= MAX_SCANOUTS:
            raise DeviceError(f"--outputs must be 1..{MAX_SCANOUTS}")
        if not (0 < opts.width <= 16384 and 0 < opts.height <= 16384):
            raise DeviceError(f"bad resolution {opts.width}x{opts.height}")
        self.opts = opts
        self.modes = default_modes(opts.outputs, opts.width, opts.height)
        self._display_totals: dict[str, int] = {}
        self.fallback = self._make_fallback(opts.display)
        self.display: Display = self.fallback
        self.resources = ResourceTable(opts.max_hostmem)
        self.scanouts = [_Scanout() for _ in range(MAX_SCANOUTS)]
        self._lock = threading.Lock()   # resources and scanouts: ctrl vs cursor worker
        self._dispatch = {
            T.CMD_GET_DISPLAY_INFO: self._get_display_info,
            T.CMD_GET_EDID: self._get_edid,
            T.CMD_RESOURCE_CREATE_2D: self._create_2d,
            T.CMD_RESOURCE_UNREF: self._unref,
            T.CMD_SET_SCANOUT: self._set_scanout,
            T.CMD_RESOURCE_FLUSH: self._flush,
            T.CMD_TRANSFER_TO_HOST_2D: self._transfer,
            T.CMD_RESOURCE_ATTACH_BACKING: self._attach_backing,
            T.CMD_RESOURCE_DETACH_BACKING: self._detach_backing,
            T.CMD_GET_CAPSET_INFO: self._get_capset_info,
            T.CMD_RESOURCE_ASSIGN_UUID: self._assign_uuid,
            T.CMD_RESOURCE_CREATE_BLOB: self._create_blob,
            T.CMD_SET_SCANOUT_BLOB: self._set_scanout_blob,
        }
        self._parsers = PARSERS_BLOB
        self.blob_stats = {"blobs_created": 0, "blob_scanouts": 0, "blob_updates": 0}

    def _make_fallback(self, spec: str | None) -> Display:
        if spec is None or spec == "none":
            return NullDisplay(self.modes)
        kind, _, arg = spec.partition(":")
        if kind == "png" and arg:
            return PngDisplay(arg, self.modes)
        raise DeviceError(f"--display {spec!r}: use png:DIR or none")

    # -- vhost-user hooks ------------------------------------------------------------
    def get_config(self, offset: int, size: int) -> bytes:
        space = GpuConfig(num_scanouts=self.opts.outputs, num_capsets=0).pack()
        if offset + size > len(space):
            raise DeviceError(f"config read {offset}+{size} beyond {len(space)} bytes")
        return space[offset:offset + size]

    def set_config(self, offset: int, data: bytes, flags: int) -> None:
        """Only events_clear is writable, and this device raises no events."""

    def set_gpu_socket(self, fd: int) -> None:
        new = SocketDisplay(fd, self.modes)
        old, self.display = self.display, new
        if old is not self.fallback:
            self._retire(old)
        log.info("display socket set (fd %d)", fd)

    def queue_handler(self, index: int):
        if index == _CTRL:
            return self._handle_ctrl
        if index == _CURSOR:
            return self._handle_cursor
        return super().queue_handler(index)

    def connected(self) -> None:
        self._drop_display()

    def reset(self) -> None:
        """Virtio reset: every resource and scanout goes; the display socket stays."""
        super().reset()
        with self._lock:
            self.resources.clear()
            self.scanouts = [_Scanout() for _ in range(MAX_SCANOUTS)]

    # -- device state (crosvm snapshot / restore; see state.py) -------------------
    def save_state(self) -> bytes:
        with self._lock:
            return gpu_state.save(self.resources, self.scanouts)

    def load_state(self, data: bytes) -> None:
        with self._lock:
            self.scanouts = gpu_state.load(data, self.resources, _Scanout, MAX_SCANOUTS)
            for i, s in enumerate(self.scanouts):
                if s.fb is not None:   # guest pages: shown at the guest's next flush
                    self.display.scanout(ScanoutMsg(i, s.rect.width, s.rect.height))
                elif s.resource_id:   # show the restored frame at once
                    res = self.resources.find(s.resource_id)
                    self.display.scanout(ScanoutMsg(i, s.rect.width, s.rect.height))
                    self.display.update(UpdateMsg(i, 0, 0, s.rect.width, s.rect.height),
                                        to_x8r8g8b8(res, s.rect))
        log.info("restored %d resource(s), %d scanout(s), %d guest blob(s)", len(self.resources),
                 sum(1 for s in self.scanouts if s.resource_id), len(self.resources.blobs()))

    def _drop_display(self) -> None:
        old, self.display = self.display, self.fallback
        if old is not self.fallback:
            self._retire(old)

    def close(self) -> None:
        self._drop_display()

    def counters(self) -> dict:
        """SIGUSR1: the current display's counters (QEMU's socket, when one is set)."""
        out = super().counters()
        totals = dict(self._display_totals)
        for key, value in getattr(self.display, "stats", {}).items():
            totals[key] = totals.get(key, 0) + value
        out.update(totals)
        out.update(self.blob_stats)
        return out

    def _retire(self, display) -> None:
        """Keep a replaced display's counters in the device's totals."""
        for key, value in getattr(display, "stats", {}).items():
            self._display_totals[key] = self._display_totals.get(key, 0) + value
        display.close()

    def capabilities(self) -> dict:
        return CAPABILITIES

    # -- queues ----------------------------------------------------------------------
    def _handle_ctrl(self, vq) -> None:
        memory = vq.memory  # the table the worker runs on; stable for this call
        done = False
        while True:
            chain = vq.pop()
            if chain is None:
                break
            data = _read_prefix(memory, chain.readable, _MAX_CMD_BYTES)
            response = self.execute(data, memory)
            written = chain.write(response)
            if written != len(response):
                log.warning("control queue: response of %d bytes cut to %d (head %d)",
                            len(response), written, chain.head)
            vq.push(chain.head, written)
            done = True
        if done:
            vq.notify()

    def _handle_cursor(self, vq) -> None:
        memory = vq.memory
        done = False
        while True:
            chain = vq.pop()
            if chain is None:
                break
            data = _read_prefix(memory, chain.readable, CURSOR_CMD_SIZE)
            try:
                self.cursor_command(parse_cursor(data))
            except BadCommand as exc:
                log.warning("cursor queue: %s", exc)
            vq.push(chain.head, 0)
            done = True
        if done:
            vq.notify()

    # -- commands ----------------------------------------------------------------------
    def execute(self, data: bytes, memory) -> bytes:
        """Run one control command; return the response bytes."""
        try:
            hdr, cmd = parse(data, self._parsers)
        except BadCommand as exc:
            log.warning("control queue: %s", exc)
            if len(data) >= CtrlHeader.SIZE:  # a fenced command's error still signals its fence
                return CtrlHeader.unpack(data).response(exc.error).pack()
            return CtrlHeader(exc.error).pack()
        handler = self._dispatch.get(hdr.type)
        try:
            if handler is None:
                name = T(hdr.type).name if hdr.type in T._value2member_map_ else hex(hdr.type)
                raise GpuError(T.RESP_ERR_UNSPEC, f"unsupported command {name}")
            with self._lock:
                rtype, body = handler(cmd, data, memory)
        except BadCommand as exc:
            log.warning("control queue: %s", exc)
            return hdr.response(exc.error).pack()
        except GpuError as exc:
            log.warning("control queue: %s", exc)
            return hdr.response(exc.code).pack()
        return hdr.response(rtype).pack() + body

    def _get_display_info(self, cmd, data, memory):
        info = self.display.display_info()
        return T.RESP_OK_DISPLAY_INFO, info.pack()[CtrlHeader.SIZE:]

    def _get_edid(self, cmd, data, memory):
        if cmd.scanout >= MAX_SCANOUTS:
            raise GpuError(T.RESP_ERR_INVALID_PARAMETER, f"EDID of scanout {cmd.scanout}")
        edid = self.display.edid(cmd.scanout)
        if edid is None:
            raise GpuError(T.RESP_ERR_INVALID_PARAMETER, f"no EDID for scanout {cmd.scanout}")
        return T.RESP_OK_EDID, RespEdid(edid).pack()[CtrlHeader.SIZE:]

    def _create_2d(self, cmd, data, memory):
        self.resources.create_2d(cmd.resource_id, cmd.format, cmd.width, cmd.height)
        return T.RESP_OK_NODATA, b""

    def _unref(self, cmd, data, memory):
        res = self.resources.find(cmd.resource_id)
        self._disable_scanouts_of(res.resource_id)
        self.resources.unref(cmd.resource_id)
        return T.RESP_OK_NODATA, b""

    def _disable_scanouts_of(self, resource_id: int) -> None:
        """No scanout may keep showing (reading the pages of) a resource that goes."""
        for i, s in enumerate(self.scanouts):
            if s.resource_id == resource_id:
                self._disable_scanout(i)

    def _disable_scanout(self, i: int) -> None:
        if self.scanouts[i].resource_id == 0:
            return
        self.scanouts[i] = _Scanout()
        self.display.scanout(ScanoutMsg(i, 0, 0))

    def _set_scanout(self, cmd, data, memory):
        if cmd.scanout_id >= MAX_SCANOUTS:
            raise GpuError(T.RESP_ERR_INVALID_SCANOUT_ID, f"scanout {cmd.scanout_id}")
        if cmd.resource_id == 0:
            self._disable_scanout(cmd.scanout_id)
            return T.RESP_OK_NODATA, b""
        res = self.resources.find(cmd.resource_id)
        if isinstance(res, _blob.BlobResource):
            raise GpuError(T.RESP_ERR_INVALID_PARAMETER,
                           f"SET_SCANOUT on blob {res.resource_id}: use SET_SCANOUT_BLOB")
        if not cmd.r.inside(res.width, res.height):
            raise GpuError(T.RESP_ERR_INVALID_PARAMETER,
                           f"scanout {cmd.scanout_id} rect {cmd.r} outside resource "
                           f"{res.resource_id} ({res.width}x{res.height})")
        self.scanouts[cmd.scanout_id] = _Scanout(res.resource_id, cmd.r)
        self.display.scanout(ScanoutMsg(cmd.scanout_id, cmd.r.width, cmd.r.height))
        return T.RESP_OK_NODATA, b""

    def _flush(self, cmd, data, memory):
        res = self.resources.find(cmd.resource_id)
        if isinstance(res, _blob.BlobResource):
            self._flush_blob(res, cmd.r, memory)
            return T.RESP_OK_NODATA, b""
        if not cmd.r.inside(res.width, res.height):
            raise GpuError(T.RESP_ERR_INVALID_PARAMETER,
                           f"flush {cmd.r} outside resource {res.resource_id} "
                           f"({res.width}x{res.height})")
        for i, s in enumerate(self.scanouts):
            if s.resource_id != res.resource_id:
                continue
            part = cmd.r.intersect(s.rect)
            if part.empty:
                continue
            pixels = to_x8r8g8b8(res, part)
            self.display.update(UpdateMsg(i, part.x - s.rect.x, part.y - s.rect.y,
                                          part.width, part.height), pixels)
        return T.RESP_OK_NODATA, b""

    def _transfer(self, cmd, data, memory):
        res = self.resources.get(cmd.resource_id)
        if isinstance(res, _blob.BlobResource):
            return T.RESP_OK_NODATA, b""   # the display reads the guest's pages: nothing to copy
        if res is None or res.backing is None:
            raise GpuError(T.RESP_ERR_INVALID_RESOURCE_ID,
                           f"transfer to resource {cmd.resource_id} without backing")
        try:
            self.resources.transfer_to_host_2d(res, memory, cmd.r, cmd.offset)
        except GuestMemoryError as exc:
            raise GpuError(T.RESP_ERR_UNSPEC, f"transfer: {exc}") from None
        return T.RESP_OK_NODATA, b""

    def _attach_backing(self, cmd, data, memory):
        res = self.resources.find(cmd.resource_id)
        if res.backing is not None:
            raise GpuError(T.RESP_ERR_UNSPEC, f"resource {res.resource_id} already has backing")
        full = ResourceAttachBacking.unpack_all(data)
        self.resources.attach_backing(res, memory, full.entries)
        return T.RESP_OK_NODATA, b""

    def _detach_backing(self, cmd, data, memory):
        res = self.resources.get(cmd.resource_id)
        if res is None or res.backing is None:
            raise GpuError(T.RESP_ERR_INVALID_RESOURCE_ID,
                           f"detach from resource {cmd.resource_id} without backing")
        if isinstance(res, _blob.BlobResource):
            self._disable_scanouts_of(res.resource_id)   # nothing may read the pages after this
        self.resources.detach_backing(res)
        return T.RESP_OK_NODATA, b""

    # -- blobs and UUIDs (virtio 5.7.6.8; see blob.py) ----------------------------------
    def _assign_uuid(self, cmd, data, memory):
        return T.RESP_OK_RESOURCE_UUID, self.resources.uuid(cmd.resource_id)

    def _create_blob(self, cmd, data, memory):
        self.resources.check_new_id(cmd.resource_id)
        res = _blob.make_blob(cmd, memory)
        self.resources.add_blob(res)
        self.blob_stats["blobs_created"] += 1
        log.debug("blob %d: %d guest bytes in %d entries", res.resource_id, res.size,
                  len(cmd.entries))
        return T.RESP_OK_NODATA, b""

    def _set_scanout_blob(self, cmd, data, memory):
        sid = cmd.scanout_id
        if sid >= self.opts.outputs:
            raise GpuError(T.RESP_ERR_INVALID_SCANOUT_ID, f"scanout-blob on scanout {sid}")
        if cmd.resource_id == 0:
            self._disable_scanout(sid)
            return T.RESP_OK_NODATA, b""
        res = self.resources.find(cmd.resource_id)
        if not isinstance(res, _blob.BlobResource):
            raise GpuError(T.RESP_ERR_INVALID_PARAMETER,
                           f"SET_SCANOUT_BLOB on resource {res.resource_id}, which is not a blob")
        fb = _blob.check_fb(cmd, res, self.resources.max_hostmem)
        r = cmd.r
        pixels = _blob.read_rect(self.resources.current_backing(res, memory), memory, fb, r)
        first = self.scanouts[sid].fb != fb   # a new mode, not a page flip between two blobs
        self.scanouts[sid] = _Scanout(res.resource_id, r, fb)
        self.display.scanout(ScanoutMsg(sid, r.width, r.height))
        self.display.update(UpdateMsg(sid, 0, 0, r.width, r.height), pixels)
        self.blob_stats["blob_scanouts"] += 1
        if first:
            log.info("scanout %d shows blob %d (%dx%d, stride %d, format %d)", sid,
                     res.resource_id, fb.width, fb.height, fb.stride, fb.format)
        return T.RESP_OK_NODATA, b""

    def _flush_blob(self, res, r: Rect, memory) -> None:
        backing = None
        for i, s in enumerate(self.scanouts):
            if s.resource_id != res.resource_id or s.fb is None:
                continue
            part = r.intersect(s.rect)
            if part.empty:
                continue
            backing = backing or self.resources.current_backing(res, memory)
            pixels = _blob.read_rect(backing, memory, s.fb, part)
            self.display.update(UpdateMsg(i, part.x - s.rect.x, part.y - s.rect.y,
                                          part.width, part.height), pixels)
            self.blob_stats["blob_updates"] += 1

    def _get_capset_info(self, cmd, data, memory):
        # num_capsets is 0 without virgl: every index is out of range (virtio 5.7.6.8).
        raise GpuError(T.RESP_ERR_INVALID_PARAMETER, f"capset index {cmd.capset_index}: no capsets")

    def cursor_command(self, cmd: UpdateCursor) -> None:
        pos = CursorPosMsg(cmd.pos.scanout_id, cmd.pos.x, cmd.pos.y)
        if cmd.hdr.type == T.CMD_MOVE_CURSOR:
            self.display.cursor_pos(pos, visible=cmd.resource_id != 0)
        elif cmd.hdr.type == T.CMD_UPDATE_CURSOR:
            with self._lock:
                image = self.resources.cursor_image(cmd.resource_id)
            self.display.cursor_update(CursorUpdateMsg(pos, cmd.hot_x, cmd.hot_y, image))
        else:
            log.warning("cursor queue: unknown command %#x", cmd.hdr.type)
