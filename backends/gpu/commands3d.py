"""virtio-gpu 3D commands (virtio spec 5.7.6.10): contexts, 3D resources, SUBMIT_3D, capsets.

Same conventions as `commands`: frozen dataclasses with pack/unpack, sizes
from the spec, BadCommand on short input.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar

from .commands import HDR_SIZE, BadCommand, CtrlHeader, CtrlType as T

__all__ = ["CtxCreate", "CtxResource", "ResourceCreate3d", "Box", "Transfer3d", "Submit3d",
           "GetCapset", "PARSERS_3D"]


def _need(cls, data: bytes) -> None:
    if len(data) < cls.SIZE:
        raise BadCommand(f"{cls.__name__} needs {cls.SIZE} bytes, got {len(data)}")


@dataclass(frozen=True)
class CtxCreate:
    hdr: CtrlHeader
    debug_name: bytes = b""
    context_init: int = 0
    SIZE: ClassVar[int] = HDR_SIZE + 8 + 64

    def pack(self) -> bytes:
        name = self.debug_name[:64]
        return self.hdr.pack() + struct.pack("<II", len(name), self.context_init) + name.ljust(64, b"\0")

    @classmethod
    def unpack(cls, data: bytes) -> "CtxCreate":
        _need(cls, data)
        nlen, init = struct.unpack_from("<II", data, HDR_SIZE)
        return cls(CtrlHeader.unpack(data), bytes(data[HDR_SIZE + 8:HDR_SIZE + 8 + min(nlen, 64)]), init)


@dataclass(frozen=True)
class CtxResource:
    """CTX_ATTACH_RESOURCE / CTX_DETACH_RESOURCE (the context is hdr.ctx_id)."""

    hdr: CtrlHeader
    resource_id: int
    SIZE: ClassVar[int] = HDR_SIZE + 8

    def pack(self) -> bytes:
        return self.hdr.pack() + struct.pack("<I4x", self.resource_id)

    @classmethod
    def unpack(cls, data: bytes) -> "CtxResource":
        _need(cls, data)
        return cls(CtrlHeader.unpack(data), struct.unpack_from("<I", data, HDR_SIZE)[0])


_C3D = struct.Struct("<IIIIIIIIIII4x")


@dataclass(frozen=True)
class ResourceCreate3d:
    resource_id: int
    target: int
    format: int
    bind: int
    width: int
    height: int
    depth: int = 1
    array_size: int = 1
    last_level: int = 0
    nr_samples: int = 0
    flags: int = 0
    hdr: CtrlHeader = CtrlHeader(T.CMD_RESOURCE_CREATE_3D)
    SIZE: ClassVar[int] = HDR_SIZE + _C3D.size

    def pack(self) -> bytes:
        return self.hdr.pack() + _C3D.pack(
            self.resource_id, self.target, self.format, self.bind, self.width, self.height,
            self.depth, self.array_size, self.last_level, self.nr_samples, self.flags)

    @classmethod
    def unpack(cls, data: bytes) -> "ResourceCreate3d":
        _need(cls, data)
        return cls(*_C3D.unpack_from(data, HDR_SIZE), hdr=CtrlHeader.unpack(data))


@dataclass(frozen=True)
class Box:
    x: int
    y: int
    z: int
    w: int
    h: int
    d: int


_T3D = struct.Struct("<IIIIIIQIIII")


@dataclass(frozen=True)
class Transfer3d:
    """TRANSFER_TO_HOST_3D / TRANSFER_FROM_HOST_3D (the type is in hdr)."""

    box: Box
    offset: int
    resource_id: int
    level: int = 0
    stride: int = 0
    layer_stride: int = 0
    hdr: CtrlHeader = CtrlHeader(T.CMD_TRANSFER_TO_HOST_3D)
    SIZE: ClassVar[int] = HDR_SIZE + _T3D.size

    def pack(self) -> bytes:
        b = self.box
        return self.hdr.pack() + _T3D.pack(b.x, b.y, b.z, b.w, b.h, b.d, self.offset,
                                           self.resource_id, self.level, self.stride,
                                           self.layer_stride)

    @classmethod
    def unpack(cls, data: bytes) -> "Transfer3d":
        _need(cls, data)
        v = _T3D.unpack_from(data, HDR_SIZE)
        return cls(Box(*v[:6]), *v[6:], hdr=CtrlHeader.unpack(data))


@dataclass(frozen=True)
class Submit3d:
    """SUBMIT_3D: `size` bytes of virgl commands follow the 32-byte command."""

    commands: bytes
    hdr: CtrlHeader = CtrlHeader(T.CMD_SUBMIT_3D)
    SIZE: ClassVar[int] = HDR_SIZE + 8

    def pack(self) -> bytes:
        return self.hdr.pack() + struct.pack("<I4x", len(self.commands)) + self.commands

    @classmethod
    def unpack(cls, data: bytes) -> "Submit3d":
        _need(cls, data)
        (size,) = struct.unpack_from("<I", data, HDR_SIZE)
        body = data[cls.SIZE:cls.SIZE + size]
        if len(body) != size:
            raise BadCommand(f"SUBMIT_3D announces {size} bytes, carries {len(body)}",
                             T.RESP_ERR_INVALID_PARAMETER)
        return cls(bytes(body), CtrlHeader.unpack(data))


@dataclass(frozen=True)
class GetCapset:
    capset_id: int
    capset_version: int
    hdr: CtrlHeader = CtrlHeader(T.CMD_GET_CAPSET)
    SIZE: ClassVar[int] = HDR_SIZE + 8

    def pack(self) -> bytes:
        return self.hdr.pack() + struct.pack("<II", self.capset_id, self.capset_version)

    @classmethod
    def unpack(cls, data: bytes) -> "GetCapset":
        _need(cls, data)
        return cls(*struct.unpack_from("<II", data, HDR_SIZE), hdr=CtrlHeader.unpack(data))


PARSERS_3D = {
    T.CMD_CTX_CREATE: CtxCreate.unpack,
    T.CMD_CTX_DESTROY: CtrlHeader.unpack,
    T.CMD_CTX_ATTACH_RESOURCE: CtxResource.unpack,
    T.CMD_CTX_DETACH_RESOURCE: CtxResource.unpack,
    T.CMD_RESOURCE_CREATE_3D: ResourceCreate3d.unpack,
    T.CMD_TRANSFER_TO_HOST_3D: Transfer3d.unpack,
    T.CMD_TRANSFER_FROM_HOST_3D: Transfer3d.unpack,
    T.CMD_SUBMIT_3D: Submit3d.unpack,
    T.CMD_GET_CAPSET: GetCapset.unpack,
}
