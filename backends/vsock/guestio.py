"""Zero-copy access to a popped chain's guest buffers.

The payload of a vsock packet moves between guest memory and a host socket
with one `sendmsg` / `recvmsg_into` over memoryviews of the guest mapping,
so the kernel copies the bytes and Python never loops over them. Views pin
the mmap (it cannot be unmapped while exported), so every list returned here
must be handed back to `release` before the handler returns.
"""

from __future__ import annotations

__all__ = ["readable_views", "writable_views", "release", "read_prefix"]


def _views(chain, segments, skip: int, limit: int) -> list[memoryview]:
    regions = chain.memory.regions
    out: list[memoryview] = []
    for index, offset, length in segments:
        if limit <= 0:
            break
        if skip >= length:
            skip -= length
            continue
        region = regions[index]
        start = region.mmap_offset + offset + skip
        take = min(length - skip, limit)
        base = memoryview(region.mmap)
        out.append(base[start:start + take])
        base.release()
        limit -= take
        skip = 0
    return out


def readable_views(chain, skip: int, limit: int) -> list[memoryview]:
    """Views of the device-readable bytes [skip, skip+limit) of the chain."""
    return _views(chain, chain.readable, skip, limit)


def writable_views(chain, skip: int, limit: int) -> list[memoryview]:
    """Views of the device-writable bytes [skip, skip+limit) of the chain."""
    return _views(chain, chain.writable, skip, limit)


def release(views: list[memoryview]) -> None:
    for v in views:
        v.release()
    views.clear()


def read_prefix(chain, length: int) -> bytes:
    """The first `length` readable bytes (the header), across segment edges."""
    segments = chain.readable
    if segments and segments[0][2] >= length:  # the usual case: one descriptor holds it
        index, offset, _ = segments[0]
        return chain.memory.regions[index].read(offset, length)
    views = readable_views(chain, 0, length)
    try:
        return b"".join(bytes(v) for v in views)
    finally:
        release(views)
