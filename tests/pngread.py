"""Read the PNG files the gpu back-end's png: display writes, with zlib only.

The back-end writes 8-bit RGB, one IDAT stream, filter 0 on every row; this
reader accepts just that and checks each chunk's CRC, so a test comparing
pixels also proves the file is well formed.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

__all__ = ["read_png"]

_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_png(path: str) -> np.ndarray:
    """The pixels of the PNG at `path` as an (height, width, 3) uint8 array."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == _SIGNATURE
    pos, idat, w, h = 8, b"", 0, 0
    while pos < len(data):
        n, tag = struct.unpack_from(">I4s", data, pos)
        body = data[pos + 8:pos + 8 + n]
        assert zlib.crc32(tag + body) == struct.unpack_from(">I", data, pos + 8 + n)[0]
        if tag == b"IHDR":
            w, h = struct.unpack_from(">II", body)
        elif tag == b"IDAT":
            idat += body
        pos += 12 + n
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, 1 + w * 3)
    assert np.all(raw[:, 0] == 0)
    return raw[:, 1:].reshape(h, w, 3)
