"""Payload types: one small frozen dataclass per payload layout in the spec.

Each type knows its wire size, checks its own fields when built (a bad value
we build is a `LocalProtocolError`), packs itself to little-endian bytes and
unpacks itself from bytes (a bad payload the peer sent is a recoverable
`MalformedPayload`). Fixed layouts are described once, as a `_LAYOUT` of
(field name, struct code) pairs with `None` names for padding; the range
checks and the struct are derived from it (protocol/layout.py, which the device
headers use too), so a layout cannot disagree with
its validation. Variable-size payloads (memory table, config space, raw bytes)
pack and unpack by hand.

The codec checks structure only (sizes, counts, field widths, reserved bits).
Whether an address is mapped or a queue index exists is the session's call.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar

from .constants import (
    MAX_CONFIG_SIZE,
    MAX_MEM_REGIONS,
    MAX_PAYLOAD_SIZE,
    MAX_SHMEM_REGIONS,
    UUID_SIZE,
    VHOST_VRING_F_LOG,
    VRING_IDX_MASK,
    VRING_NOFD_MASK,
)
from .errors import LocalProtocolError, MalformedPayload
from .layout import WireStruct, check_bytes, check_uint

__all__ = [
    "Payload", "Empty", "U64", "VringFdRequest", "VringState", "VringAddress",
    "MemoryRegion", "MemoryTable", "SingleMemoryRegion", "LogDescription", "ConfigSpace",
    "InflightDescription", "IotlbMessage", "VringArea", "DeviceStateTransfer",
    "SharedObject", "ShmemConfig", "ShmemMap", "RawPayload",
]

def _check_uint(owner: str, name: str, value: object, bits: int) -> None:
    check_uint(owner, name, value, bits, LocalProtocolError)


def _check_bytes(owner: str, name: str, value: object, length: int | None) -> None:
    check_bytes(owner, name, value, length, LocalProtocolError)


def _expect_size(cls: type, data: bytes, size: int) -> None:
    if len(data) != size:
        raise MalformedPayload(f"{cls.__name__} payload must be {size} bytes, not {len(data)}")


def _build(cls, *args):
    """Construct from unpacked wire values; a value that fails validation is the peer's fault."""
    try:
        return cls(*args)
    except LocalProtocolError as exc:
        raise MalformedPayload(str(exc)) from None


class Payload:
    """Base of every payload type.

    `SIZE` is the fixed wire size, or None for variable-size payloads, which
    override `accepts_size`. The decoder uses `accepts_size` to choose among
    the payload types a request allows (e.g. GET_CONFIG replies with either a
    config space or nothing).
    """

    __slots__ = ()
    SIZE: ClassVar[int | None] = None

    def pack(self) -> bytes:
        raise NotImplementedError

    @classmethod
    def unpack(cls, data: bytes) -> Payload:
        raise NotImplementedError

    @classmethod
    def accepts_size(cls, size: int) -> bool:
        return size == cls.SIZE

    def wire_size(self) -> int:
        """Number of payload bytes on the wire (the header's size field)."""
        return self.SIZE if self.SIZE is not None else len(self.pack())


@dataclass(frozen=True)
class _Struct(WireStruct, Payload):
    """A payload with one fixed little-endian layout, declared as `_LAYOUT` (protocol/layout.py).

    A bad value we build is a LocalProtocolError; bytes of the wrong size or
    that do not validate are the peer's MalformedPayload."""

    _BUILD_ERROR = LocalProtocolError
    _WIRE_ERROR = MalformedPayload

    @classmethod
    def unpack(cls, data: bytes):
        _expect_size(cls, data, cls.SIZE)
        return _build(cls, *cls._STRUCT.unpack(data))


@dataclass(frozen=True)
class Empty(_Struct):
    """No payload (size 0)."""

    _LAYOUT = ()


@dataclass(frozen=True)
class U64(_Struct):
    """A single 64-bit integer; also the REPLY_ACK body (0 = success)."""

    value: int
    _LAYOUT = (("value", "Q"),)


@dataclass(frozen=True)
class VringFdRequest(U64):
    """SET_VRING_KICK/CALL/ERR payload: ring index in bits 0-7, bit 8 = no fd attached."""

    def _validate(self) -> None:
        reserved = self.value & ~(VRING_IDX_MASK | VRING_NOFD_MASK)
        if reserved:
            raise LocalProtocolError(f"VringFdRequest sets reserved bits {reserved:#x}")

    @classmethod
    def for_queue(cls, index: int, *, no_fd: bool = False) -> VringFdRequest:
        """Build the payload for ring `index`; `no_fd` means "poll, no eventfd"."""
        _check_uint(cls.__name__, "index", index, 8)
        return cls(index | (VRING_NOFD_MASK if no_fd else 0))

    @property
    def index(self) -> int:
        return self.value & VRING_IDX_MASK

    @property
    def no_fd(self) -> bool:
        return bool(self.value & VRING_NOFD_MASK)


@dataclass(frozen=True)
class VringState(_Struct):
    """A vring state description: ring index and a number (size, base, enable...)."""

    index: int
    num: int
    _LAYOUT = (("index", "I"), ("num", "I"))


@dataclass(frozen=True)
class VringAddress(_Struct):
    """A vring address description (SET_VRING_ADDR); flags bit 0 is VHOST_VRING_F_LOG."""

    index: int
    flags: int
    descriptor: int
    used: int
    available: int
    log: int
    _LAYOUT = (
        ("index", "I"), ("flags", "I"),
        ("descriptor", "Q"), ("used", "Q"), ("available", "Q"), ("log", "Q"),
    )

    @property
    def log_enabled(self) -> bool:
        return bool(self.flags & VHOST_VRING_F_LOG)


@dataclass(frozen=True)
class MemoryRegion(_Struct):
    """One memory region description (32 bytes)."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int
    _LAYOUT = (
        ("guest_phys_addr", "Q"), ("memory_size", "Q"),
        ("userspace_addr", "Q"), ("mmap_offset", "Q"),
    )


_MEM_TABLE_HEAD = struct.Struct("<II")  # nregions, padding


@dataclass(frozen=True)
class MemoryTable(Payload):
    """SET_MEM_TABLE payload: u32 nregions, u32 padding, then nregions regions.

    The region count is checked against the payload size on the way in; a
    mismatch is what crashes qemu-storage-daemon, and here it is a
    recoverable `MalformedPayload`. A table with no regions is legal: it is
    the front-end's postcopy acknowledgement.
    """

    regions: tuple[MemoryRegion, ...]

    def __post_init__(self) -> None:
        regions = tuple(self.regions)
        object.__setattr__(self, "regions", regions)
        if len(regions) > MAX_MEM_REGIONS:
            raise LocalProtocolError(f"MemoryTable has {len(regions)} regions, at most {MAX_MEM_REGIONS}")
        for region in regions:
            if not isinstance(region, MemoryRegion):
                raise LocalProtocolError(f"MemoryTable region is {type(region).__name__}, not MemoryRegion")

    @classmethod
    def accepts_size(cls, size: int) -> bool:
        return _MEM_TABLE_HEAD.size <= size <= MAX_PAYLOAD_SIZE

    def pack(self) -> bytes:
        head = _MEM_TABLE_HEAD.pack(len(self.regions), 0)
        return head + b"".join(region.pack() for region in self.regions)

    @classmethod
    def unpack(cls, data: bytes) -> MemoryTable:
        if len(data) < _MEM_TABLE_HEAD.size:
            raise MalformedPayload(f"MemoryTable payload of {len(data)} bytes has no header")
        nregions, _padding = _MEM_TABLE_HEAD.unpack_from(data)
        if nregions > MAX_MEM_REGIONS:
            raise MalformedPayload(f"MemoryTable nregions={nregions} exceeds {MAX_MEM_REGIONS}")
        expected = _MEM_TABLE_HEAD.size + nregions * MemoryRegion.SIZE
        if len(data) != expected:
            raise MalformedPayload(
                f"MemoryTable nregions={nregions} needs {expected} bytes, payload has {len(data)}"
            )
        step = MemoryRegion.SIZE
        base = _MEM_TABLE_HEAD.size
        return cls(tuple(MemoryRegion.unpack(data[base + i * step: base + (i + 1) * step])
                         for i in range(nregions)))


@dataclass(frozen=True)
class SingleMemoryRegion(Payload):
    """ADD_MEM_REG / REM_MEM_REG payload: u64 padding, then one region (40 bytes)."""

    region: MemoryRegion
    SIZE = 8 + MemoryRegion.SIZE

    def __post_init__(self) -> None:
        if not isinstance(self.region, MemoryRegion):
            raise LocalProtocolError(f"SingleMemoryRegion.region is {type(self.region).__name__}")

    def pack(self) -> bytes:
        return bytes(8) + self.region.pack()

    @classmethod
    def unpack(cls, data: bytes) -> SingleMemoryRegion:
        _expect_size(cls, data, cls.SIZE)
        return cls(MemoryRegion.unpack(data[8:]))


@dataclass(frozen=True)
class LogDescription(_Struct):
    """SET_LOG_BASE payload: size and offset of the dirty log in the attached fd."""

    mmap_size: int
    mmap_offset: int
    _LAYOUT = (("mmap_size", "Q"), ("mmap_offset", "Q"))


_CONFIG_HEAD = struct.Struct("<III")  # offset, size, flags


@dataclass(frozen=True)
class ConfigSpace(Payload):
    """GET_CONFIG / SET_CONFIG payload: offset, size, flags, then `size` bytes.

    `size` is kept as a field because it is one on the wire, and must equal
    len(payload). GET_CONFIG requests carry `size` zero bytes (QEMU sends
    them); use `ConfigSpace.for_read`.
    """

    offset: int
    size: int
    flags: int
    payload: bytes

    def __post_init__(self) -> None:
        for name in ("offset", "size", "flags"):
            _check_uint("ConfigSpace", name, getattr(self, name), 32)
        _check_bytes("ConfigSpace", "payload", self.payload, None)
        if self.size != len(self.payload):
            raise LocalProtocolError(f"ConfigSpace.size={self.size} but payload has {len(self.payload)} bytes")
        if self.size > MAX_CONFIG_SIZE:
            raise LocalProtocolError(f"ConfigSpace.size={self.size} exceeds {MAX_CONFIG_SIZE}")

    @classmethod
    def for_read(cls, offset: int, size: int, flags: int = 0) -> ConfigSpace:
        """A GET_CONFIG request for `size` bytes at `offset`."""
        return cls(offset, size, flags, bytes(size))

    @classmethod
    def accepts_size(cls, size: int) -> bool:
        return _CONFIG_HEAD.size <= size <= _CONFIG_HEAD.size + MAX_CONFIG_SIZE

    def pack(self) -> bytes:
        return _CONFIG_HEAD.pack(self.offset, self.size, self.flags) + self.payload

    @classmethod
    def unpack(cls, data: bytes) -> ConfigSpace:
        if len(data) < _CONFIG_HEAD.size:
            raise MalformedPayload(f"ConfigSpace payload of {len(data)} bytes has no header")
        offset, size, flags = _CONFIG_HEAD.unpack_from(data)
        if size > MAX_CONFIG_SIZE:
            raise MalformedPayload(f"ConfigSpace size={size} exceeds {MAX_CONFIG_SIZE}")
        body = data[_CONFIG_HEAD.size:]
        if len(body) != size:
            raise MalformedPayload(f"ConfigSpace size field says {size} bytes but {len(body)} follow")
        return _build(cls, offset, size, flags, bytes(body))


@dataclass(frozen=True)
class InflightDescription(_Struct):
    """GET/SET_INFLIGHT_FD payload; padded to 24 bytes like QEMU's struct."""

    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int
    _LAYOUT = (
        ("mmap_size", "Q"), ("mmap_offset", "Q"),
        ("num_queues", "H"), ("queue_size", "H"), (None, "4x"),
    )


@dataclass(frozen=True)
class IotlbMessage(_Struct):
    """struct vhost_iotlb_msg: iova, size, uaddr, perm, type; padded to 32 bytes."""

    iova: int
    size: int
    uaddr: int
    perm: int
    type: int
    _LAYOUT = (
        ("iova", "Q"), ("size", "Q"), ("uaddr", "Q"),
        ("perm", "B"), ("type", "B"), (None, "6x"),
    )


@dataclass(frozen=True)
class VringArea(_Struct):
    """Vring area description (BACKEND_VRING_HOST_NOTIFIER_MSG).

    `u64` holds the ring index (bits 0-7) and bit 8 = no fd (deregister).
    """

    u64: int
    size: int
    offset: int
    _LAYOUT = (("u64", "Q"), ("size", "Q"), ("offset", "Q"))

    @classmethod
    def for_queue(cls, index: int, size: int, offset: int, *, no_fd: bool = False) -> VringArea:
        _check_uint(cls.__name__, "index", index, 8)
        return cls(index | (VRING_NOFD_MASK if no_fd else 0), size, offset)

    @property
    def index(self) -> int:
        return self.u64 & VRING_IDX_MASK

    @property
    def no_fd(self) -> bool:
        return bool(self.u64 & VRING_NOFD_MASK)


@dataclass(frozen=True)
class DeviceStateTransfer(_Struct):
    """SET_DEVICE_STATE_FD payload: transfer direction and migration phase."""

    direction: int
    phase: int
    _LAYOUT = (("direction", "I"), ("phase", "I"))


@dataclass(frozen=True)
class SharedObject(_Struct):
    """VhostUserShared: a 16-byte UUID in RFC 4122 (big-endian fields) order."""

    uuid: bytes
    _LAYOUT = (("uuid", f"{UUID_SIZE}s"),)

    @classmethod
    def from_uuid(cls, value) -> SharedObject:
        """From a `uuid.UUID` (its `.bytes` are already in the spec's order)."""
        return cls(value.bytes)


_SHMEM_STRUCT = struct.Struct(f"<II{MAX_SHMEM_REGIONS}Q")  # nregions, padding, sizes


@dataclass(frozen=True)
class ShmemConfig(Payload):
    """GET_SHMEM_CONFIG reply: u32 nregions, u32 padding, 256 x u64 region sizes.

    Layout of QEMU's VhostUserShMemConfig and rust-vmm's message.rs. The
    array index is the shmid; trailing zero sizes are dropped from
    `memory_sizes` so equal configurations compare equal.
    """

    nregions: int
    memory_sizes: tuple[int, ...]
    SIZE = _SHMEM_STRUCT.size

    def __post_init__(self) -> None:
        sizes = list(self.memory_sizes)
        while sizes and sizes[-1] == 0:
            sizes.pop()
        object.__setattr__(self, "memory_sizes", tuple(sizes))
        _check_uint("ShmemConfig", "nregions", self.nregions, 32)
        if self.nregions > MAX_SHMEM_REGIONS or len(sizes) > MAX_SHMEM_REGIONS:
            raise LocalProtocolError(f"ShmemConfig has more than {MAX_SHMEM_REGIONS} regions")
        for shmid, size in enumerate(sizes):
            _check_uint("ShmemConfig", f"memory_sizes[{shmid}]", size, 64)

    def pack(self) -> bytes:
        sizes = self.memory_sizes + (0,) * (MAX_SHMEM_REGIONS - len(self.memory_sizes))
        return _SHMEM_STRUCT.pack(self.nregions, 0, *sizes)

    @classmethod
    def unpack(cls, data: bytes) -> ShmemConfig:
        _expect_size(cls, data, cls.SIZE)
        nregions, _padding, *sizes = _SHMEM_STRUCT.unpack(data)
        return _build(cls, nregions, tuple(sizes))


@dataclass(frozen=True)
class ShmemMap(_Struct):
    """VhostUserMMap (BACKEND_SHMEM_MAP/UNMAP); flags bit 0 = map read-write."""

    shmid: int
    fd_offset: int
    shm_offset: int
    len: int
    flags: int
    _LAYOUT = (
        ("shmid", "B"), (None, "7x"),
        ("fd_offset", "Q"), ("shm_offset", "Q"), ("len", "Q"), ("flags", "Q"),
    )


@dataclass(frozen=True)
class RawPayload(Payload):
    """Bytes the codec does not interpret (CREATE_CRYPTO_SESSION's nested C structs)."""

    data: bytes

    def __post_init__(self) -> None:
        _check_bytes("RawPayload", "data", self.data, None)
        if len(self.data) > MAX_PAYLOAD_SIZE:
            raise LocalProtocolError(f"RawPayload of {len(self.data)} bytes exceeds {MAX_PAYLOAD_SIZE}")

    @classmethod
    def accepts_size(cls, size: int) -> bool:
        return 0 <= size <= MAX_PAYLOAD_SIZE

    def pack(self) -> bytes:
        return self.data

    @classmethod
    def unpack(cls, data: bytes) -> RawPayload:
        return cls(bytes(data))
