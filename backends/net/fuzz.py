"""Fuzz target `net-header`: the virtio-net header parser and the C switch's header handling.

Part one: `NetHeader.unpack` (10- and 12-byte layouts) on arbitrary bytes:
only ValueError escapes, and unpack->pack is the identity.

Part two: frames with arbitrary virtio-net headers (flags, GSO type and
sizes, checksum start/offset) and arbitrary Ethernet/IP/TCP/UDP bytes enter
the native switch (backends/net/net.c) through a TAP port whose fd is one end of a
SOCK_SEQPACKET socketpair, read by `vr_net_tap_run` in a thread as the real
TAP reader is. The switch's header checks, checksum resolution and software
segmentation then run on them toward a second TAP port (also a socketpair)
and a virtio port that negotiated no offloads. Checks: every frame is
accounted for exactly once (switched, runt or bad header); what the second
TAP port receives is a 12-byte header plus a frame of 14 bytes or more, no
larger than the largest frame; nothing crashes (run it on the ASan build).
"""
from __future__ import annotations

import os
import socket
import struct
import threading
import time

from vhost_user.backends.net.header import HEADER_SIZE, OFFLOAD_FEATURES, NetHeader
from vhost_user.backends.net.engine import NetSwitch

from vhost_user.fuzzing.reader import ByteReader

__all__ = ["run_one", "seeds"]

_MAX_FRAME = 65536 + 14
_state: dict = {}
_ACCOUNTED = ("tx_frames", "tx_runt", "tx_bad_header", "tx_oversize", "tx_malformed")


def _rig() -> dict:
    if not _state:
        sw = NetSwitch()
        a_dev, a_peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        b_dev, b_peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for s in (a_dev, b_dev, b_peer):
            s.setblocking(False)
        b_peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        a = sw.add_port(a_dev.fileno(), OFFLOAD_FEATURES)  # the host kernel may send every offload
        b = sw.add_port(b_dev.fileno(), 0)
        c = sw.add_port()  # a virtio port with no offloads and no rx queue: segmentation, csum
        sw.set_features(c, 1 << 32)
        ctl_r, ctl_w = os.pipe()
        thread = threading.Thread(target=sw.run_tap, args=(a, ctl_r), daemon=True, name="fuzz-tap")
        thread.start()
        _state.update(sw=sw, a=a, b=b, c=c, keep=(a_dev, b_dev, ctl_r, ctl_w), a_peer=a_peer,
                      b_peer=b_peer, thread=thread)
    return _state


def _accounted(sw: NetSwitch, port: int) -> int:
    st = sw.stats(port)
    return sum(st[k] for k in _ACCOUNTED)


def _parser_part(r: ByteReader) -> None:
    size = r.pick((HEADER_SIZE, 10))
    raw = r.take(size if r.u8() % 4 else r.u8() % 16)
    try:
        hdr = NetHeader.unpack(raw, size)
    except ValueError:
        assert len(raw) < size
        return
    assert hdr.pack(size) == raw[:size]


def _frame(r: ByteReader) -> bytes:
    hdr = struct.pack("<BBHHHHH", r.pick((0, 1, 1, 1, 2, 3)) if r.u8() % 8 else r.u8(),
                      r.pick((0, 1, 3, 4, 0x81, 0x84)) if r.u8() % 8 else r.u8(),
                      r.pick((0, 14, 34, 54, 74)) if r.flag() else r.u16(),
                      r.pick((0, 536, 1448, 1)) if r.flag() else r.u16(),
                      r.pick((14, 34, 54)) if r.flag() else r.u16(),
                      r.pick((6, 16)) if r.flag() else r.u16(), 1)
    dst = r.pick((b"\xff" * 6, b"\x02\0\0\0\0\x01", b"\x02\0\0\0\0\x02"))
    src = r.pick((b"\x02\0\0\0\0\x03", b"\x02\0\0\0\0\x04"))
    ethertype = r.pick((b"\x08\x00", b"\x86\xdd", b"\x81\x00", r.take(2)))
    ip = b""
    if ethertype == b"\x08\x00" and r.u8() % 4:
        ihl = 5 if r.u8() % 8 else r.u8() % 16
        total = r.u16() if r.u8() % 4 == 0 else 0
        ip = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, total, 0, 0, 64, r.pick((6, 17, 1)), 0,
                         b"\x0a\0\0\1", b"\x0a\0\0\2")
    elif ethertype == b"\x86\xdd" and r.u8() % 4:
        ip = struct.pack("!IHBB16s16s", 0x60000000, r.u16() % 4000, r.pick((6, 17, 0, 44)), 64,
                         bytes(16), bytes(16))
    body = r.take(r.u16() % 4000)
    if r.u8() % 16 == 0:
        body += bytes(r.u16() % 60000)  # a large GSO frame
    return hdr + dst + src + ethertype + ip + body


def run_one(data: bytes) -> None:
    r = ByteReader(data)
    _parser_part(r)
    st = _rig()
    sw, a, a_peer, b_peer = st["sw"], st["a"], st["a_peer"], st["b_peer"]
    assert st["thread"].is_alive(), "the TAP reader stopped"
    start = _accounted(sw, a)
    sent = 0
    for _ in range(1 + r.u8() % 6):
        frame = _frame(r) if r.u8() % 8 else r.take(r.u8())
        if not frame:
            continue
        a_peer.send(frame[:12 + _MAX_FRAME])
        sent += 1
    deadline = time.monotonic() + 10
    while _accounted(sw, a) - start < sent:
        assert time.monotonic() < deadline, f"{_accounted(sw, a) - start} of {sent} frames accounted for"
        time.sleep(0.0002)
    assert _accounted(sw, a) - start == sent
    while True:
        try:
            out = b_peer.recv(1 << 18)
        except BlockingIOError:
            break
        assert HEADER_SIZE + 14 <= len(out) <= HEADER_SIZE + _MAX_FRAME, f"{len(out)}-byte frame on the TAP"


def seeds() -> list[bytes]:
    return [bytes(64), b"\1" * 200, bytes(range(256)) * 2, b"\x0c\x03\x01\x01\x00\x01" + bytes(300),
            b"\0\0\x05\x01\x01\x01\x01\x01\x01\x01\x01\x00\x01\x01" + bytes(range(200))]
