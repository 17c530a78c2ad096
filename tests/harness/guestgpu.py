"""The test picture the gpu guest tests write to the guest's framebuffer, and
the pixels a display of it must show."""

from __future__ import annotations

import numpy as np

__all__ = ["BLOCK", "expected_frame"]

BLOCK = bytes((i * 7 + 13) % 255 + 1 for i in range(1004))  # 251 pixels: rows do not repeat


def expected_frame(width: int, height: int, stride: int) -> np.ndarray:
    """The RGB image the XRGB8888 (little-endian: B, G, R, X) framebuffer bytes show
    when BLOCK is repeated over `stride` * `height` bytes."""
    size = stride * height
    frame = (BLOCK * (size // len(BLOCK) + 1))[:size]
    fb = np.frombuffer(frame, np.uint8).reshape(height, stride)
    return fb[:, :width * 4].reshape(height, width, 4)[:, :, [2, 1, 0]]
