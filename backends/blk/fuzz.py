"""Fuzz target `blk`: arbitrary request chains through the native BlkEngine.

Each input builds one to three virtio-blk chains (header, data, discard
ranges, status; split, indirect, read-only engine, sectors at and past the
capacity, unknown types, misplaced or missing status bytes, hostile
addresses) in memfd guest memory over a 64 KiB memfd image, starts a queue
with a BlkEngine worker, kicks it and waits. Checks:

* the worker completes the chains or breaks the queue: it never hangs;
* every used element names a chain we published, with a used length no
  larger than the chain's writable bytes, and its status byte is OK, IOERR
  or UNSUPP;
* the image keeps its size (no write past the capacity) and no guest byte
  outside the used ring and the writable buffers changed (guard pages too).
"""
from __future__ import annotations

import os
import struct
import time

from vhost_user.backends.blk.engine import BlkEngine
from vhost_user.virtqueue import Virtqueue

from vhost_user.fuzzing.guestram import FuzzRam
from vhost_user.fuzzing.reader import ByteReader
from vhost_user.frontend.splitring import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, write_avail, write_desc
from vhost_user.fuzzing.ring import RING

__all__ = ["run_one", "seeds"]

F_NEXT, F_WRITE, F_INDIRECT = DESC_F_NEXT, DESC_F_WRITE, DESC_F_INDIRECT
IMAGE_SIZE = 64 << 10
CAPACITY = IMAGE_SIZE // 512
TYPES = (0, 1, 4, 8, 11, 13, 10, 14)
_state: dict = {}


def _rig() -> tuple[FuzzRam, int]:
    """One guest RAM and one image per process (a memfd: ENOSPC-free, fast)."""
    if "ram" not in _state:
        _state["ram"] = FuzzRam()
        fd = os.memfd_create("fuzz-blk-image", os.MFD_CLOEXEC)
        os.ftruncate(fd, IMAGE_SIZE)
        _state["image"] = fd
    return _state["ram"], _state["image"]


class _Alloc:
    def __init__(self) -> None:
        self.spots = {0: RING.DATA, 1: RING.OTHER}
        self.ends = {0: RING.DATA_END, 1: RING.OTHER_END}

    def take(self, n: int, region: int) -> int:
        n = max(n, 1)
        if self.spots[region] + n > self.ends[region]:
            region = 1 - region
        assert self.spots[region] + n <= self.ends[region], "fuzz RAM exhausted (target bug)"
        gpa = self.spots[region]
        self.spots[region] += n
        return gpa


def _chain(r: ByteReader, ram: FuzzRam, alloc: _Alloc) -> list[tuple[int, int, int]]:
    """[(gpa, len, flags)] of one request, readable part first (usually)."""
    rtype = r.pick(TYPES) if r.u8() % 8 else r.u32()
    sector = r.pick((0, r.u8() % CAPACITY, CAPACITY - 1, CAPACITY, CAPACITY + r.u8(), r.u64()))
    hdr = alloc.take(16, 0)
    ram.write(hdr, struct.pack("<IIQ", rtype, 0, sector))
    descs = [(hdr, 16 if r.u8() % 8 else r.u8() % 33, 0)]
    if r.u8() % 4 == 0 and descs[0][1] == 16:
        cut = 1 + r.u8() % 15
        descs = [(hdr, cut, 0), (hdr + cut, 16 - cut, 0)]
    if rtype in (11, 13) or r.u8() % 16 == 0:
        nseg = r.u8() % 6
        seg = alloc.take(16 * nseg, 0)
        for k in range(nseg):
            ram.write(seg + 16 * k, struct.pack("<QII", r.pick((0, 1, CAPACITY - 8, CAPACITY, r.u64())),
                                                 r.pick((0, 1, 8, 64, 65, r.u32())), r.pick((0, 0, 1, 2))))
        descs.append((seg, 16 * nseg if r.u8() % 8 else r.u8(), 0))
    data_flag = F_WRITE if rtype in (0, 8) else 0
    for _ in range(r.u8() % 4):
        n = r.pick((512, 1024, 4096, 511, 0, r.u16() % 0x1000))  # 3 chains fit without reuse
        region = r.u8() % 2
        flag = data_flag if r.u8() % 8 else data_flag ^ F_WRITE
        descs.append((alloc.take(n, region), n, flag))
    if r.u8() % 16:
        descs.append((alloc.take(1, 0), 1 if r.u8() % 8 else r.u8() % 3, F_WRITE))
    if descs and r.u8() % 16 == 0:  # one hostile address
        k = r.u8() % len(descs)
        descs[k] = (r.pick(RING.EDGES), descs[k][1], descs[k][2])
    return descs


def _publish(r: ByteReader, ram: FuzzRam, chains, num: int) -> tuple[list[int], list]:
    """Write the chains (direct or indirect); returns heads and the WRITE spans."""
    slot = 0
    heads = []
    writable = []
    indirect_at = RING.INDIRECT
    for descs in chains:
        for gpa, n, flags in descs:
            if flags & F_WRITE:
                writable.append((gpa, n))
        use_indirect = r.u8() % 4 == 0 and indirect_at + 16 * len(descs) <= RING.DATA and descs
        if use_indirect:
            for k, (gpa, n, flags) in enumerate(descs):
                more = F_NEXT if k + 1 < len(descs) else 0
                write_desc(ram, indirect_at, k, gpa, n, flags | more, k + 1 if more else 0)
            write_desc(ram, RING.DESC, slot, indirect_at, 16 * len(descs), F_INDIRECT, 0)
            indirect_at += 16 * len(descs)
            heads.append(slot)
            slot += 1
            continue
        if slot + len(descs) > num or not descs:
            break
        heads.append(slot)
        for k, (gpa, n, flags) in enumerate(descs):
            more = F_NEXT if k + 1 < len(descs) else 0
            write_desc(ram, RING.DESC, slot + k, gpa, n, flags | more, slot + k + 1 if more else 0)
        slot += len(descs)
    write_avail(ram, RING.AVAIL, 0, len(heads), heads)
    return heads, writable


def _region_spans(ram: FuzzRam, gpa: int, n: int) -> list[tuple[int, int, int]]:
    out = []
    for i, s in enumerate(ram.spans):
        lo, hi = max(gpa, s.gpa), min(gpa + n, s.gpa + s.size)
        if lo < hi:
            out.append((i, lo - s.gpa, hi - lo))
    return out


def run_one(data: bytes) -> None:
    ram, image = _rig()
    r = ByteReader(data)
    ram.reset()
    num = 64
    alloc = _Alloc()
    chains = [_chain(r, ram, alloc) for _ in range(1 + r.u8() % 3)]
    heads, writable = _publish(r, ram, chains, num)
    before = ram.snapshot()
    allowed = [(0, RING.USED, 6 + 8 * num + 2)]
    for gpa, n in writable:
        allowed += _region_spans(ram, gpa, n)
    engine = BlkEngine(image, CAPACITY, read_only=r.u8() % 8 == 0, serial=b"fuzz",
                       max_discard_sectors=64, max_discard_seg=4,
                       max_write_zeroes_sectors=64, max_write_zeroes_seg=4)
    vq = Virtqueue(0, 256)
    kick = os.eventfd(0, os.EFD_CLOEXEC)
    memory = ram.memory()
    try:
        vq.set_num(num)
        vq.set_addr(ram.uaddr(RING.DESC), ram.uaddr(RING.AVAIL), ram.uaddr(RING.USED))
        vq.set_kick(os.dup(kick))
        vq.start(memory, engine)
        os.eventfd_write(kick, 1)
        deadline = time.monotonic() + 5.0
        while struct.unpack("<H", ram.read(RING.USED + 2, 2))[0] < len(heads) and not vq.broken:
            assert time.monotonic() < deadline, f"worker hung on {len(heads)} chain(s)"
            time.sleep(0.0002)
    finally:
        vq.close()
        memory.close()
        os.close(kick)
    _check_used(ram, chains, heads, num)
    assert os.fstat(image).st_size == IMAGE_SIZE, "the image grew: a write went past the capacity"
    ram.check_writes(before, allowed)


def _check_used(ram: FuzzRam, chains, heads: list[int], num: int) -> None:
    used = struct.unpack("<H", ram.read(RING.USED + 2, 2))[0]
    assert used <= len(heads), f"{used} used elements for {len(heads)} chains"
    by_head = dict(zip(heads, chains))
    for k in range(used):
        uid, ulen = struct.unpack("<II", ram.read(RING.USED + 4 + 8 * k, 8))
        assert uid in by_head, f"used element names head {uid}, never published"
        descs = by_head[uid]
        room = sum(n for _, n, f in descs if f & F_WRITE)
        assert ulen <= room, f"used length {ulen} exceeds the {room} writable bytes"
        last = [(gpa, n) for gpa, n, f in descs if f & F_WRITE and n][-1]  # empty ones add no segment
        status = ram.read(last[0] + last[1] - 1, 1)[0]
        assert status in (0, 1, 2), f"status byte {status}"


def seeds() -> list[bytes]:
    import random

    rng = random.Random(11)
    out = [bytes(32), bytes([1, 0, 0, 1]) + bytes(60)]
    for size in (32, 128, 512, 2048):
        out.append(bytes(rng.getrandbits(8) for _ in range(size)))
    return out
