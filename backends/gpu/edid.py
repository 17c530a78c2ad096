"""A valid EDID 1.4 base block for a virtual monitor of a given preferred mode.

The guest reads it through GET_EDID to learn the preferred resolution, so the
block carries that mode as its first detailed timing (reduced-blanking timings
at 60 Hz), a range-limits descriptor, a monitor name, and a checksum that
makes the 128 bytes sum to 0 mod 256 (EDID 1.4, section 3).
"""

from __future__ import annotations

import struct

__all__ = ["build_edid", "edid_checksum_ok", "edid_preferred_mode"]

_HEADER = b"\x00\xff\xff\xff\xff\xff\xff\x00"
# sRGB primaries and D65 white point (x, y), as 10-bit binary fractions.
_CHROMA = ((0.640, 0.330), (0.300, 0.600), (0.150, 0.060), (0.3127, 0.3290))
_H_BLANK, _H_FRONT, _H_SYNC = 160, 48, 32
_V_FRONT, _V_SYNC, _V_MIN_BLANK_US = 3, 6, 460
_REFRESH = 60


def _manufacturer(code: str) -> bytes:
    a, b, c = (ord(ch) - ord("A") + 1 for ch in code)
    return struct.pack(">H", (a << 10) | (b << 5) | c)


def _chromaticity() -> bytes:
    vals = [round(v * 1024) for xy in _CHROMA for v in xy]
    lo = [v & 3 for v in vals]
    b0 = lo[0] << 6 | lo[1] << 4 | lo[2] << 2 | lo[3]
    b1 = lo[4] << 6 | lo[5] << 4 | lo[6] << 2 | lo[7]
    return bytes([b0, b1] + [v >> 2 for v in vals])


def _detailed_timing(width: int, height: int, width_mm: int, height_mm: int) -> bytes:
    """An 18-byte detailed timing descriptor (EDID 1.4, 3.10.2) for width x height @ 60 Hz."""
    width, height = min(width, 4095), min(height, 4095)
    h_total = width + _H_BLANK
    line_us = 1e6 / (_REFRESH * (height + 40)) if height else 1.0
    v_blank = max(-(-_V_MIN_BLANK_US // max(int(line_us), 1)), _V_FRONT + _V_SYNC + 6)
    v_blank = min(v_blank, 4095)
    clock = h_total * (height + v_blank) * _REFRESH // 10_000  # 10 kHz units
    clock = max(1, min(clock, 0xFFFF))
    return bytes([
        clock & 0xFF, clock >> 8,
        width & 0xFF, _H_BLANK & 0xFF, (width >> 8) << 4 | (_H_BLANK >> 8),
        height & 0xFF, v_blank & 0xFF, (height >> 8) << 4 | (v_blank >> 8),
        _H_FRONT & 0xFF, _H_SYNC & 0xFF, (_V_FRONT & 0xF) << 4 | (_V_SYNC & 0xF),
        (_H_FRONT >> 8) << 6 | (_H_SYNC >> 8) << 4 | (_V_FRONT >> 4) << 2 | (_V_SYNC >> 4),
        width_mm & 0xFF, height_mm & 0xFF, (width_mm >> 8) << 4 | (height_mm >> 8),
        0, 0,
        0x1A,  # digital separate sync, hsync +, vsync -
    ])


def _text_descriptor(tag: int, text: str) -> bytes:
    body = text.encode("ascii")[:13]
    if len(body) < 13:
        body += b"\n" + b" " * (12 - len(body))
    return bytes([0, 0, 0, tag, 0]) + body


def _range_limits(max_clock_10mhz: int) -> bytes:
    # vertical 50-75 Hz, horizontal 30-160 kHz, max pixel clock, default GTF.
    return bytes([0, 0, 0, 0xFD, 0, 50, 75, 30, 160, max(1, min(max_clock_10mhz, 255)),
                  0, 0x0A, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20])


def build_edid(width: int, height: int, *, name: str = "vhost-user", serial: int = 0,
               dpi: int = 96) -> bytes:
    """128 bytes of EDID announcing width x height as the preferred mode."""
    if not (0 < width < 1 << 16 and 0 < height < 1 << 16):
        raise ValueError(f"bad mode {width}x{height}")
    width_mm = min(round(width * 25.4 / dpi), 4095)
    height_mm = min(round(height * 25.4 / dpi), 4095)
    dtd = _detailed_timing(width, height, width_mm, height_mm)
    clock_10khz = dtd[0] | dtd[1] << 8
    block = bytearray()
    block += _HEADER
    block += _manufacturer("PYV") + struct.pack("<HI", 0x1234, serial)
    block += bytes([1, 2026 - 1990, 1, 4])       # week, year, EDID 1.4
    block += bytes([0xA5,                         # digital, 8 bits/colour, DisplayPort
                    min(width_mm // 10, 255), min(height_mm // 10, 255),
                    120,                          # gamma 2.2
                    0x06])                        # sRGB default, preferred mode is native
    block += _chromaticity()
    block += bytes([0x21, 0x08, 0x00])            # 640x480, 800x600, 1024x768 @ 60
    block += b"\x01\x01" * 8                      # no standard timings
    block += dtd
    block += _range_limits(-(-clock_10khz // 1000) + 1)
    block += _text_descriptor(0xFC, name)
    block += _text_descriptor(0xFF, f"{serial:08d}")
    block += bytes([0])                           # no extension blocks
    block.append((-sum(block)) & 0xFF)
    assert len(block) == 128
    return bytes(block)


def edid_checksum_ok(edid: bytes) -> bool:
    return len(edid) >= 128 and edid[:8] == _HEADER and sum(edid[:128]) % 256 == 0


def edid_preferred_mode(edid: bytes) -> tuple[int, int]:
    """(width, height) of the first detailed timing descriptor."""
    d = edid[54:72]
    return d[2] | (d[4] >> 4) << 8, d[5] | (d[7] >> 4) << 8
