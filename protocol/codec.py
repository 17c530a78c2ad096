"""Framing: `Message`, `encode()` and the incremental `MessageDecoder`.

Theory of operation
-------------------
A message is a 12-byte header (u32 request, u32 flags, u32 size, little-endian)
followed by `size` payload bytes; fds travel beside the bytes as SCM_RIGHTS
ancillary data. The decoder is fed chunks exactly as `recvmsg` returns them,
each with the fds that came with it. The kernel delivers ancillary data with
the first byte of the `sendmsg` that carried it, so the fds of a chunk belong
to the message that the chunk's *first byte* belongs to. The decoder records
each chunk's fds against the stream offset of that byte and, when a message
is complete, hands it every fd recorded inside its byte range. A reader that
asks for `bytes_needed()` bytes at a time (header first, then payload) never
reads across a message boundary, which is what the spec recommends.

Errors are split by what they leave behind. A bad version or a size above
MAX_PAYLOAD_SIZE makes the framing untrustworthy: the decoder raises a fatal
error (recoverable=False) carrying every fd it still holds and refuses
further input. Anything else (unknown request, wrong payload size, wrong fd
count, a reply where a request belongs) is raised only after the whole
message has been consumed, carrying that message's fds: the caller closes
them, NACKs if it wants, and keeps reading.

Replies are typed by request number through the table: the reply to request
R gets R's reply type, or the REPLY_ACK U64 when R has no body of its own (or
the body does not fit, as for a failed GET_CONFIG's empty reply). The decoder
keeps no record of outstanding requests; matching a reply to what was asked
is the caller's job.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass
from enum import IntEnum
from typing import Sequence

from .constants import (
    HEADER_SIZE,
    MAX_PAYLOAD_SIZE,
    VHOST_USER_VERSION,
    BackendRequest,
    FrontendRequest,
    HeaderFlag,
)
from .errors import (
    BadFdCount,
    BadVersion,
    LocalProtocolError,
    MalformedPayload,
    PayloadTooLarge,
    RemoteProtocolError,
    UnexpectedReply,
    UnknownRequest,
)
from .messages import U64, Empty, Payload
from .table import NO_FDS, FdRule, Request, RequestSpec, spec_for

__all__ = [
    "Message",
    "encode",
    "encode_failure_reply",
    "MessageDecoder",
    "is_ack_reply",
    "reply_expected",
    "reply_kind",
    "ReplyKind",
]

_HEADER = struct.Struct("<III")
assert _HEADER.size == HEADER_SIZE


def _check_fds(fds: Sequence[int], error: type[Exception]) -> tuple[int, ...]:
    result = tuple(fds)
    for fd in result:
        if isinstance(fd, bool) or not isinstance(fd, int) or fd < 0:
            raise error(f"fds must be non-negative ints, got {fd!r}")
    return result


@dataclass(frozen=True)
class Message:
    """One vhost-user message: request, header flags, payload object and fds.

    Build requests with `Message.make`, answers with `reply` / `ack`.
    """

    request: Request
    flags: int = VHOST_USER_VERSION
    payload: Payload = Empty()
    fds: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.request, (FrontendRequest, BackendRequest)):
            raise LocalProtocolError(f"request must be a FrontendRequest or BackendRequest, not {self.request!r}")
        if isinstance(self.flags, bool) or not isinstance(self.flags, int) or not 0 <= self.flags < 1 << 32:
            raise LocalProtocolError(f"flags must be a u32, not {self.flags!r}")
        if not isinstance(self.payload, Payload):
            raise LocalProtocolError(f"payload must be a Payload, not {type(self.payload).__name__}")
        object.__setattr__(self, "fds", _check_fds(self.fds, LocalProtocolError))

    @classmethod
    def make(
        cls,
        request: Request,
        payload: Payload | None = None,
        *,
        fds: Sequence[int] = (),
        need_reply: bool = False,
    ) -> Message:
        """A request; `need_reply` sets NEED_REPLY (only meaningful with REPLY_ACK)."""
        flags = VHOST_USER_VERSION | (HeaderFlag.NEED_REPLY if need_reply else 0)
        return cls(request, int(flags), Empty() if payload is None else payload, tuple(fds))

    @property
    def version(self) -> int:
        return self.flags & HeaderFlag.VERSION_MASK

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & HeaderFlag.REPLY)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & HeaderFlag.NEED_REPLY)

    @property
    def spec(self) -> RequestSpec:
        return spec_for(self.request)

    def reply(self, payload: Payload, *, fds: Sequence[int] = ()) -> Message:
        """The reply to this request, with the REPLY flag and version 1."""
        if self.is_reply:
            raise LocalProtocolError(f"cannot reply to a reply ({self.request.name})")
        return Message(self.request, int(VHOST_USER_VERSION | HeaderFlag.REPLY), payload, tuple(fds))

    def ack(self, success: bool) -> Message:
        """The REPLY_ACK answer: U64 0 on success, 1 on failure."""
        return self.reply(U64(0 if success else 1))


def is_ack_reply(msg: Message) -> bool:
    """True for a REPLY_ACK: a U64 reply to a request with no U64 body of its own."""
    return msg.is_reply and type(msg.payload) is U64 and U64 not in msg.spec.accepted_replies


class ReplyKind(IntEnum):
    """What the receiver of a request owes the sender."""

    NONE = 0   # nothing
    BODY = 1   # the request's own reply body (on failure: a failure value)
    ACK = 2    # a REPLY_ACK (U64 0 or 1): NEED_REPLY was set and REPLY_ACK negotiated


def reply_kind(request: "Request | int", flags: int, *, reply_ack: bool) -> ReplyKind:
    """The reply rule (vhost-user.rst, "Communication"), the one place it is written.

    A request with a reply body of its own is always answered with it; any
    other request is answered with a REPLY_ACK when it set NEED_REPLY and
    REPLY_ACK was negotiated (`reply_ack`). A reply is never answered. An
    unknown request number (a plain int) has no body, so only the second
    rule applies: the sender must not hang on a request we could not even
    decode. Conditional bodies (postcopy, LOG_SHMFD) are the session's call.
    """
    if flags & HeaderFlag.REPLY:
        return ReplyKind.NONE
    if isinstance(request, (FrontendRequest, BackendRequest)) and spec_for(request).has_reply:
        return ReplyKind.BODY
    if flags & HeaderFlag.NEED_REPLY and reply_ack:
        return ReplyKind.ACK
    return ReplyKind.NONE


def reply_expected(msg: Message, *, reply_ack: bool) -> bool:
    """Whether the receiver of request `msg` must answer it (see `reply_kind`)."""
    return reply_kind(msg.request, msg.flags, reply_ack=reply_ack) is not ReplyKind.NONE


def _reply_fd_rule(spec: RequestSpec, payload: Payload) -> FdRule:
    if type(payload) in spec.accepted_replies:
        return spec.reply_fds
    return NO_FDS  # a REPLY_ACK carries no fds


def _payload_allowed(spec: RequestSpec, msg: Message) -> bool:
    allowed = spec.reply_candidates if msg.is_reply else spec.accepted_payloads
    return isinstance(msg.payload, allowed)


def encode(msg: Message) -> tuple[bytes, tuple[int, ...]]:
    """Header plus payload bytes, and the fds to send with them (SCM_RIGHTS).

    Raises LocalProtocolError if the payload type or the fd count is not what
    the table allows for this request, or the version bits are not 1.
    """
    spec = msg.spec
    if msg.version != VHOST_USER_VERSION:
        raise LocalProtocolError(f"{msg.request.name}: version bits {msg.version}, must be {VHOST_USER_VERSION}")
    if not _payload_allowed(spec, msg):
        kind = "reply" if msg.is_reply else "request"
        raise LocalProtocolError(f"{msg.request.name} {kind} cannot carry {type(msg.payload).__name__}")
    rule = _reply_fd_rule(spec, msg.payload) if msg.is_reply else spec.fds
    low, high = rule.bounds(msg.payload)
    if not low <= len(msg.fds) <= high:
        raise LocalProtocolError(f"{msg.request.name} takes {rule.describe()}, not {len(msg.fds)}")
    body = msg.payload.pack()
    if len(body) > MAX_PAYLOAD_SIZE:
        raise LocalProtocolError(f"{msg.request.name} payload of {len(body)} bytes exceeds {MAX_PAYLOAD_SIZE}")
    return _HEADER.pack(int(msg.request), msg.flags, len(body)) + body, msg.fds


def encode_failure_reply(request: int) -> bytes:
    """A REPLY_ACK failure (u64 1) for any request number, even one we do not know.

    A peer that set NEED_REPLY on a request we could not decode still waits
    for an answer; this lets the receiver refuse it without a typed Message.
    """
    return _HEADER.pack(int(request), VHOST_USER_VERSION | HeaderFlag.REPLY, U64.SIZE) + U64(1).pack()


def _enum_member(enum_cls: type[IntEnum] | None, number: int) -> IntEnum | None:
    if enum_cls is None:
        return None
    try:
        return enum_cls(number)
    except ValueError:
        return None


class MessageDecoder:
    """Incremental decoder: `feed()` bytes and fds, pull `next_message()`.

    `incoming_requests` is the enum of requests the peer sends us (messages
    without the REPLY flag); `replies_to` is the enum of requests we send,
    whose replies come back to us. Either may be None to reject that kind.

    fd ownership: once `feed()` returns, the decoder owns the fds passed to
    it until it hands them out in a `Message`, in a `RemoteProtocolError`'s
    `fds`, or from `drain_fds()` (call it when the connection closes).
    """

    def __init__(
        self,
        incoming_requests: type[IntEnum] | None = FrontendRequest,
        replies_to: type[IntEnum] | None = BackendRequest,
    ):
        self.incoming_requests = incoming_requests
        self.replies_to = replies_to
        self._buffer = bytearray()
        self._base = 0  # stream offset of _buffer[0]
        self._attached: deque[tuple[int, tuple[int, ...]]] = deque()  # (stream offset, fds)
        self._fatal: RemoteProtocolError | None = None

    @classmethod
    def for_backend(cls) -> MessageDecoder:
        """What a back-end reads: front-end requests, and replies to its back-end requests."""
        return cls(incoming_requests=FrontendRequest, replies_to=BackendRequest)

    @classmethod
    def for_frontend(cls) -> MessageDecoder:
        """What a front-end reads: replies to its requests, and back-end requests."""
        return cls(incoming_requests=BackendRequest, replies_to=FrontendRequest)

    # -- input ----------------------------------------------------------------
    def feed(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Append one received chunk; `fds` arrived with its first byte.

        Raises LocalProtocolError (leaving the fds with the caller) after a
        fatal error: the connection must be dropped, not read further.
        """
        if self._fatal is not None:
            raise LocalProtocolError("decoder hit a fatal protocol error; disconnect instead of feeding it")
        fds = _check_fds(fds, LocalProtocolError)
        if fds:
            self._attached.append((self._base + len(self._buffer), fds))
        self._buffer += data

    def bytes_needed(self) -> int:
        """Bytes still missing from the current header, or else its payload.

        0 means a complete message (or an error) is waiting in
        `next_message()`. Reading exactly this many bytes keeps each
        `recvmsg` inside one message.
        """
        if self._fatal is not None:
            return 0
        have = len(self._buffer)
        if have < HEADER_SIZE:
            return HEADER_SIZE - have
        _, _, size = _HEADER.unpack_from(self._buffer)
        if size > MAX_PAYLOAD_SIZE:
            return 0
        return max(0, HEADER_SIZE + size - have)

    def drain_fds(self) -> tuple[int, ...]:
        """Give back every fd still held (for a partial message); call on disconnect."""
        fds = tuple(fd for _, group in self._attached for fd in group)
        self._attached.clear()
        return fds

    # -- output ---------------------------------------------------------------
    def next_message(self) -> Message | None:
        """The next complete message, or None if more bytes are needed.

        Raises RemoteProtocolError (see the module docstring for which are
        fatal); the error's `fds` are the caller's to close.
        """
        if self._fatal is not None:
            raise type(self._fatal)(f"stream already failed: {self._fatal}", recoverable=False)
        if len(self._buffer) < HEADER_SIZE:
            return None
        number, flags, size = _HEADER.unpack_from(self._buffer)
        self._check_framing(number, flags, size)
        end = HEADER_SIZE + size
        if len(self._buffer) < end:
            return None
        raw = bytes(self._buffer[HEADER_SIZE:end])
        fds = self._take_fds(end)
        del self._buffer[:end]
        self._base += end
        return self._decode(number, flags, raw, fds)

    # -- internals ------------------------------------------------------------
    def _enum_for(self, flags: int) -> type[IntEnum] | None:
        return self.replies_to if flags & HeaderFlag.REPLY else self.incoming_requests

    def _check_framing(self, number: int, flags: int, size: int) -> None:
        """Fatal header checks: after these fail no later byte can be trusted."""
        error: RemoteProtocolError | None = None
        version = flags & HeaderFlag.VERSION_MASK
        if version != VHOST_USER_VERSION:
            error = BadVersion(f"header version {version}, expected {VHOST_USER_VERSION}")
        elif size > MAX_PAYLOAD_SIZE:
            error = PayloadTooLarge(f"header announces {size} payload bytes, limit is {MAX_PAYLOAD_SIZE}")
        if error is None:
            return
        member = _enum_member(self._enum_for(flags), number)
        error.fds = self.drain_fds()
        error.request = member if member is not None else number
        error.flags = flags
        error.recoverable = False
        self._fatal = error
        raise error

    def _take_fds(self, end: int) -> tuple[int, ...]:
        limit = self._base + end
        taken: list[int] = []
        while self._attached and self._attached[0][0] < limit:
            taken.extend(self._attached.popleft()[1])
        return tuple(taken)

    def _decode(self, number: int, flags: int, raw: bytes, fds: tuple[int, ...]) -> Message:
        is_reply = bool(flags & HeaderFlag.REPLY)
        kind = "reply" if is_reply else "request"
        enum_cls = self._enum_for(flags)
        if enum_cls is None:
            raise UnexpectedReply(f"a {kind} (number {number}) where none is expected",
                                  fds=fds, request=number, flags=flags)
        request = _enum_member(enum_cls, number)
        if request is None:
            raise UnknownRequest(f"unknown {enum_cls.__name__} {kind} number {number}",
                                 fds=fds, request=number, flags=flags)
        spec = spec_for(request)
        try:
            payload = _unpack(spec.reply_candidates if is_reply else spec.accepted_payloads, raw)
        except MalformedPayload as exc:
            raise MalformedPayload(f"{request.name} {kind}: {exc}", fds=fds, request=request, flags=flags) from None
        rule = _reply_fd_rule(spec, payload) if is_reply else spec.fds
        low, high = rule.bounds(payload)
        if not low <= len(fds) <= high:
            raise BadFdCount(f"{request.name} {kind} takes {rule.describe()}, got {len(fds)}",
                             fds=fds, request=request, flags=flags)
        return Message(request, flags, payload, fds)


def _unpack(candidates: tuple[type[Payload], ...], raw: bytes) -> Payload:
    """Unpack with the first candidate type whose size rules fit `raw`."""
    for payload_type in candidates:
        if payload_type.accepts_size(len(raw)):
            return payload_type.unpack(raw)
    if len(candidates) == 1:
        return candidates[0].unpack(raw)  # raises with the type's own explanation
    names = ", ".join(t.__name__ for t in candidates)
    raise MalformedPayload(f"a payload of {len(raw)} bytes fits none of {names}")
