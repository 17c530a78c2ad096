"""Fuzz target `vsock-packet`: the vsock header codec and the device's tx path on arbitrary packets.

Part one feeds raw bytes to `Header.unpack` (and the config/event parsers):
only PacketError may escape, and unpack->pack is the identity.

Part two lays 1-8 guest packets into a real split tx ring in fuzz guest RAM
(header and payload over 1-3 descriptors, short headers, lengths that lie,
write-only descriptors, any op/type/CID/port) and runs them through one
long-lived `VsockDevice` (CID 3, a sibling VM CID 4 on the same router, a
`--uds-path` with real listening Unix sockets on ports 1234 (stream) and
1235 (seqpacket), so a guest REQUEST opens a real host connection and the
following RW/SHUTDOWN/CREDIT packets reach the connection state machine).
The chains are handled exactly as the tx worker does (the C data path
first, `_tx_next`, then `_guest_packet` for what C hands back, then push)
but without its catch-all around `_guest_packet`, so an exception is a
finding. An RW packet after a REQUEST to port 1234 reaches the C path.

Invariants: every chain is completed with used length 0; the host I/O
thread stays alive (it once died of EBADF when the tx path closed a socket
it was re-registering); the device never
writes guest memory on tx (guard pages included); after the device's reset
(a front-end leaving) it holds no connection and the process holds no more
fds than before the input.
"""
from __future__ import annotations

import os
import socket
import struct
import tempfile
import time

from vhost_user.backends.vsock.device import VmOptions, VsockDevice
from vhost_user.backends.vsock.packet import (
    HEADER_SIZE,
    Header,
    PacketError,
    unpack_config,
    unpack_event,
)
from vhost_user.backends.vsock.router import Router
from vhost_user.errors import VirtqueueError
from vhost_user.virtqueue import Virtqueue

from vhost_user.fuzzing.guestram import FuzzRam
from vhost_user.fuzzing.reader import ByteReader
from vhost_user.frontend.splitring import DESC_F_NEXT as F_NEXT, DESC_F_WRITE as F_WRITE, write_avail, write_desc
from vhost_user.fuzzing.ring import RING

__all__ = ["run_one", "seeds"]

NUM = 16
PORTS = (1234, 1235)
_state: dict = {}


def _rig():
    if not _state:
        tmp = tempfile.mkdtemp(prefix="fuzz-vsock-", dir=os.environ.get("VHOST_USER_FUZZ_TMP"))
        uds = os.path.join(tmp, "v")
        listeners = []
        for port, kind in zip(PORTS, (socket.SOCK_STREAM, socket.SOCK_SEQPACKET)):
            s = socket.socket(socket.AF_UNIX, kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
            s.bind(f"{uds}_{port}")
            s.listen(64)
            listeners.append(s)
        router = Router()
        dev = VsockDevice(VmOptions(guest_cid=3, socket=None, uds_path=uds), router)
        sibling = VsockDevice(VmOptions(guest_cid=4, socket=None, uds_path=None), router)
        _state.update(ram=FuzzRam(), dev=dev, sibling=sibling, listeners=listeners)
    return _state


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def _drain(listeners) -> None:
    for s in listeners:
        while True:
            try:
                c, _ = s.accept()
            except BlockingIOError:
                break
            c.close()


def _header_part(r: ByteReader) -> None:
    raw = r.take(HEADER_SIZE if r.u8() % 4 else r.u8() % 60)
    try:
        hdr = Header.unpack(raw)
    except PacketError:
        assert len(raw) < HEADER_SIZE
    else:
        assert hdr.pack() == raw[:HEADER_SIZE]
        hdr.describe()
    for fn, size in ((unpack_config, 8), (unpack_event, 4)):
        raw = r.take(size if r.flag() else r.u8() % 12)
        try:
            fn(raw)
        except PacketError:
            assert len(raw) != size


def _packet(r: ByteReader, prev: Header | None) -> Header:
    """A header: often the previous packet's connection with another op (REQUEST, then RW...)."""
    if prev is not None and r.u8() % 4:
        return Header(**{**prev.__dict__, "op": r.pick((5, 5, 5, 4, 6, 7, 3, 2, 1)),
                         "flags": r.u8() % 4, "fwd_cnt": r.u32() if r.u8() % 8 == 0 else prev.fwd_cnt})
    return Header(
        src_cid=3 if r.u8() % 8 else r.u32(),
        dst_cid=r.pick((2, 2, 2, 4, 5, 0xFFFFFFFF)) if r.u8() % 8 else r.u64(),
        src_port=r.pick((1000, 1001, 1002)) if r.u8() % 8 else r.u32(),
        dst_port=r.pick(PORTS + (9,)) if r.u8() % 8 else r.u32(),
        len=0,
        type=r.pick((1, 1, 1, 2)) if r.u8() % 8 else r.u16(),
        op=r.pick((1, 1, 1, 5, 4, 3, 6, 7, 2, 0, 8)) if r.u8() % 8 else r.u16(),
        flags=r.u8() % 4 if r.u8() % 4 else r.u32(),
        buf_alloc=r.pick((0, 4096, 65536, 0xFFFFFFFF)),
        fwd_cnt=r.pick((0, 1, 4096, 0xFFFFFFFF)) if r.flag() else r.u32(),
    )


def _wire(r: ByteReader, hdr: Header) -> bytes:
    payload = r.take(r.u16() % 3000) if r.flag() else b""
    length = len(payload) if r.u8() % 8 else r.pick((len(payload) + 1, 1 << 20, 0xFFFFFFFF, 0))
    return Header(**{**hdr.__dict__, "len": length}).pack() + payload


def _lay_out(r: ByteReader, ram: FuzzRam, packets: list[bytes]) -> int:
    descs, heads, spot = [], [], RING.DATA
    for pkt in packets:
        if r.u8() % 8 == 0:
            pkt = pkt[:r.u8() % HEADER_SIZE]  # no full header
        cuts = sorted({r.below(len(pkt) + 1) for _ in range(r.u8() % 3)} - {0, len(pkt)})
        pieces = [pkt[a:b] for a, b in zip([0] + cuts, cuts + [len(pkt)])] or [b""]
        heads.append(len(descs))
        for k, piece in enumerate(pieces):
            if spot + len(piece) + 1 > RING.DATA_END:
                piece = piece[:max(0, RING.DATA_END - spot - 1)]
            ram.write(spot, piece)
            flags = (F_NEXT if k + 1 < len(pieces) else 0) | (F_WRITE if r.u8() % 16 == 0 else 0)
            descs.append((spot, len(piece), flags, len(descs) + 1))
            spot += len(piece) + 1
    for i, d in enumerate(descs[:NUM]):
        write_desc(ram, RING.DESC, i, d[0], d[1], d[2] if i + 1 < NUM else d[2] & ~F_NEXT, d[3])
    heads = [h for h in heads if h < NUM]
    write_avail(ram, RING.AVAIL, 0, len(heads), heads)
    return len(heads)


def run_one(data: bytes) -> None:
    st = _rig()
    ram, dev = st["ram"], st["dev"]
    r = ByteReader(data)
    _header_part(r)
    ram.reset()
    packets, prev = [], None
    for _ in range(1 + r.u8() % 8):
        prev = _packet(r, prev)
        packets.append(_wire(r, prev))
    count = _lay_out(r, ram, packets)
    fds_before = _fd_count()
    before = ram.snapshot()
    memory = ram.memory()
    vq = Virtqueue(1, NUM)
    try:
        vq.set_num(NUM)
        vq.set_addr(ram.uaddr(RING.DESC), ram.uaddr(RING.AVAIL), ram.uaddr(RING.USED))
        vq.set_base(0)
        vq.start(memory, None)
        while True:
            try:
                chain = dev._tx_next(vq)  # C finishes what it can; the rest comes back
            except VirtqueueError:  # a write-only descriptor before a readable one
                chain = None
            if chain is None:
                break
            dev._guest_packet(chain)  # what the tx worker does, without its catch-all
            vq.push(chain.head, 0)
        done, = struct.unpack("<H", ram.read(RING.USED + 2, 2))
        if vq.broken:
            count = done
        assert done == count, f"{done} of {count} chains handled"
        with dev._lock:
            dev._flush_wake()
    finally:
        vq.close()
        memory.close()
        dev.reset()
        st["sibling"].reset()
        _drain(st["listeners"])
    ram.check_writes(before, [(0, RING.USED, 4 + 8 * NUM + 2)])
    used_idx, = struct.unpack("<H", ram.read(RING.USED + 2, 2))
    assert used_idx == count
    for i in range(count):
        assert struct.unpack("<I", ram.read(RING.USED + 4 + 8 * i + 4, 4))[0] == 0
    assert not dev._conns, "connections survived the reset"
    assert dev.host._thread.is_alive(), "the vsock host I/O thread died"
    deadline = time.monotonic() + 2  # the host I/O thread forgets closed sockets on its own time
    while _fd_count() > fds_before and time.monotonic() < deadline:
        time.sleep(0.001)
    assert _fd_count() <= fds_before, f"fd leak: {fds_before} -> {_fd_count()}"


def _c_path_seed() -> bytes:
    """REQUEST 3:1000 -> 2:1234 then a 1000-byte RW on it: the RW is finished by the C
    data path, which atheris cannot see (it follows Python coverage only)."""
    b = bytearray([1]) + bytes(44) + bytes([1]) + bytes(8) + bytes([1]) + bytes(4)  # header part
    b += bytes([1])                                                     # two packets
    b += bytes([1, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 2, 1, 0, 0, 1])  # REQUEST, stream, no payload
    b += bytes([1, 0, 0, 1])                                            # RW, same connection
    b += bytes([1]) + struct.pack("<H", 1000) + bytes(range(256)) * 3 + bytes(232) + bytes([1])
    b += bytes([1, 0, 1, 1, 0, 1])                                      # one whole descriptor each
    return bytes(b)


def seeds() -> list[bytes]:
    return [bytes(80), bytes([4]) + bytes(200), bytes(range(256)),
            bytes([3, 8]) + bytes(60) + bytes([3, 1, 0, 1, 1]) + bytes(40),
            b"\x01" * 120, b"\xff" * 90, _c_path_seed()]
