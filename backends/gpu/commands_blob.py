"""virtio-gpu blob and UUID commands (virtio 1.2+, 5.7.6.8): pure layouts.

RESOURCE_CREATE_BLOB (followed by nr_entries virtio_gpu_mem_entry, like
ATTACH_BACKING), SET_SCANOUT_BLOB, RESOURCE_ASSIGN_UUID and its response.
Names follow the spec verbatim; nothing here does I/O. `PARSERS_BLOB`
extends `commands.parse` (the device passes it as `more`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar

from .commands import (
    HDR_SIZE,
    MAX_BACKING_ENTRIES,
    BadCommand,
    CtrlHeader,
    CtrlType,
    MemEntry,
    Rect,
    _body,
    _hdr,
)

__all__ = ["BlobMem", "BlobFlag", "ResourceCreateBlob", "SetScanoutBlob", "ResourceAssignUuid",
           "RespResourceUuid", "PARSERS_BLOB", "BLOB_COMMANDS"]

_MEM_ENTRY = MemEntry._STRUCT


class BlobMem(enum.IntEnum):
    """VIRTIO_GPU_BLOB_MEM_*: where a blob's memory lives (zero is invalid)."""

    VIRTIO_GPU_BLOB_MEM_GUEST = 0x0001
    VIRTIO_GPU_BLOB_MEM_HOST3D = 0x0002
    VIRTIO_GPU_BLOB_MEM_HOST3D_GUEST = 0x0003


class BlobFlag(enum.IntFlag):
    VIRTIO_GPU_BLOB_FLAG_USE_MAPPABLE = 0x0001
    VIRTIO_GPU_BLOB_FLAG_USE_SHAREABLE = 0x0002
    VIRTIO_GPU_BLOB_FLAG_USE_CROSS_DEVICE = 0x0004


@_body
@dataclass(frozen=True)
class ResourceCreateBlob:
    """struct virtio_gpu_resource_create_blob, then nr_entries virtio_gpu_mem_entry."""

    resource_id: int
    blob_mem: int
    blob_flags: int
    size: int
    blob_id: int = 0
    entries: tuple[MemEntry, ...] = ()
    hdr: CtrlHeader = _hdr(CtrlType.CMD_RESOURCE_CREATE_BLOB)
    nr_entries: int | None = None  # None: len(entries); tests may lie
    _FMT: ClassVar[str] = "IIIIQQ"

    def _fields(self):
        n = len(self.entries) if self.nr_entries is None else self.nr_entries
        return (self.resource_id, self.blob_mem, self.blob_flags, n, self.blob_id, self.size)

    def pack_all(self) -> bytes:
        return self.pack() + b"".join(_MEM_ENTRY.pack(e.addr, e.length) for e in self.entries)

    @classmethod
    def _from(cls, hdr, vals):
        rid, mem, flags, n, blob_id, size = vals
        return cls(rid, mem, flags, size, blob_id, (), hdr, n)

    @classmethod
    def unpack_all(cls, data: bytes) -> "ResourceCreateBlob":
        """The command with its entries; BadCommand if they are missing or too many."""
        head = cls.unpack(data)
        n = head.nr_entries
        if n > MAX_BACKING_ENTRIES:
            raise BadCommand(f"create-blob with {n} entries (max {MAX_BACKING_ENTRIES})")
        need = cls.SIZE + n * _MEM_ENTRY.size
        if len(data) < need:
            raise BadCommand(f"create-blob announces {n} entries but carries "
                             f"{(len(data) - cls.SIZE) // _MEM_ENTRY.size}")
        entries = tuple(MemEntry(*_MEM_ENTRY.unpack_from(data, cls.SIZE + i * _MEM_ENTRY.size))
                        for i in range(n))
        return cls(head.resource_id, head.blob_mem, head.blob_flags, head.size, head.blob_id,
                   entries, head.hdr, n)


@_body
@dataclass(frozen=True)
class SetScanoutBlob:
    """struct virtio_gpu_set_scanout_blob: rect, ids, framebuffer size/format, 4 planes."""

    r: Rect
    scanout_id: int
    resource_id: int
    width: int
    height: int
    format: int
    strides: tuple[int, int, int, int] = (0, 0, 0, 0)
    offsets: tuple[int, int, int, int] = (0, 0, 0, 0)
    padding: int = 0
    hdr: CtrlHeader = _hdr(CtrlType.CMD_SET_SCANOUT_BLOB)
    _FMT: ClassVar[str] = "IIII" + "IIIIII" + "4I" + "4I"

    def _fields(self):
        r = self.r
        return (r.x, r.y, r.width, r.height, self.scanout_id, self.resource_id, self.width,
                self.height, self.format, self.padding, *self.strides, *self.offsets)

    @classmethod
    def _from(cls, hdr, vals):
        return cls(Rect(*vals[:4]), vals[4], vals[5], vals[6], vals[7], vals[8],
                   tuple(vals[10:14]), tuple(vals[14:18]), vals[9], hdr)


@_body
@dataclass(frozen=True)
class ResourceAssignUuid:
    resource_id: int
    hdr: CtrlHeader = _hdr(CtrlType.CMD_RESOURCE_ASSIGN_UUID)
    _FMT: ClassVar[str] = "I4x"

    def _fields(self):
        return (self.resource_id,)

    @classmethod
    def _from(cls, hdr, vals):
        return cls(vals[0], hdr)


@dataclass(frozen=True)
class RespResourceUuid:
    """struct virtio_gpu_resp_resource_uuid: header + 16 bytes."""

    uuid: bytes
    hdr: CtrlHeader = _hdr(CtrlType.RESP_OK_RESOURCE_UUID)
    SIZE: ClassVar[int] = HDR_SIZE + 16

    def pack(self) -> bytes:
        if len(self.uuid) != 16:
            raise ValueError("a UUID is 16 bytes")
        return self.hdr.pack() + self.uuid

    @classmethod
    def unpack(cls, data: bytes) -> "RespResourceUuid":
        if len(data) < cls.SIZE:
            raise BadCommand(f"UUID response of {len(data)} bytes")
        return cls(bytes(data[HDR_SIZE:HDR_SIZE + 16]), CtrlHeader.unpack(data))


PARSERS_BLOB = {
    CtrlType.CMD_RESOURCE_CREATE_BLOB: ResourceCreateBlob.unpack_all,
    CtrlType.CMD_SET_SCANOUT_BLOB: SetScanoutBlob.unpack,
    CtrlType.CMD_RESOURCE_ASSIGN_UUID: ResourceAssignUuid.unpack,
}
BLOB_COMMANDS = tuple(PARSERS_BLOB)
