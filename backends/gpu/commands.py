"""virtio-gpu control and cursor commands: a pure layout parser and builder.

Names follow the virtio spec (5.7 GPU Device) verbatim. Every command is a
frozen dataclass that knows its wire size and packs/unpacks itself; `parse`
turns the bytes a driver posted into one of them (or raises `BadCommand`,
which the device answers with an error response). Nothing here does I/O, so
the device and the built-in driver model share this module.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from typing import ClassVar

from vhost_user.protocol.layout import WireStruct

__all__ = [
    "CtrlType", "GpuFeature", "Format", "BadCommand", "CtrlHeader", "Rect",
    "GetDisplayInfo", "RespDisplayInfo", "DisplayOne", "GetEdid", "RespEdid",
    "ResourceCreate2d", "ResourceUnref", "SetScanout", "ResourceFlush",
    "TransferToHost2d", "MemEntry", "ResourceAttachBacking", "ResourceDetachBacking",
    "GetCapsetInfo", "RespCapsetInfo", "CursorPos", "UpdateCursor", "GpuConfig",
    "parse", "parse_cursor", "MAX_SCANOUTS", "FLAG_FENCE", "FLAG_INFO_RING_IDX",
    "HDR_SIZE", "EDID_BLOB_SIZE", "CURSOR_CMD_SIZE", "MAX_BACKING_ENTRIES",
]

MAX_SCANOUTS = 16
FLAG_FENCE = 1 << 0
FLAG_INFO_RING_IDX = 1 << 1
EDID_BLOB_SIZE = 1024
#: the most entries one ATTACH_BACKING may carry (QEMU's limit too)
MAX_BACKING_ENTRIES = 16384


class GpuFeature(enum.IntEnum):
    VIRTIO_GPU_F_VIRGL = 0
    VIRTIO_GPU_F_EDID = 1
    VIRTIO_GPU_F_RESOURCE_UUID = 2
    VIRTIO_GPU_F_RESOURCE_BLOB = 3
    VIRTIO_GPU_F_CONTEXT_INIT = 4


class CtrlType(enum.IntEnum):
    """enum virtio_gpu_ctrl_type (commands and responses)."""

    UNDEFINED = 0
    CMD_GET_DISPLAY_INFO = 0x0100
    CMD_RESOURCE_CREATE_2D = 0x0101
    CMD_RESOURCE_UNREF = 0x0102
    CMD_SET_SCANOUT = 0x0103
    CMD_RESOURCE_FLUSH = 0x0104
    CMD_TRANSFER_TO_HOST_2D = 0x0105
    CMD_RESOURCE_ATTACH_BACKING = 0x0106
    CMD_RESOURCE_DETACH_BACKING = 0x0107
    CMD_GET_CAPSET_INFO = 0x0108
    CMD_GET_CAPSET = 0x0109
    CMD_GET_EDID = 0x010A
    CMD_RESOURCE_ASSIGN_UUID = 0x010B
    CMD_RESOURCE_CREATE_BLOB = 0x010C
    CMD_SET_SCANOUT_BLOB = 0x010D
    CMD_CTX_CREATE = 0x0200
    CMD_CTX_DESTROY = 0x0201
    CMD_CTX_ATTACH_RESOURCE = 0x0202
    CMD_CTX_DETACH_RESOURCE = 0x0203
    CMD_RESOURCE_CREATE_3D = 0x0204
    CMD_TRANSFER_TO_HOST_3D = 0x0205
    CMD_TRANSFER_FROM_HOST_3D = 0x0206
    CMD_SUBMIT_3D = 0x0207
    CMD_RESOURCE_MAP_BLOB = 0x0208
    CMD_RESOURCE_UNMAP_BLOB = 0x0209
    CMD_UPDATE_CURSOR = 0x0300
    CMD_MOVE_CURSOR = 0x0301
    RESP_OK_NODATA = 0x1100
    RESP_OK_DISPLAY_INFO = 0x1101
    RESP_OK_CAPSET_INFO = 0x1102
    RESP_OK_CAPSET = 0x1103
    RESP_OK_EDID = 0x1104
    RESP_OK_RESOURCE_UUID = 0x1105
    RESP_OK_MAP_INFO = 0x1106
    RESP_ERR_UNSPEC = 0x1200
    RESP_ERR_OUT_OF_MEMORY = 0x1201
    RESP_ERR_INVALID_SCANOUT_ID = 0x1202
    RESP_ERR_INVALID_RESOURCE_ID = 0x1203
    RESP_ERR_INVALID_CONTEXT_ID = 0x1204
    RESP_ERR_INVALID_PARAMETER = 0x1205


class Format(enum.IntEnum):
    """enum virtio_gpu_formats: byte order in memory is the name read left to right."""

    B8G8R8A8_UNORM = 1
    B8G8R8X8_UNORM = 2
    A8R8G8B8_UNORM = 3
    X8R8G8B8_UNORM = 4
    R8G8B8A8_UNORM = 67
    X8B8G8R8_UNORM = 68
    A8B8G8R8_UNORM = 121
    R8G8B8X8_UNORM = 134


class BadCommand(ValueError):
    """The driver posted a command that cannot be decoded; `error` is the response type."""

    def __init__(self, message: str, error: CtrlType = CtrlType.RESP_ERR_UNSPEC):
        super().__init__(message)
        self.error = error


@dataclass(frozen=True)
class CtrlHeader(WireStruct):
    """struct virtio_gpu_ctrl_hdr, which starts every command and response."""

    type: int
    flags: int = 0
    fence_id: int = 0
    ctx_id: int = 0
    ring_idx: int = 0
    _LAYOUT = (("type", "I"), ("flags", "I"), ("fence_id", "Q"), ("ctx_id", "I"),
               ("ring_idx", "B"), (None, "3x"))
    _WIRE_ERROR = BadCommand
    _PREFIX = True  # unpack reads it off the front of a command

    def response(self, type_: int) -> "CtrlHeader":
        """The header of the response to this command: fence and context echoed if fenced."""
        if self.flags & FLAG_FENCE:
            return CtrlHeader(type_, FLAG_FENCE | (self.flags & FLAG_INFO_RING_IDX),
                              self.fence_id, self.ctx_id, self.ring_idx)
        return CtrlHeader(type_)


HDR_SIZE = CtrlHeader.SIZE  # 24


@dataclass(frozen=True)
class Rect:
    x: int
    y: int
    width: int
    height: int

    def inside(self, width: int, height: int) -> bool:
        """Whether the rectangle lies within a width x height resource (no overflow)."""
        return (self.x <= width and self.y <= height and self.width <= width
                and self.height <= height and self.x + self.width <= width
                and self.y + self.height <= height)

    def intersect(self, other: "Rect") -> "Rect":
        x0, y0 = max(self.x, other.x), max(self.y, other.y)
        x1 = min(self.x + self.width, other.x + other.width)
        y1 = min(self.y + self.height, other.y + other.height)
        if x1 <= x0 or y1 <= y0:
            return Rect(0, 0, 0, 0)
        return Rect(x0, y0, x1 - x0, y1 - y0)

    @property
    def empty(self) -> bool:
        return self.width == 0 or self.height == 0


def _body(cls):
    """Give a command dataclass pack/unpack from its `_FMT` body after the header."""
    fmt = struct.Struct("<" + cls._FMT)
    cls.BODY = fmt
    cls.SIZE = HDR_SIZE + fmt.size

    def pack(self) -> bytes:
        return self.hdr.pack() + fmt.pack(*self._fields())

    @classmethod
    def unpack(klass, data: bytes):
        if len(data) < klass.SIZE:
            raise BadCommand(f"{klass.__name__} needs {klass.SIZE} bytes, got {len(data)}")
        return klass._from(CtrlHeader.unpack(data), fmt.unpack_from(data, HDR_SIZE))

    cls.pack = pack
    cls.unpack = unpack
    return cls


def _hdr(t: CtrlType):
    return field(default_factory=lambda: CtrlHeader(t))


@_body
@dataclass(frozen=True)
class GetDisplayInfo:
    hdr: CtrlHeader = _hdr(CtrlType.CMD_GET_DISPLAY_INFO)
    _FMT: ClassVar[str] = ""

    def _fields(self):
        return ()

    @classmethod
    def _from(cls, hdr, vals):
        return cls(hdr)


@dataclass(frozen=True)
class DisplayOne:
    r: Rect
    enabled: int = 0
    flags: int = 0


_DISPLAY_ONE = struct.Struct("<IIIIII")


@dataclass(frozen=True)
class RespDisplayInfo:
    """struct virtio_gpu_resp_display_info: 16 pmodes after the header."""

    pmodes: tuple[DisplayOne, ...]
    hdr: CtrlHeader = _hdr(CtrlType.RESP_OK_DISPLAY_INFO)
    SIZE: ClassVar[int] = HDR_SIZE + MAX_SCANOUTS * _DISPLAY_ONE.size

    def pack(self) -> bytes:
        if len(self.pmodes) > MAX_SCANOUTS:
            raise ValueError("at most 16 scanouts")
        out = [self.hdr.pack()]
        modes = list(self.pmodes) + [DisplayOne(Rect(0, 0, 0, 0))] * (MAX_SCANOUTS - len(self.pmodes))
        for m in modes:
            out.append(_DISPLAY_ONE.pack(m.r.x, m.r.y, m.r.width, m.r.height, m.enabled, m.flags))
        return b"".join(out)

    @classmethod
    def unpack(cls, data: bytes) -> "RespDisplayInfo":
        if len(data) < cls.SIZE:
            raise BadCommand(f"display info of {len(data)} bytes")
        modes = []
        for i in range(MAX_SCANOUTS):
            x, y, w, h, en, fl = _DISPLAY_ONE.unpack_from(data, HDR_SIZE + i * _DISPLAY_ONE.size)
            modes.append(DisplayOne(Rect(x, y, w, h), en, fl))
        return cls(tuple(modes), CtrlHeader.unpack(data))


@_body
@dataclass(frozen=True)
class GetEdid:
    scanout: int = 0
    hdr: CtrlHeader = _hdr(CtrlType.CMD_GET_EDID)
    _FMT: ClassVar[str] = "I4x"

    def _fields(self):
        return (self.scanout,)

    @classmethod
    def _from(cls, hdr, vals):
        return cls(vals[0], hdr)


@dataclass(frozen=True)
class RespEdid:
    """struct virtio_gpu_resp_edid: size, padding, 1024 bytes of EDID."""

    edid: bytes
    hdr: CtrlHeader = _hdr(CtrlType.RESP_OK_EDID)
    SIZE: ClassVar[int] = HDR_SIZE + 8 + EDID_BLOB_SIZE

    def pack(self) -> bytes:
        if len(self.edid) > EDID_BLOB_SIZE:
            raise ValueError("EDID longer than 1024 bytes")
        return (self.hdr.pack() + struct.pack("<I4x", len(self.edid))
                + self.edid.ljust(EDID_BLOB_SIZE, b"\0"))

    @classmethod
    def unpack(cls, data: bytes) -> "RespEdid":
        if len(data) < cls.SIZE:
            raise BadCommand(f"EDID response of {len(data)} bytes")
        (size,) = struct.unpack_from("<I", data, HDR_SIZE)
        size = min(size, EDID_BLOB_SIZE)
        return cls(bytes(data[HDR_SIZE + 8: HDR_SIZE + 8 + size]), CtrlHeader.unpack(data))


@_body
@dataclass(frozen=True)
class ResourceCreate2d:
    resource_id: int
    format: int
    width: int
    height: int
    hdr: CtrlHeader = _hdr(CtrlType.CMD_RESOURCE_CREATE_2D)
    _FMT: ClassVar[str] = "IIII"

    def _fields(self):
        return (self.resource_id, self.format, self.width, self.height)

    @classmethod
    def _from(cls, hdr, vals):
        return cls(*vals, hdr)


@_body
@dataclass(frozen=True)
class ResourceUnref:
    resource_id: int
    hdr: CtrlHeader = _hdr(CtrlType.CMD_RESOURCE_UNREF)
    _FMT: ClassVar[str] = "I4x"

    def _fields(self):
        return (self.resource_id,)

    @classmethod
    def _from(cls, hdr, vals):
        return cls(vals[0], hdr)


@_body
@dataclass(frozen=True)
class SetScanout:
    r: Rect
    scanout_id: int
    resource_id: int
    hdr: CtrlHeader = _hdr(CtrlType.CMD_SET_SCANOUT)
    _FMT: ClassVar[str] = "IIIIII"

    def _fields(self):
        return (self.r.x, self.r.y, self.r.width, self.r.height, self.scanout_id, self.resource_id)

    @classmethod
    def _from(cls, hdr, vals):
        return cls(Rect(*vals[:4]), vals[4], vals[5], hdr)


@_body
@dataclass(frozen=True)
class ResourceFlush:
    r: Rect
    resource_id: int
    hdr: CtrlHeader = _hdr(CtrlType.CMD_RESOURCE_FLUSH)
    _FMT: ClassVar[str] = "IIIII4x"

    def _fields(self):
        return (self.r.x, self.r.y, self.r.width, self.r.height, self.resource_id)

    @classmethod
    def _from(cls, hdr, vals):
        return cls(Rect(*vals[:4]), vals[4], hdr)


@_body
@dataclass(frozen=True)
class TransferToHost2d:
    r: Rect
    offset: int
    resource_id: int
    hdr: CtrlHeader = _hdr(CtrlType.CMD_TRANSFER_TO_HOST_2D)
    _FMT: ClassVar[str] = "IIIIQI4x"

    def _fields(self):
        return (self.r.x, self.r.y, self.r.width, self.r.height, self.offset, self.resource_id)

    @classmethod
    def _from(cls, hdr, vals):
        return cls(Rect(*vals[:4]), vals[4], vals[5], hdr)


@dataclass(frozen=True)
class MemEntry(WireStruct):
    """struct virtio_gpu_mem_entry: one guest range of a resource's backing."""

    addr: int
    length: int
    _LAYOUT = (("addr", "Q"), ("length", "I"), (None, "4x"))


_MEM_ENTRY = MemEntry._STRUCT


@_body
@dataclass(frozen=True)
class ResourceAttachBacking:
    """Header + resource_id + nr_entries, followed by nr_entries virtio_gpu_mem_entry."""

    resource_id: int
    entries: tuple[MemEntry, ...] = ()
    hdr: CtrlHeader = _hdr(CtrlType.CMD_RESOURCE_ATTACH_BACKING)
    nr_entries: int | None = None  # None: len(entries); tests may lie
    _FMT: ClassVar[str] = "II"

    def _fields(self):
        n = len(self.entries) if self.nr_entries is None else self.nr_entries
        return (self.resource_id, n)

    def pack_all(self) -> bytes:
        return self.pack() + b"".join(_MEM_ENTRY.pack(e.addr, e.length) for e in self.entries)

    @classmethod
    def _from(cls, hdr, vals):
        return cls(vals[0], (), hdr, vals[1])

    @classmethod
    def unpack_all(cls, data: bytes) -> "ResourceAttachBacking":
        """The command with its entries; BadCommand if they are missing or too many."""
        head = cls.unpack(data)
        n = head.nr_entries
        if n > MAX_BACKING_ENTRIES:
            raise BadCommand(f"attach-backing with {n} entries (max {MAX_BACKING_ENTRIES})")
        need = cls.SIZE + n * _MEM_ENTRY.size
        if len(data) < need:
            raise BadCommand(f"attach-backing announces {n} entries but carries "
                             f"{(len(data) - cls.SIZE) // _MEM_ENTRY.size}")
        entries = tuple(MemEntry(*_MEM_ENTRY.unpack_from(data, cls.SIZE + i * _MEM_ENTRY.size))
                        for i in range(n))
        return cls(head.resource_id, entries, head.hdr, n)


@_body
@dataclass(frozen=True)
class ResourceDetachBacking:
    resource_id: int
    hdr: CtrlHeader = _hdr(CtrlType.CMD_RESOURCE_DETACH_BACKING)
    _FMT: ClassVar[str] = "I4x"

    def _fields(self):
        return (self.resource_id,)

    @classmethod
    def _from(cls, hdr, vals):
        return cls(vals[0], hdr)


@_body
@dataclass(frozen=True)
class GetCapsetInfo:
    capset_index: int
    hdr: CtrlHeader = _hdr(CtrlType.CMD_GET_CAPSET_INFO)
    _FMT: ClassVar[str] = "I4x"

    def _fields(self):
        return (self.capset_index,)

    @classmethod
    def _from(cls, hdr, vals):
        return cls(vals[0], hdr)


@_body
@dataclass(frozen=True)
class RespCapsetInfo:
    capset_id: int
    capset_max_version: int
    capset_max_size: int
    hdr: CtrlHeader = _hdr(CtrlType.RESP_OK_CAPSET_INFO)
    _FMT: ClassVar[str] = "III4x"

    def _fields(self):
        return (self.capset_id, self.capset_max_version, self.capset_max_size)

    @classmethod
    def _from(cls, hdr, vals):
        return cls(*vals, hdr)


@dataclass(frozen=True)
class CursorPos:
    scanout_id: int
    x: int
    y: int


@_body
@dataclass(frozen=True)
class UpdateCursor:
    """struct virtio_gpu_update_cursor, used by both UPDATE_CURSOR and MOVE_CURSOR."""

    pos: CursorPos
    resource_id: int = 0
    hot_x: int = 0
    hot_y: int = 0
    hdr: CtrlHeader = _hdr(CtrlType.CMD_UPDATE_CURSOR)
    _FMT: ClassVar[str] = "III4xIII4x"

    def _fields(self):
        p = self.pos
        return (p.scanout_id, p.x, p.y, self.resource_id, self.hot_x, self.hot_y)

    @classmethod
    def _from(cls, hdr, vals):
        return cls(CursorPos(*vals[:3]), vals[3], vals[4], vals[5], hdr)


CURSOR_CMD_SIZE = UpdateCursor.SIZE  # 56

@dataclass(frozen=True)
class GpuConfig(WireStruct):
    """struct virtio_gpu_config (device config space); unpack pads a short read with zeroes."""

    events_read: int = 0
    events_clear: int = 0
    num_scanouts: int = 1
    num_capsets: int = 0
    _LAYOUT = (("events_read", "I"), ("events_clear", "I"), ("num_scanouts", "I"),
               ("num_capsets", "I"))

    @classmethod
    def unpack(cls, data: bytes) -> "GpuConfig":
        return super().unpack(bytes(data[:cls.SIZE]).ljust(cls.SIZE, b"\0"))


_PARSERS = {
    CtrlType.CMD_GET_DISPLAY_INFO: GetDisplayInfo.unpack,
    CtrlType.CMD_GET_EDID: GetEdid.unpack,
    CtrlType.CMD_RESOURCE_CREATE_2D: ResourceCreate2d.unpack,
    CtrlType.CMD_RESOURCE_UNREF: ResourceUnref.unpack,
    CtrlType.CMD_SET_SCANOUT: SetScanout.unpack,
    CtrlType.CMD_RESOURCE_FLUSH: ResourceFlush.unpack,
    CtrlType.CMD_TRANSFER_TO_HOST_2D: TransferToHost2d.unpack,
    CtrlType.CMD_RESOURCE_ATTACH_BACKING: ResourceAttachBacking.unpack_all,
    CtrlType.CMD_RESOURCE_DETACH_BACKING: ResourceDetachBacking.unpack,
    CtrlType.CMD_GET_CAPSET_INFO: GetCapsetInfo.unpack,
}


def parse(data: bytes, more: dict | None = None):
    """Decode one control command. Returns (header, command or None if unknown type).

    `more` adds parsers of another command family (commands_blob.PARSERS_BLOB).
    Raises BadCommand (with the response type to send) if the bytes are short.
    """
    hdr = CtrlHeader.unpack(data)
    parser = _PARSERS.get(hdr.type)
    if parser is None and more:
        parser = more.get(hdr.type)
    return hdr, (parser(data) if parser is not None else None)


def parse_cursor(data: bytes) -> UpdateCursor:
    """Decode one cursor-queue command (UPDATE_CURSOR or MOVE_CURSOR)."""
    return UpdateCursor.unpack(data)
