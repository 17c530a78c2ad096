"""Guest-memory blob resources (VIRTIO_GPU_BLOB_MEM_GUEST): scanouts read from guest pages.

Theory of operation: a guest blob is `size` bytes of the guest's own pages,
the mem entries that follow RESOURCE_CREATE_BLOB, checked and translated as
ATTACH_BACKING's are (and translated again after a memory-table change).
The host keeps no copy: TRANSFER_TO_HOST_2D has nothing to do, and a scanout
on a blob (SET_SCANOUT_BLOB) is only a framebuffer description (format,
width, height, plane 0's stride and offset), checked once against the blob's
size. Every display update, at SET_SCANOUT_BLOB and on each RESOURCE_FLUSH,
reads the rectangle straight from guest memory. Linux's virtio-gpu creates
its dumb buffers (so fbdev's) this way when RESOURCE_BLOB is offered and 3D
is not.

All arithmetic is on Python integers, so `offset + stride * (height - 1) +
width * 4` cannot wrap: a value that would overflow a C u32/u64 is simply
larger than the blob and refused. Blobs use none of the table's host-memory
budget; a scanout's rectangle (what one update copies) is bounded by it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from vhost_user.memory import GuestMemory

from .commands import CtrlType as T, Rect
from .commands_blob import BlobMem, ResourceCreateBlob, SetScanoutBlob
from .resources import BPP, FORMATS, GpuError, _Backing, _gather_into, _make_backing, x8r8g8b8

__all__ = ["BlobResource", "BlobFb", "make_blob", "check_fb", "read_rect", "MAX_BLOB_SIZE",
           "MAX_FB_SIDE"]

#: the largest blob accepted (Linux's largest dumb buffer, 16384x16384x4, is 1 GiB)
MAX_BLOB_SIZE = 1 << 32
MAX_FB_SIDE = 16384


@dataclass
class BlobResource:
    resource_id: int
    blob_mem: int
    blob_flags: int
    size: int
    backing: _Backing | None
    nbytes: ClassVar[int] = 0   # host memory it uses: none

    @property
    def backing_needed(self) -> int:
        """The bytes any backing of this resource must cover."""
        return self.size


@dataclass(frozen=True)
class BlobFb:
    """A checked SET_SCANOUT_BLOB framebuffer: plane 0 of a 4-byte format."""

    format: int
    width: int
    height: int
    stride: int
    offset: int


def make_blob(cmd: ResourceCreateBlob, memory: GuestMemory) -> BlobResource:
    """The guest blob `cmd` describes; GpuError for anything this device cannot back."""
    rid = cmd.resource_id
    if cmd.blob_mem != BlobMem.VIRTIO_GPU_BLOB_MEM_GUEST:
        name = (BlobMem(cmd.blob_mem).name if cmd.blob_mem in BlobMem._value2member_map_
                else str(cmd.blob_mem))
        raise GpuError(T.RESP_ERR_INVALID_PARAMETER,
                       f"blob {rid}: blob_mem {name} needs 3D; only guest blobs here")
    if not 0 < cmd.size <= MAX_BLOB_SIZE:
        raise GpuError(T.RESP_ERR_INVALID_PARAMETER,
                       f"blob {rid}: size {cmd.size} not in 1..{MAX_BLOB_SIZE}")
    backing = _make_backing(cmd.entries, memory)   # GpuError(UNSPEC) outside guest memory
    if backing.total < cmd.size:
        raise GpuError(T.RESP_ERR_INVALID_PARAMETER,
                       f"blob {rid}: {len(cmd.entries)} entries cover {backing.total} "
                       f"of its {cmd.size} bytes")
    return BlobResource(rid, cmd.blob_mem, cmd.blob_flags, cmd.size, backing)


def check_fb(cmd: SetScanoutBlob, blob: BlobResource, max_bytes: int) -> BlobFb:
    """Validate a SET_SCANOUT_BLOB against its blob (virtio 5.7.6.8); GpuError if it does not fit."""
    where = f"scanout-blob {cmd.scanout_id} on blob {blob.resource_id}"
    if cmd.format not in FORMATS:
        raise GpuError(T.RESP_ERR_INVALID_PARAMETER, f"{where}: unsupported format {cmd.format}")
    w, h = cmd.width, cmd.height
    if not (0 < w <= MAX_FB_SIDE and 0 < h <= MAX_FB_SIDE):
        raise GpuError(T.RESP_ERR_INVALID_PARAMETER, f"{where}: framebuffer {w}x{h}")
    stride, offset = cmd.strides[0], cmd.offsets[0]
    if stride < w * BPP:
        raise GpuError(T.RESP_ERR_INVALID_PARAMETER, f"{where}: stride {stride} < {w} * {BPP}")
    end = offset + stride * (h - 1) + w * BPP   # exact: Python integers do not wrap
    if end > blob.size:
        raise GpuError(T.RESP_ERR_INVALID_PARAMETER,
                       f"{where}: framebuffer {w}x{h} stride {stride} offset {offset} ends at "
                       f"byte {end}, past the blob's {blob.size}")
    if not cmd.r.inside(w, h):
        raise GpuError(T.RESP_ERR_INVALID_PARAMETER, f"{where}: rect {cmd.r} outside {w}x{h}")
    if cmd.r.width * cmd.r.height * BPP > max_bytes:
        raise GpuError(T.RESP_ERR_OUT_OF_MEMORY,
                       f"{where}: a {cmd.r.width}x{cmd.r.height} update needs more than "
                       f"{max_bytes} bytes of host memory")
    if blob.backing is None:
        raise GpuError(T.RESP_ERR_UNSPEC, f"{where}: the blob has no backing")
    return BlobFb(cmd.format, w, h, stride, offset)


def read_rect(backing: _Backing, memory: GuestMemory, fb: BlobFb, r: Rect) -> np.ndarray:
    """Framebuffer rectangle `r` (inside fb) from guest memory as x8r8g8b8, shape (h, w*4)."""
    row = r.width * BPP
    if r.empty:
        return np.zeros((r.height, row), np.uint8)
    start = fb.offset + r.y * fb.stride + r.x * BPP
    span = fb.stride * (r.height - 1) + row
    if span <= 2 * row * r.height:   # dense rows: one gather, then a strided view
        tmp = np.empty(span, np.uint8)   # not zeros: a calloc'd frame faults in every page
        tmp[_gather_into(backing, memory, start, tmp):] = 0
        sub = np.lib.stride_tricks.as_strided(tmp, shape=(r.height, row), strides=(fb.stride, 1))
    else:                            # sparse (huge stride): row by row
        sub = np.zeros((r.height, row), np.uint8)
        for y in range(r.height):
            _gather_into(backing, memory, start + y * fb.stride, sub[y])
    return x8r8g8b8(sub, fb.format)
