"""What every device driver model of the built-in front-end shares.

A driver model (`vhost_user.backends.<dev>.driver`) owns one `Frontend`
(`self.fe`) and is used as a context manager; `Driver` gives it `close()`
and the `with` protocol once instead of in every device. `split_buffer`
cuts one guest buffer into several descriptors, which tests use to make
requests cross descriptor edges.
"""

from __future__ import annotations

__all__ = ["Driver", "split_buffer"]


class Driver:
    """Base of the device driver models: `self.fe` is the connection it closes."""

    fe = None  # set by the subclass's constructor

    def close(self) -> None:
        self.fe.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def split_buffer(gpa: int, length: int, parts: int, *, writable: bool = True) -> list[tuple[int, int, bool]]:
    """Cut one buffer into `parts` descriptors (tests use it to cross descriptor edges)."""
    if length == 0:
        return []
    parts = max(1, min(parts, length))
    step = -(-length // parts)
    return [(gpa + off, min(step, length - off), writable) for off in range(0, length, step)]
