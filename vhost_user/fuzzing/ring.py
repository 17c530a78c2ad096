"""Fuzz target `ring`: the split-ring walker fed arbitrary rings in memfd memory.

The input lays out a descriptor table, indirect tables, an avail ring, the
indices and the notification fields (mostly plausible values, so the walk
gets deep, with hostile ones mixed in: addresses in the hole between regions
or past the end, 64-bit overflow, loops, out-of-range `next`, nested
indirect, index jumps). Then it drives `Virtqueue.pop/push/notify` (the slow
path; the same C walker serves the native engines) and checks:

* only VirtqueueError subclasses escape `pop`; a broken queue stays quiet;
* every segment `pop` returns lies inside its region;
* no byte outside the used ring and the chains' writable buffers changed,
  guard pages included (FuzzRam.check_writes).
"""
from __future__ import annotations

import struct

from vhost_user.errors import VirtqueueError
from vhost_user.frontend.splitring import write_avail, write_desc
from vhost_user.virtqueue import Virtqueue

from .guestram import FuzzRam
from .reader import ByteReader

__all__ = ["run_one", "seeds", "plausible_desc", "RING"]

class RING:
    """Where region 0 holds what (guest-physical addresses)."""

    DESC, AVAIL, USED, INDIRECT, DATA, DATA_END = 0x0, 0x1000, 0x2000, 0x3000, 0x4000, 0x10000
    OTHER, OTHER_END = 0x20000, 0x30000
    EDGES = (0xFFF8, 0x10000, 0x1FFF8, 0x2FFF8, 0x30000, 1 << 40, (1 << 64) - 8)


def plausible_desc(r: ByteReader, num: int) -> tuple[int, int, int, int]:
    """One descriptor (addr, len, flags, next): usually inside memory and well linked, sometimes hostile."""
    mode = r.u8() % 8
    if mode <= 2:
        addr = RING.DATA + r.u16() % (RING.DATA_END - RING.DATA)
    elif mode <= 4:
        addr = RING.OTHER + r.u16() % (RING.OTHER_END - RING.OTHER)
    elif mode == 5:
        addr = r.pick(RING.EDGES)
    elif mode == 6:
        addr = RING.INDIRECT + 16 * (r.u8() % 64)
    else:
        addr = r.u64()
    length = r.u16() % 0x2000 if r.u8() % 8 else r.u32()
    flags = r.u8() % 8 if r.u8() % 8 else r.u16()
    nxt = r.u16() % (num + 2) if r.u8() % 8 else r.u16()
    return addr, length, flags, nxt


def _layout(ram: FuzzRam, r: ByteReader) -> tuple[int, int, int, bool]:
    """Write desc table, indirect tables and avail ring; returns (num, base, avail_idx, event_idx)."""
    num = 1 << (r.u8() % 9)
    event_idx = r.flag()
    for i in range(num):
        write_desc(ram, RING.DESC, i, *plausible_desc(r, num))
    for i in range(r.u8() % 64):
        write_desc(ram, RING.INDIRECT, i, *plausible_desc(r, 16))
    base = r.u16()
    ahead = r.u8() % (num + 3) if r.u8() % 8 else r.u16()
    avail_idx = (base + ahead) & 0xFFFF
    ring = [r.u16() % (num + 2) for _ in range(num)]
    write_avail(ram, RING.AVAIL, r.u8() & 1, avail_idx, ring)
    ram.write(RING.AVAIL + 4 + 2 * num, struct.pack("<H", r.u16()))  # used_event
    ram.write(RING.USED, struct.pack("<HH", 0, base))
    return num, base, avail_idx, event_idx


def _check_segments(chain, memory) -> None:
    regions = memory.regions
    for i, off, n in chain.readable + chain.writable:
        assert 0 <= i < len(regions), f"segment in region {i}"
        assert n > 0 and 0 <= off and off + n <= regions[i].size, f"segment {off:#x}+{n:#x} outside region {i}"


def run_one(data: bytes, ram: FuzzRam | None = None) -> None:
    own = ram is None
    ram = ram or FuzzRam()
    try:
        _run(ram, ByteReader(data))
    finally:
        if own:
            ram.close()


def _run(ram: FuzzRam, r: ByteReader) -> None:
    ram.reset()
    num, base, _, event_idx = _layout(ram, r)
    before = ram.snapshot()
    used_len = 6 + 8 * num + 2
    allowed = [(0, RING.USED, used_len)]
    memory = ram.memory()
    vq = Virtqueue(0, 256)
    try:
        vq.set_num(num)
        vq.set_addr(ram.uaddr(RING.DESC), ram.uaddr(RING.AVAIL), ram.uaddr(RING.USED))
        vq.set_base(base)
        vq.set_event_idx(event_idx)
        vq.start(memory, None)
        for _ in range(r.u8() % (2 * num + 2)):
            try:
                chain = vq.pop()
            except VirtqueueError:
                assert vq.broken, "pop raised but the queue is not marked broken"
                assert vq.pop() is None, "a broken queue handed out another chain"
                break
            if chain is None:
                break
            _check_segments(chain, memory)
            allowed.extend(chain.writable)
            if r.flag():
                wrote = chain.write(r.take(r.u16() % 0x3000), offset=r.u16() % 64)
                assert 0 <= wrote <= chain.write_len
            vq.push(chain.head, r.u32() if r.u8() == 0xFF else chain.write_len)
            if r.flag():
                vq.notify()
    finally:
        vq.close()
        memory.close()
    ram.check_writes(before, allowed)


def seeds() -> list[bytes]:
    """Deterministic pseudo-random inputs (the layout makes most of them plausible)."""
    import random

    rng = random.Random(7)
    out = [bytes(64), bytes([3]) + bytes(300)]
    for size in (64, 256, 1024, 4096):
        out.append(bytes(rng.getrandbits(8) for _ in range(size)))
    return out
