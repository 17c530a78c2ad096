"""Fuzz target `blk-request`: the virtio-blk layout parser (backends/blk/request.py).

Arbitrary bytes go to `RequestHeader.unpack` and `DiscardSegment.unpack`.
Only ValueError may escape (wrong length); whatever unpacks packs back to
the same bytes, and every field stays inside its wire width.
"""
from __future__ import annotations

from vhost_user.backends.blk.request import DiscardSegment, RequestHeader

from vhost_user.fuzzing.reader import ByteReader

__all__ = ["run_one", "seeds"]


def run_one(data: bytes) -> None:
    r = ByteReader(data)
    while r.remaining:
        kind = r.u8() % 2
        cls = (RequestHeader, DiscardSegment)[kind]
        n = cls.SIZE if r.u8() % 4 else r.u8() % 40
        raw = r.take(n)
        try:
            obj = cls.unpack(raw)
        except ValueError:
            assert len(raw) != cls.SIZE, f"{cls.__name__} refused {len(raw)} well-sized bytes"
            continue
        assert len(raw) == cls.SIZE
        assert obj.pack() == raw, f"{obj!r} does not pack back to its bytes"
        if kind == 0:
            assert 0 <= obj.type < 1 << 32 and 0 <= obj.sector < 1 << 64
        else:
            assert 0 <= obj.num_sectors < 1 << 32 and 0 <= obj.flags < 1 << 32


def seeds() -> list[bytes]:
    hdr = RequestHeader(1, 8).pack()
    seg = DiscardSegment(0, 8, 1).pack()
    return [b"\0\1" + hdr, b"\1\1" + seg, b"\0\0\5" + hdr[:5], b"\0\1" + hdr + b"\1\1" + seg]
