"""The vhost-user-gpu display protocol (QEMU docs/interop/vhost-user-gpu.rst), sans I/O.

The back-end sends requests on the socket that GPU_SET_SOCKET passed; QEMU
answers GET_PROTOCOL_FEATURES, GET_DISPLAY_INFO, GET_EDID and DMABUF_UPDATE.
Every message is `u32 request | u32 flags | u32 size | payload` (flags bit 2 =
reply). This module only packs and unpacks; `GpuMessageDecoder` reassembles
messages from a byte stream fed in any chunking.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

__all__ = [
    "GpuRequest", "GpuProtocolFeature", "FLAG_REPLY", "HEADER", "pack_message",
    "CursorPosMsg", "CursorUpdateMsg", "ScanoutMsg", "UpdateMsg", "DmabufScanoutMsg",
    "GpuMessage", "GpuMessageDecoder", "CURSOR_BYTES", "MAX_PAYLOAD",
]

HEADER = struct.Struct("<III")
FLAG_REPLY = 1 << 2
CURSOR_BYTES = 64 * 64 * 4
#: the largest payload a peer may announce (a 16384x16384 x8r8g8b8 UPDATE plus its header)
MAX_PAYLOAD = 20 + 16384 * 16384 * 4


class GpuRequest(enum.IntEnum):
    NONE = 0
    GET_PROTOCOL_FEATURES = 1
    SET_PROTOCOL_FEATURES = 2
    GET_DISPLAY_INFO = 3
    CURSOR_POS = 4
    CURSOR_POS_HIDE = 5
    CURSOR_UPDATE = 6
    SCANOUT = 7
    UPDATE = 8
    DMABUF_SCANOUT = 9
    DMABUF_UPDATE = 10
    GET_EDID = 11
    DMABUF_SCANOUT2 = 12


class GpuProtocolFeature(enum.IntEnum):
    EDID = 0
    DMABUF2 = 1


def pack_message(request: int, payload: bytes = b"", *, reply: bool = False,
                 size: int | None = None) -> bytes:
    """Header (+ payload). `size` overrides the length for a payload sent separately."""
    n = len(payload) if size is None else size
    return HEADER.pack(request, FLAG_REPLY if reply else 0, n) + payload


_POS = struct.Struct("<III")


@dataclass(frozen=True)
class CursorPosMsg:
    scanout_id: int
    x: int
    y: int

    def pack(self) -> bytes:
        return _POS.pack(self.scanout_id, self.x, self.y)

    @classmethod
    def unpack(cls, data: bytes) -> "CursorPosMsg":
        return cls(*_POS.unpack_from(data))


@dataclass(frozen=True)
class CursorUpdateMsg:
    """Position, hot spot and a 64x64 ARGB32 image (native-endian u32 per pixel)."""

    pos: CursorPosMsg
    hot_x: int
    hot_y: int
    data: bytes

    def pack(self) -> bytes:
        if len(self.data) != CURSOR_BYTES:
            raise ValueError("cursor image must be 64x64x4 bytes")
        return self.pos.pack() + struct.pack("<II", self.hot_x, self.hot_y) + self.data

    @classmethod
    def unpack(cls, data: bytes) -> "CursorUpdateMsg":
        if len(data) < 20 + CURSOR_BYTES:
            raise ValueError(f"CURSOR_UPDATE of {len(data)} bytes")
        hot_x, hot_y = struct.unpack_from("<II", data, 12)
        return cls(CursorPosMsg.unpack(data), hot_x, hot_y, bytes(data[20:20 + CURSOR_BYTES]))


@dataclass(frozen=True)
class ScanoutMsg:
    scanout_id: int
    width: int
    height: int

    def pack(self) -> bytes:
        return _POS.pack(self.scanout_id, self.width, self.height)

    @classmethod
    def unpack(cls, data: bytes) -> "ScanoutMsg":
        return cls(*_POS.unpack_from(data))


_UPDATE = struct.Struct("<IIIII")


@dataclass(frozen=True)
class UpdateMsg:
    """An update rectangle; its x8r8g8b8 pixels (width*4 bytes per row) follow the 20 bytes."""

    scanout_id: int
    x: int
    y: int
    width: int
    height: int
    SIZE = _UPDATE.size

    def pack(self) -> bytes:
        return _UPDATE.pack(self.scanout_id, self.x, self.y, self.width, self.height)

    @classmethod
    def unpack(cls, data: bytes) -> "UpdateMsg":
        return cls(*_UPDATE.unpack_from(data))

    @property
    def pixel_bytes(self) -> int:
        return self.width * self.height * 4


_DMABUF = struct.Struct("<IIIIIIIIIi")


@dataclass(frozen=True)
class DmabufScanoutMsg:
    scanout_id: int
    x: int
    y: int
    width: int
    height: int
    fd_width: int
    fd_height: int
    fd_stride: int
    fd_flags: int
    fd_drm_fourcc: int
    modifier: int | None = None  # DMABUF_SCANOUT2 only

    @classmethod
    def unpack(cls, data: bytes) -> "DmabufScanoutMsg":
        vals = _DMABUF.unpack_from(data)
        mod = struct.unpack_from("<Q", data, _DMABUF.size)[0] if len(data) >= _DMABUF.size + 8 else None
        return cls(*vals, modifier=mod)


@dataclass
class GpuMessage:
    request: int
    flags: int
    payload: bytes
    fds: list

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & FLAG_REPLY)


class GpuMessageDecoder:
    """Bytes in, GpuMessage out; refuses payloads larger than MAX_PAYLOAD."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._fds: list = []

    def feed(self, data: bytes, fds=()) -> list[GpuMessage]:
        self._buf += data
        self._fds += list(fds)
        out = []
        while len(self._buf) >= HEADER.size:
            request, flags, size = HEADER.unpack_from(self._buf)
            if size > MAX_PAYLOAD:
                raise ValueError(f"display message {request} announces {size} bytes")
            if len(self._buf) < HEADER.size + size:
                break
            payload = bytes(self._buf[HEADER.size:HEADER.size + size])
            del self._buf[:HEADER.size + size]
            fds_now, self._fds = self._fds, []
            out.append(GpuMessage(request, flags, payload, fds_now))
        return out
