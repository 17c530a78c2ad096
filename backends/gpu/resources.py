"""2D resources: host images, guest backing pages, and the pixel copies between them.

Theory of operation: a resource is a numpy image (height x width*4 bytes, in
the guest's format) plus a backing list of guest-physical (addr, length)
entries. ATTACH_BACKING checks every entry against guest memory and keeps the
translated, coalesced (region, offset, length) segments; TRANSFER_TO_HOST_2D
gathers the needed byte range of the backing into the image with one numpy
copy per segment and one strided copy per rectangle (never a Python loop per
row or pixel); RESOURCE_FLUSH cuts the rectangle out as x8r8g8b8 for the
display. Copies follow QEMU's vhost-user-gpu: a short backing copies what
exists and leaves the rest of the image as it was.

Views of guest memory live only inside one copy, so the session may unmap a
replaced memory table once the queue worker is between commands.
"""

from __future__ import annotations

import bisect
import logging
import uuid
from dataclasses import dataclass, field

import numpy as np

from vhost_user.errors import GuestMemoryError
from vhost_user.memory import GuestMemory

from .commands import CtrlType, Format, MemEntry, Rect

__all__ = ["Resource", "ResourceTable", "GpuError", "FORMATS", "to_x8r8g8b8", "x8r8g8b8",
           "DEFAULT_MAX_HOSTMEM", "BPP"]

log = logging.getLogger(__name__)

DEFAULT_MAX_HOSTMEM = 256 << 20
BPP = 4

# virtio format -> byte indices (in the resource's memory order) of B, G, R, X:
# the x8r8g8b8 layout the display protocol carries (a little-endian u32 0xXXRRGGBB).
FORMATS: dict[int, tuple[int, int, int, int]] = {
    Format.B8G8R8A8_UNORM: (0, 1, 2, 3),
    Format.B8G8R8X8_UNORM: (0, 1, 2, 3),
    Format.A8R8G8B8_UNORM: (3, 2, 1, 0),
    Format.X8R8G8B8_UNORM: (3, 2, 1, 0),
    Format.R8G8B8A8_UNORM: (2, 1, 0, 3),
    Format.R8G8B8X8_UNORM: (2, 1, 0, 3),
    Format.A8B8G8R8_UNORM: (1, 2, 3, 0),
    Format.X8B8G8R8_UNORM: (1, 2, 3, 0),
}


class GpuError(Exception):
    """A command failed; `code` is the virtio-gpu error response to send."""

    def __init__(self, code: CtrlType, message: str):
        super().__init__(message)
        self.code = code


_PAGE = 4096


@dataclass
class _Backing:
    entries: tuple[MemEntry, ...]
    memory: GuestMemory
    segments: list[tuple[int, int, int]]   # (region index, offset, length), coalesced
    starts: list[int]                       # byte offset of each segment in the backing
    total: int
    # Fast path, when the backing is whole pages of one region (what guests hand over):
    # backing page i is page pages[i] of region `region`, so one np.take gathers it all.
    region: int = -1
    pages: np.ndarray | None = None


def _page_table(memory: GuestMemory, segments) -> tuple[int, np.ndarray | None]:
    if not segments or len({s[0] for s in segments}) != 1:
        return -1, None
    region = segments[0][0]
    if memory.regions[region].size % _PAGE:
        return -1, None
    for k, (_, off, n) in enumerate(segments):
        if off % _PAGE or (n % _PAGE and k != len(segments) - 1):
            return -1, None
    pages = np.concatenate([np.arange(off // _PAGE, (off + n + _PAGE - 1) // _PAGE, dtype=np.intp)
                            for _, off, n in segments])
    return region, pages


def _make_backing(entries, memory: GuestMemory) -> _Backing:
    segments, starts, total = _translate_entries(memory, entries)
    region, pages = _page_table(memory, segments)
    return _Backing(tuple(entries), memory, segments, starts, total, region, pages)


@dataclass
class Resource:
    resource_id: int
    format: int
    width: int
    height: int
    image: np.ndarray = field(repr=False)  # (height, width*4) uint8
    backing: _Backing | None = None

    @property
    def stride(self) -> int:
        return self.width * BPP

    @property
    def nbytes(self) -> int:
        return self.height * self.stride

    backing_needed = 0  # a short backing is allowed: transfers copy what exists (QEMU)


def _translate_entries(memory: GuestMemory, entries) -> tuple[list, list, int]:
    segments: list[list[int]] = []
    for e in entries:
        try:
            parts = memory.translate(e.addr, e.length)
        except GuestMemoryError as exc:
            raise GpuError(CtrlType.RESP_ERR_UNSPEC, f"backing entry {e.addr:#x}+{e.length:#x}: {exc}") from None
        for region, off, n in parts:
            last = segments[-1] if segments else None
            if last and last[0] == region and last[1] + last[2] == off:
                last[2] += n
            else:
                segments.append([region, off, n])
    starts, pos = [], 0
    for s in segments:
        starts.append(pos)
        pos += s[2]
    return [tuple(s) for s in segments], starts, pos


def _gather_into(backing: _Backing, memory: GuestMemory, start: int, dst: np.ndarray) -> int:
    """Copy backing bytes [start, start+len(dst)) into dst; returns bytes copied (clipped)."""
    want = min(len(dst), max(0, backing.total - start))
    if want <= 0:
        return 0
    regions = memory.regions
    if backing.pages is not None and start % _PAGE == 0:
        region = regions[backing.region]
        src = np.frombuffer(region.mmap, dtype=np.uint8, count=region.size,
                            offset=region.mmap_offset).reshape(-1, _PAGE)
        try:
            first, full, rest = start // _PAGE, want // _PAGE, want % _PAGE
            if full:
                # mode="clip" writes straight into `out` (mode="raise" buffers it);
                # every index is inside the region by construction.
                np.take(src, backing.pages[first:first + full], axis=0, mode="clip",
                        out=dst[:full * _PAGE].reshape(full, _PAGE))
            if rest:
                dst[full * _PAGE:want] = src[backing.pages[first + full], :rest]
        finally:
            del src
        return want
    i = bisect.bisect_right(backing.starts, start) - 1
    done = 0
    while done < want:
        region_index, off, n = backing.segments[i]
        skip = start + done - backing.starts[i]
        take = min(n - skip, want - done)
        region = regions[region_index]
        src = np.frombuffer(region.mmap, dtype=np.uint8, count=take,
                            offset=region.mmap_offset + off + skip)
        try:
            np.copyto(dst[done:done + take], src)
        finally:
            del src
        done += take
        i += 1
    return done


def x8r8g8b8(sub: np.ndarray, fmt: int) -> np.ndarray:
    """Pixels `sub` (height, width*4, any strides) of format `fmt` as contiguous x8r8g8b8."""
    order = FORMATS[fmt]
    if order == (0, 1, 2, 3):
        return np.ascontiguousarray(sub)
    h, row = sub.shape
    px = sub.reshape(h, row // BPP, BPP)[:, :, list(order)]
    return px.reshape(h, row)


def to_x8r8g8b8(res: Resource, rect: Rect) -> np.ndarray:
    """The rectangle as contiguous x8r8g8b8 bytes, shape (height, width*4)."""
    sub = res.image[rect.y:rect.y + rect.height, rect.x * BPP:(rect.x + rect.width) * BPP]
    return x8r8g8b8(sub, res.format)


class ResourceTable:
    """The resources of one driver, with a cap on the host memory they may use."""

    def __init__(self, max_hostmem: int = DEFAULT_MAX_HOSTMEM):
        self.max_hostmem = max_hostmem
        self.hostmem = 0
        self._res: dict[int, Resource] = {}   # 2D resources and guest blobs (blob.BlobResource)
        self._uuids: dict[int, bytes] = {}

    def __len__(self) -> int:
        return len(self._res)

    def ids(self) -> list[int]:
        return list(self._res)

    def get(self, resource_id: int) -> Resource | None:
        return self._res.get(resource_id)

    def find(self, resource_id: int) -> Resource:
        res = self._res.get(resource_id)
        if res is None:
            raise GpuError(CtrlType.RESP_ERR_INVALID_RESOURCE_ID, f"no resource {resource_id}")
        return res

    def check_new_id(self, resource_id: int) -> None:
        if resource_id == 0:
            raise GpuError(CtrlType.RESP_ERR_INVALID_RESOURCE_ID, "resource id 0 is reserved")
        if resource_id in self._res:
            raise GpuError(CtrlType.RESP_ERR_INVALID_RESOURCE_ID, f"resource {resource_id} exists")

    def add_blob(self, blob) -> None:
        """Enter a blob (blob.make_blob); blobs share the id space with 2D resources."""
        self.check_new_id(blob.resource_id)
        self._res[blob.resource_id] = blob

    def blobs(self) -> list[int]:
        return [rid for rid, res in self._res.items() if not isinstance(res, Resource)]

    def uuid(self, resource_id: int) -> bytes:
        """RESOURCE_ASSIGN_UUID: a random UUID, the same on every later call for the resource."""
        self.find(resource_id)
        return self._uuids.setdefault(resource_id, uuid.uuid4().bytes)

    def assigned_uuids(self) -> dict[int, bytes]:
        return dict(self._uuids)

    def set_uuid(self, resource_id: int, value: bytes) -> None:
        """A restored UUID (state.load)."""
        self.find(resource_id)
        if len(value) != 16:
            raise GpuError(CtrlType.RESP_ERR_UNSPEC, f"UUID of {len(value)} bytes")
        self._uuids[resource_id] = value

    def create_2d(self, resource_id: int, fmt: int, width: int, height: int) -> Resource:
        self.check_new_id(resource_id)
        if fmt not in FORMATS:
            raise GpuError(CtrlType.RESP_ERR_INVALID_PARAMETER, f"unsupported format {fmt}")
        size = width * height * BPP
        if size > self.max_hostmem - self.hostmem:
            raise GpuError(CtrlType.RESP_ERR_OUT_OF_MEMORY,
                           f"resource {resource_id} of {width}x{height} needs {size} bytes; "
                           f"{self.max_hostmem - self.hostmem} of {self.max_hostmem} left")
        try:
            image = np.zeros((height, width * BPP), dtype=np.uint8)
        except MemoryError:
            raise GpuError(CtrlType.RESP_ERR_OUT_OF_MEMORY, f"cannot allocate {size} bytes") from None
        res = Resource(resource_id, fmt, width, height, image)
        self._res[resource_id] = res
        self.hostmem += size
        return res

    def unref(self, resource_id: int) -> Resource:
        res = self.find(resource_id)
        del self._res[resource_id]
        self._uuids.pop(resource_id, None)
        self.hostmem -= res.nbytes
        res.backing = None
        return res

    def clear(self) -> None:
        self._res.clear()
        self._uuids.clear()
        self.hostmem = 0

    # -- backing ------------------------------------------------------------------
    def attach_backing(self, res: Resource, memory: GuestMemory, entries) -> None:
        if res.backing is not None:
            raise GpuError(CtrlType.RESP_ERR_UNSPEC, f"resource {res.resource_id} already has backing")
        backing = _make_backing(entries, memory)
        if backing.total < res.backing_needed:
            raise GpuError(CtrlType.RESP_ERR_INVALID_PARAMETER,
                           f"backing of {backing.total} bytes for blob {res.resource_id} "
                           f"of {res.backing_needed}")
        res.backing = backing

    def detach_backing(self, res: Resource) -> None:
        if res.backing is None:
            raise GpuError(CtrlType.RESP_ERR_INVALID_RESOURCE_ID,
                           f"resource {res.resource_id} has no backing")
        res.backing = None

    def current_backing(self, res, memory: GuestMemory) -> _Backing:
        """The backing translated against `memory` (re-translated after a memory change)."""
        b = res.backing
        if b.memory is not memory:
            b = res.backing = _make_backing(b.entries, memory)
        return b

    def transfer_to_host_2d(self, res: Resource, memory: GuestMemory, r: Rect, offset: int) -> None:
        """Copy rectangle r from the backing (starting at byte `offset`) into the image."""
        if res.backing is None:
            raise GpuError(CtrlType.RESP_ERR_INVALID_RESOURCE_ID,
                           f"resource {res.resource_id} has no backing")
        if not r.inside(res.width, res.height):
            raise GpuError(CtrlType.RESP_ERR_INVALID_PARAMETER,
                           f"transfer {r} outside resource {res.resource_id} "
                           f"({res.width}x{res.height})")
        backing = self.current_backing(res, memory)
        stride = res.stride
        flat = res.image.reshape(-1)
        if not (offset or r.x or r.y or r.width != res.width):
            _gather_into(backing, memory, 0, flat)
            return
        if r.empty:
            return
        row = r.width * BPP
        if row == stride:  # whole rows: gather straight into the image
            dst = flat[r.y * stride:(r.y + r.height) * stride]
            _gather_into(backing, memory, offset, dst)
            return
        span = stride * (r.height - 1) + row
        tmp = np.empty(span, dtype=np.uint8)
        got = _gather_into(backing, memory, offset, tmp)
        full = 0 if got < row else min(r.height, (got - row) // stride + 1)
        x0 = r.x * BPP
        if full:
            src = np.lib.stride_tricks.as_strided(tmp, shape=(full, row), strides=(stride, 1))
            res.image[r.y:r.y + full, x0:x0 + row] = src
        if full < r.height:
            part = got - full * stride
            if part > 0:
                res.image[r.y + full, x0:x0 + part] = tmp[full * stride:full * stride + part]

    def cursor_image(self, resource_id: int) -> bytes:
        """64x64 ARGB32 (memory B, G, R, A) cursor bytes; zeros if the resource cannot be one."""
        res = self._res.get(resource_id)
        if not isinstance(res, Resource) or res.width != 64 or res.height != 64:
            return bytes(64 * 64 * 4)
        return to_x8r8g8b8(res, Rect(0, 0, 64, 64)).tobytes()
