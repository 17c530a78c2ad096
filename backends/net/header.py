"""The virtio-net header (virtio 1.2, 5.1.6): a pure parser, no I/O.

Every frame on a virtio-net queue is preceded by this header. It is 12 bytes
when VIRTIO_F_VERSION_1 or VIRTIO_NET_F_MRG_RXBUF was negotiated (the last
two bytes are num_buffers) and 10 bytes otherwise.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from vhost_user.protocol.layout import WireStruct

__all__ = ["NetFeature", "NetHeader", "HEADER_SIZE", "header_size", "Flag", "GsoType",
           "OFFLOAD_FEATURES"]

HEADER_SIZE = 12
_LEGACY_SIZE = 10


class NetFeature(enum.IntEnum):
    """virtio-net feature bits (virtio 1.2, 5.1.3)."""

    CSUM = 0
    GUEST_CSUM = 1
    MTU = 3
    MAC = 5
    GUEST_TSO4 = 7
    GUEST_TSO6 = 8
    GUEST_ECN = 9
    GUEST_UFO = 10
    HOST_TSO4 = 11
    HOST_TSO6 = 12
    HOST_ECN = 13
    HOST_UFO = 14
    MRG_RXBUF = 15
    STATUS = 16
    CTRL_VQ = 17
    CTRL_RX = 18
    CTRL_VLAN = 19
    CTRL_RX_EXTRA = 20
    GUEST_ANNOUNCE = 21
    MQ = 22
    CTRL_MAC_ADDR = 23


# The offloads the switch carries between ports (and resolves in software).
OFFLOAD_FEATURES = sum(1 << b for b in (
    NetFeature.CSUM, NetFeature.GUEST_CSUM, NetFeature.GUEST_TSO4, NetFeature.GUEST_TSO6,
    NetFeature.GUEST_ECN, NetFeature.HOST_TSO4, NetFeature.HOST_TSO6, NetFeature.HOST_ECN))


class Flag(enum.IntFlag):
    NEEDS_CSUM = 1
    DATA_VALID = 2


class GsoType(enum.IntEnum):
    NONE = 0
    TCPV4 = 1
    UDP = 3
    TCPV6 = 4
    ECN = 0x80


def header_size(features: int) -> int:
    """Bytes of the header for a negotiated feature set (5.1.6.1)."""
    if features & ((1 << 32) | (1 << NetFeature.MRG_RXBUF)):
        return HEADER_SIZE
    return _LEGACY_SIZE


@dataclass(frozen=True)
class NetHeader(WireStruct):
    """struct virtio_net_hdr_v1; the 10-byte legacy header is its first 10 bytes."""

    flags: int = 0
    gso_type: int = 0
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0
    num_buffers: int = 1
    _LAYOUT = (("flags", "B"), ("gso_type", "B"), ("hdr_len", "H"), ("gso_size", "H"),
               ("csum_start", "H"), ("csum_offset", "H"), ("num_buffers", "H"))

    def pack(self, size: int = HEADER_SIZE) -> bytes:
        if size not in (HEADER_SIZE, _LEGACY_SIZE):
            raise ValueError("header size is 10 or 12")
        return super().pack()[:size]

    @classmethod
    def unpack(cls, data: bytes, size: int = HEADER_SIZE) -> "NetHeader":
        if size not in (HEADER_SIZE, _LEGACY_SIZE):
            raise ValueError("header size is 10 or 12")
        if len(data) < size:
            raise ValueError(f"virtio-net header needs {size} bytes, got {len(data)}")
        f = cls._STRUCT.unpack(bytes(data[:size]).ljust(HEADER_SIZE, b"\0"))
        return cls(*f[:6], num_buffers=f[6] if size == HEADER_SIZE else 1)
