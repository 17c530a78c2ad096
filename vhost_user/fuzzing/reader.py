"""A deterministic reader that turns fuzzer bytes into structured choices.

Every target interprets its input through this reader, so the same bytes
always replay the same case (a crash file is a regression test), and an
exhausted input reads as zeros instead of failing: short inputs are valid
inputs. atheris' FuzzedDataProvider would do the same, but the targets must
also run (and replay) without atheris installed.
"""
from __future__ import annotations

__all__ = ["ByteReader"]


class ByteReader:
    """Consumes bytes front to back; reads past the end give zeros."""

    def __init__(self, data: bytes) -> None:
        self._data = bytes(data)
        self._pos = 0

    @property
    def remaining(self) -> int:
        return max(0, len(self._data) - self._pos)

    def take(self, n: int) -> bytes:
        """Up to n bytes (fewer when the input runs out)."""
        chunk = self._data[self._pos:self._pos + max(0, n)]
        self._pos += len(chunk)
        return chunk

    def uint(self, nbytes: int) -> int:
        return int.from_bytes(self.take(nbytes).ljust(nbytes, b"\0"), "little")

    def u8(self) -> int:
        return self.uint(1)

    def u16(self) -> int:
        return self.uint(2)

    def u32(self) -> int:
        return self.uint(4)

    def u64(self) -> int:
        return self.uint(8)

    def below(self, n: int) -> int:
        """An int in [0, n) (n <= 65536)."""
        return self.u16() % n if n > 256 else self.u8() % n

    def pick(self, options):
        return options[self.below(len(options))]

    def flag(self) -> bool:
        return bool(self.u8() & 1)
