"""virtio-blk configuration space (virtio spec 5.2.4).

The layout is fixed by the spec; front-ends ask for as many bytes as their
headers know (QEMU 10 asks for the zoned fields too), so the packed space is
padded with zeros to the largest size a front-end may read.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = ["BlkConfig", "CONFIG_SPACE_SIZE"]

# Up to and including the zoned fields of virtio 1.3.
CONFIG_SPACE_SIZE = 96

_LAYOUT = struct.Struct(
    "<Q"      # capacity (512-byte sectors)
    "I"       # size_max
    "I"       # seg_max
    "HBB"     # geometry: cylinders, heads, sectors
    "I"       # blk_size
    "BBHI"    # topology: physical_block_exp, alignment_offset, min_io_size, opt_io_size
    "B"       # writeback
    "B"       # unused0
    "H"       # num_queues
    "III"     # max_discard_sectors, max_discard_seg, discard_sector_alignment
    "II"      # max_write_zeroes_sectors, max_write_zeroes_seg
    "B3x"     # write_zeroes_may_unmap, unused1
    "III"     # max_secure_erase_sectors, max_secure_erase_seg, secure_erase_sector_alignment
)


@dataclass(frozen=True)
class BlkConfig:
    capacity: int
    seg_max: int
    blk_size: int = 512
    num_queues: int = 1
    size_max: int = 0
    physical_block_exp: int = 0
    min_io_size: int = 1
    opt_io_size: int = 0
    writeback: int = 1
    max_discard_sectors: int = 0
    max_discard_seg: int = 0
    discard_sector_alignment: int = 0
    max_write_zeroes_sectors: int = 0
    max_write_zeroes_seg: int = 0
    write_zeroes_may_unmap: int = 0

    def pack(self) -> bytes:
        raw = _LAYOUT.pack(
            self.capacity, self.size_max, self.seg_max,
            0, 0, 0,
            self.blk_size,
            self.physical_block_exp, 0, self.min_io_size, self.opt_io_size,
            self.writeback, 0, self.num_queues,
            self.max_discard_sectors, self.max_discard_seg, self.discard_sector_alignment,
            self.max_write_zeroes_sectors, self.max_write_zeroes_seg,
            self.write_zeroes_may_unmap,
            0, 0, 0,
        )
        return raw.ljust(CONFIG_SPACE_SIZE, b"\0")

    @classmethod
    def unpack(cls, data: bytes) -> "BlkConfig":
        """Parse what a front-end read (used by the built-in front-end)."""
        raw = data[: _LAYOUT.size].ljust(_LAYOUT.size, b"\0")
        f = _LAYOUT.unpack(raw)
        return cls(
            capacity=f[0], size_max=f[1], seg_max=f[2], blk_size=f[6],
            physical_block_exp=f[7], min_io_size=f[9], opt_io_size=f[10],
            writeback=f[11], num_queues=f[13],
            max_discard_sectors=f[14], max_discard_seg=f[15], discard_sector_alignment=f[16],
            max_write_zeroes_sectors=f[17], max_write_zeroes_seg=f[18],
            write_zeroes_may_unmap=f[19],
        )
