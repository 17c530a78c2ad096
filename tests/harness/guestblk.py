"""Host-side pieces of the vhost-user-blk guest tests: our back-end's argv and
the sparse images it serves."""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["ours_argv", "sparse_image"]


def ours_argv(image: Path, sock: Path, *extra: str) -> list[str]:
    """Our vhost-user-blk serving `image` on `sock` with one queue, verbose, plus `extra`."""
    return [sys.executable, "-m", "vhost_user.backends.blk", "--socket", str(sock),
            "--image", str(image), "--num-queues", "1", "-v", *extra]


def sparse_image(path: Path, size: int) -> Path:
    """A file of `size` bytes that holds no blocks yet."""
    with open(path, "wb") as handle:
        handle.truncate(size)
    return path
