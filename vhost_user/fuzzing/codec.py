"""Fuzz target `codec`: the sans-IO decoder fed arbitrary byte streams and fd counts.

Input layout (read with ByteReader): byte 0 bit 0 picks the decoder (what a
back-end reads, or what a front-end reads); then chunks, each `c, n, bytes[n]`
where `c % 10` fake fds arrive with the chunk's first byte, as recvmsg
delivers them. The fds are plain ints, never real descriptors.

Invariants checked on every input:
* only RemoteProtocolError (and its documented subclasses) escapes
  `next_message`; `feed` raises LocalProtocolError only after a fatal error;
* every fd fed comes back exactly once: in a Message, in an error's `fds`,
  or from `drain_fds()` (after a fatal error `feed` leaves them with us);
* a decoded message that `encode` accepts decodes back to an equal message.
"""
from __future__ import annotations

from collections import Counter

from vhost_user.protocol import (
    U64,
    ConfigSpace,
    FrontendRequest as R,
    LocalProtocolError,
    MemoryRegion,
    MemoryTable,
    Message,
    MessageDecoder,
    RemoteProtocolError,
    SingleMemoryRegion,
    VringAddress,
    VringFdRequest,
    VringState,
    encode,
)

from .reader import ByteReader

__all__ = ["run_one", "seeds", "frame"]

_FD_BASE = 100_000  # fake fd numbers: never real descriptors of this process


def _decoder(backend_side: bool) -> MessageDecoder:
    return MessageDecoder.for_backend() if backend_side else MessageDecoder.for_frontend()


def _drain(decoder: MessageDecoder, got: list[int], messages: list[Message]) -> bool:
    """Pull every complete message; False once the stream failed fatally."""
    while True:
        try:
            msg = decoder.next_message()
        except RemoteProtocolError as exc:
            got.extend(exc.fds)
            if not exc.recoverable:
                return False
            continue
        if msg is None:
            return True
        got.extend(msg.fds)
        messages.append(msg)


def _check_roundtrip(msg: Message, backend_side: bool) -> None:
    try:
        data, fds = encode(msg)
    except LocalProtocolError:
        return  # decodable is wider than encodable (e.g. replies we never send)
    again = _decoder(backend_side)
    again.feed(data, fds)
    back = again.next_message()
    assert back == msg, f"round trip changed {msg!r} into {back!r}"
    assert again.next_message() is None and not again.drain_fds()


def run_one(data: bytes) -> None:
    """One fuzz input; raises AssertionError (or anything unexpected) on a finding."""
    r = ByteReader(data)
    backend_side = r.flag()
    decoder = _decoder(backend_side)
    fed: list[int] = []
    got: list[int] = []
    messages: list[Message] = []
    alive = True
    while r.remaining and alive:
        nfds = r.u8() % 10
        chunk = r.take(r.u8())
        fds = list(range(_FD_BASE + len(fed), _FD_BASE + len(fed) + nfds))
        fed.extend(fds)
        assert decoder.bytes_needed() >= 0
        decoder.feed(chunk, fds)
        alive = _drain(decoder, got, messages)
    if not alive:
        try:
            decoder.feed(b"\0", [_FD_BASE - 1])
        except LocalProtocolError:
            pass
        else:
            raise AssertionError("feed accepted input after a fatal error")
    got.extend(decoder.drain_fds())
    assert Counter(got) == Counter(fed), f"fds lost or duplicated: fed {fed}, got back {got}"
    for msg in messages:
        _check_roundtrip(msg, backend_side)


def frame(backend_side: bool, pieces: list[tuple[bytes, int]]) -> bytes:
    """The input that feeds `pieces` [(bytes, nfds)] in order (chunks of <= 255 bytes)."""
    out = bytearray([0 if backend_side else 1])
    for data, nfds in pieces:
        first = True
        for i in range(0, max(len(data), 1), 255):
            chunk = data[i:i + 255]
            out += bytes([nfds if first else 0, len(chunk)]) + chunk
            first = False
    return bytes(out)


def seeds() -> list[bytes]:
    """A QEMU-like opening, a memory table, vring set-up, and a few replies."""
    region = MemoryRegion(0, 1 << 20, 0x7F00_0000_0000, 0)
    requests = [
        Message.make(R.GET_FEATURES),
        Message.make(R.SET_PROTOCOL_FEATURES, U64(0x8A3)),
        Message.make(R.SET_OWNER),
        Message.make(R.SET_MEM_TABLE, MemoryTable((region, MemoryRegion(1 << 20, 4096, 1 << 40, 4096))),
                     fds=(7, 8)),
        Message.make(R.ADD_MEM_REG, SingleMemoryRegion(region), fds=(9,), need_reply=True),
        Message.make(R.SET_VRING_NUM, VringState(0, 256)),
        Message.make(R.SET_VRING_ADDR, VringAddress(0, 0, 0x1000, 0x3000, 0x2000, 0)),
        Message.make(R.SET_VRING_KICK, VringFdRequest.for_queue(1), fds=(10,)),
        Message.make(R.GET_CONFIG, ConfigSpace(0, 60, 0, bytes(60))),
    ]
    encoded = [encode(m) for m in requests]
    out = [frame(True, [(data, len(fds))]) for data, fds in encoded]
    out.append(frame(True, [(data, len(fds)) for data, fds in encoded]))
    replies = [Message.make(R.GET_FEATURES).reply(U64(1 << 32)),
               Message.make(R.GET_VRING_BASE, VringState(0, 0)).reply(VringState(0, 17))]
    out.append(frame(False, [(encode(m)[0], 0) for m in replies]))
    out.append(frame(True, [(b"\x05\0\0\0\x01\0\0\0\x08\x10\0\0", 9)]))  # too many fds, huge size
    return out
