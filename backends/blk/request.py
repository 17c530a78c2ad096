"""virtio-blk request layout (virtio spec 5.2.6), shared by device and driver.

Pure data: constants and pack/unpack helpers. The back-end's hot path parses
requests in C (blk.c); this module is the readable reference used by the
built-in front-end's driver model, the tests and the fuzzers.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from vhost_user.protocol.layout import WireStruct

__all__ = [
    "SECTOR_SIZE",
    "ID_BYTES",
    "RequestType",
    "Status",
    "BlkFeature",
    "RequestHeader",
    "DiscardSegment",
    "WRITE_ZEROES_FLAG_UNMAP",
]

SECTOR_SIZE = 512
ID_BYTES = 20
WRITE_ZEROES_FLAG_UNMAP = 1


class RequestType(enum.IntEnum):
    IN = 0
    OUT = 1
    FLUSH = 4
    GET_ID = 8
    GET_LIFETIME = 10
    DISCARD = 11
    WRITE_ZEROES = 13
    SECURE_ERASE = 14


class Status(enum.IntEnum):
    OK = 0
    IOERR = 1
    UNSUPP = 2


class BlkFeature(enum.IntEnum):
    """Device feature bits (virtio spec 5.2.3)."""

    SIZE_MAX = 1
    SEG_MAX = 2
    GEOMETRY = 4
    RO = 5
    BLK_SIZE = 6
    FLUSH = 9
    TOPOLOGY = 10
    CONFIG_WCE = 11
    MQ = 12
    DISCARD = 13
    WRITE_ZEROES = 14


@dataclass(frozen=True)
class RequestHeader(WireStruct):
    """struct virtio_blk_outhdr: type, reserved, sector."""

    type: int
    sector: int
    reserved: int = 0
    _LAYOUT = (("type", "I"), ("reserved", "I"), ("sector", "Q"))


@dataclass(frozen=True)
class DiscardSegment(WireStruct):
    """struct virtio_blk_discard_write_zeroes: sector, num_sectors, flags."""

    sector: int
    num_sectors: int
    flags: int = 0
    _LAYOUT = (("sector", "Q"), ("num_sectors", "I"), ("flags", "I"))
