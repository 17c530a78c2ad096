"""virtio-vsock wire layout (virtio spec 5.10), shared by device and driver.

Pure data: the 44-byte packet header, its op/type/flag constants, the
config space and the event record. No I/O, so the device, the built-in
front-end's driver model, the pcap writer and the tests share one
definition.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, replace

from vhost_user.protocol.layout import WireStruct

__all__ = [
    "HEADER_SIZE", "HOST_CID", "VMADDR_CID_ANY", "Op", "SockType", "ShutdownFlag",
    "SeqFlag", "VsockFeature", "EVENT_TRANSPORT_RESET", "Header", "PacketError",
    "pack_config", "unpack_config", "pack_header_into", "pack_event", "unpack_event", "CONFIG_SIZE", "EVENT_SIZE",
]

HEADER_SIZE = 44
CONFIG_SIZE = 8
EVENT_SIZE = 4
HOST_CID = 2
VMADDR_CID_ANY = 0xFFFFFFFF
EVENT_TRANSPORT_RESET = 0



class PacketError(ValueError):
    """Bytes that are not a well-formed vsock packet."""


class Op(enum.IntEnum):
    """virtio_vsock_hdr.op (5.10.6)."""

    INVALID = 0
    REQUEST = 1
    RESPONSE = 2
    RST = 3
    SHUTDOWN = 4
    RW = 5
    CREDIT_UPDATE = 6
    CREDIT_REQUEST = 7


class SockType(enum.IntEnum):
    STREAM = 1
    SEQPACKET = 2


class ShutdownFlag(enum.IntFlag):
    """SHUTDOWN flags: the sender will not receive (RCV) / not send (SEND) any more."""

    RCV = 1
    SEND = 2


class SeqFlag(enum.IntFlag):
    """RW flags for SEQPACKET: end of message, end of record (MSG_EOR)."""

    EOM = 1
    EOR = 2


class VsockFeature(enum.IntEnum):
    """Device feature bits (5.10.3)."""

    STREAM = 0
    SEQPACKET = 1
    NO_IMPLIED_STREAM = 2


@dataclass(frozen=True)
class Header(WireStruct):
    """struct virtio_vsock_hdr, little-endian, 44 bytes; unpack reads it off the front of a packet."""

    src_cid: int = 0
    dst_cid: int = 0
    src_port: int = 0
    dst_port: int = 0
    len: int = 0
    type: int = SockType.STREAM
    op: int = Op.INVALID
    flags: int = 0
    buf_alloc: int = 0
    fwd_cnt: int = 0  #: a running count: its low 32 bits are what goes on the wire
    _LAYOUT = (("src_cid", "Q"), ("dst_cid", "Q"), ("src_port", "I"), ("dst_port", "I"),
               ("len", "I"), ("type", "H"), ("op", "H"), ("flags", "I"), ("buf_alloc", "I"),
               ("fwd_cnt", "I"))
    _BUILD_ERROR = PacketError
    _WIRE_ERROR = PacketError
    _PREFIX = True

    def __post_init__(self) -> None:
        if isinstance(self.fwd_cnt, int) and self.fwd_cnt >= 0:
            object.__setattr__(self, "fwd_cnt", self.fwd_cnt & 0xFFFFFFFF)
        super().__post_init__()

    def reply(self, **fields) -> "Header":
        """A header going the other way: source and destination swapped, len 0, flags 0."""
        base = replace(self, src_cid=self.dst_cid, dst_cid=self.src_cid, src_port=self.dst_port,
                       dst_port=self.src_port, len=0, flags=0)
        return replace(base, **fields)

    @property
    def op_name(self) -> str:
        try:
            return Op(self.op).name
        except ValueError:
            return f"op {self.op}"

    def describe(self) -> str:
        """One log-friendly line: "RW 3:1024 -> 2:5000 len 4096"."""
        return (f"{self.op_name} {self.src_cid}:{self.src_port} -> {self.dst_cid}:{self.dst_port}"
                f" type {self.type} len {self.len} flags {self.flags:#x}")


assert Header.SIZE == HEADER_SIZE


def pack_header_into(buf, src_cid: int, dst_cid: int, src_port: int, dst_port: int, length: int,
                     sock_type: int, op: int, flags: int, buf_alloc: int, fwd_cnt: int) -> None:
    """Write a header straight into a writable buffer (the data path's fast way; no object)."""
    Header.pack_into(buf, 0, src_cid, dst_cid, src_port, dst_port, length, sock_type, op, flags,
                     buf_alloc, fwd_cnt & 0xFFFFFFFF)


def pack_config(guest_cid: int) -> bytes:
    """struct virtio_vsock_config: le64 guest_cid."""
    return struct.pack("<Q", guest_cid)


def unpack_config(data: bytes) -> int:
    if len(data) < CONFIG_SIZE:
        raise PacketError("vsock config space is 8 bytes")
    return struct.unpack_from("<Q", data)[0]


def pack_event(event_id: int = EVENT_TRANSPORT_RESET) -> bytes:
    """struct virtio_vsock_event: le32 id."""
    return struct.pack("<I", event_id)


def unpack_event(data: bytes) -> int:
    if len(data) < EVENT_SIZE:
        raise PacketError("vsock event is 4 bytes")
    return struct.unpack_from("<I", data)[0]
