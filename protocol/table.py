"""The one table of requests: payload, fds, reply and feature gate per request.

Both directions live here: `FrontendRequest` (front-end -> back-end on the main
socket) and `BackendRequest` (back-end -> front-end on the SET_BACKEND_REQ_FD
channel). The encoder, the decoder and the session all read this table, so a
request's rules are written exactly once.

Reply rules, as the spec has them:
- `reply` is the body the receiver always sends (GET_FEATURES -> U64 ...).
- `conditional_reply` is a body sent only in some mode: SET_LOG_BASE with
  LOG_SHMFD, SET_MEM_TABLE / ADD_MEM_REG while postcopy is listening. Outside
  that mode these requests get only a REPLY_ACK, if NEED_REPLY asked for one.
- Every other request is answered only with a REPLY_ACK (U64: 0 = success)
  when the sender set NEED_REPLY and REPLY_ACK was negotiated.

`feature` is the protocol feature the request needs. The codec does not
enforce it (it has no session state; crosvm also sends GET_CONFIG without
CONFIG); the session does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from .constants import VRING_NOFD_MASK, BackendRequest, FrontendRequest, ProtocolFeature
from .errors import LocalProtocolError
from .messages import (
    U64,
    ConfigSpace,
    DeviceStateTransfer,
    Empty,
    InflightDescription,
    IotlbMessage,
    LogDescription,
    MemoryTable,
    Payload,
    RawPayload,
    SharedObject,
    ShmemConfig,
    ShmemMap,
    SingleMemoryRegion,
    VringAddress,
    VringArea,
    VringFdRequest,
    VringState,
)

__all__ = [
    "Request",
    "FdRule",
    "FdCount",
    "FdsPerRegion",
    "FdUnlessNoFdBit",
    "NO_FDS",
    "ONE_FD",
    "OPTIONAL_FD",
    "FDS_PER_REGION",
    "FD_UNLESS_NOFD",
    "DeviceStateReplyFd",
    "DEVICE_STATE_REPLY_FD",
    "InflightReplyFd",
    "INFLIGHT_REPLY_FD",
    "RequestSpec",
    "spec_for",
    "all_specs",
]

Request = Union[FrontendRequest, BackendRequest]


class FdRule:
    """How many fds a message may carry, possibly depending on its payload."""

    def bounds(self, payload: Payload) -> tuple[int, int]:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class FdCount(FdRule):
    """A fixed inclusive range of fd counts."""

    minimum: int
    maximum: int

    def bounds(self, payload: Payload) -> tuple[int, int]:
        return self.minimum, self.maximum

    def describe(self) -> str:
        if self.minimum == self.maximum:
            return f"{self.minimum} fd(s)"
        return f"{self.minimum}..{self.maximum} fds"


@dataclass(frozen=True)
class FdsPerRegion(FdRule):
    """SET_MEM_TABLE: one fd per region, in region order."""

    def bounds(self, payload: Payload) -> tuple[int, int]:
        count = len(payload.regions) if isinstance(payload, MemoryTable) else 0
        return count, count

    def describe(self) -> str:
        return "one fd per region"


@dataclass(frozen=True)
class FdUnlessNoFdBit(FdRule):
    """One fd unless the payload's bit 8 (VRING_NOFD_MASK) says there is none.

    Applies to SET_VRING_KICK/CALL/ERR and BACKEND_VRING_HOST_NOTIFIER_MSG.
    """

    def bounds(self, payload: Payload) -> tuple[int, int]:
        return (0, 0) if _no_fd_bit(payload) else (1, 1)

    def describe(self) -> str:
        return "1 fd unless the no-fd bit is set"


@dataclass(frozen=True)
class DeviceStateReplyFd(FdRule):
    """SET_DEVICE_STATE_FD reply: bits 0-7 are an error code, bit 8 says no fd.

    The back-end returns its own transfer fd only on success with bit 8
    clear; an error reply carries no fd whatever bit 8 says (QEMU reads it so).
    """

    def bounds(self, payload: Payload) -> tuple[int, int]:
        if not isinstance(payload, U64) or payload.value & (0xFF | VRING_NOFD_MASK):
            return 0, 0
        return 1, 1

    def describe(self) -> str:
        return "1 fd on success unless the no-fd bit is set"


@dataclass(frozen=True)
class InflightReplyFd(FdRule):
    """GET_INFLIGHT_FD reply: the region's fd, except a zero-size reply (the refusal) has none.

    QEMU returns before reading an fd when mmap_size is 0 (vhost_user_get_inflight_fd).
    """

    def bounds(self, payload: Payload) -> tuple[int, int]:
        if isinstance(payload, InflightDescription) and payload.mmap_size == 0:
            return 0, 0
        return 1, 1

    def describe(self) -> str:
        return "1 fd unless mmap_size is 0"


def _no_fd_bit(payload: Payload) -> bool:
    if isinstance(payload, VringArea):
        return payload.no_fd
    if isinstance(payload, U64):
        return bool(payload.value & VRING_NOFD_MASK)
    return True  # a payload without the bit (e.g. an error-shaped reply) carries no fd


NO_FDS = FdCount(0, 0)
ONE_FD = FdCount(1, 1)
OPTIONAL_FD = FdCount(0, 1)
FDS_PER_REGION = FdsPerRegion()
FD_UNLESS_NOFD = FdUnlessNoFdBit()
DEVICE_STATE_REPLY_FD = DeviceStateReplyFd()
INFLIGHT_REPLY_FD = InflightReplyFd()


@dataclass(frozen=True)
class RequestSpec:
    """Everything the protocol says about one request.

    `accepted_payloads` is what the decoder accepts for the request: `payload`
    plus tolerated peer quirks (see `note`). `reply_candidates` is the order in
    which a reply is typed: the `reply` body, then the REPLY_ACK U64 (so an
    8-byte answer to SET_MEM_TABLE is an ack, not an empty postcopy table),
    then the conditional body and tolerated extras. `accepted_replies` is the
    same without the REPLY_ACK.
    """

    request: Request
    payload: type[Payload] = Empty
    fds: FdRule = NO_FDS
    reply: type[Payload] | None = None
    reply_fds: FdRule = NO_FDS
    feature: ProtocolFeature | None = None
    conditional_reply: type[Payload] | None = None
    extra_payloads: tuple[type[Payload], ...] = ()
    extra_replies: tuple[type[Payload], ...] = ()
    note: str = ""
    accepted_payloads: tuple[type[Payload], ...] = field(init=False)
    accepted_replies: tuple[type[Payload], ...] = field(init=False)
    reply_candidates: tuple[type[Payload], ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "accepted_payloads", (self.payload,) + self.extra_payloads)
        bodies = tuple(t for t in (self.reply, self.conditional_reply) if t is not None)
        object.__setattr__(self, "accepted_replies", bodies + self.extra_replies)
        order = (self.reply, U64, self.conditional_reply) + self.extra_replies
        unique = tuple(dict.fromkeys(t for t in order if t is not None))
        object.__setattr__(self, "reply_candidates", unique)

    @property
    def variable_size(self) -> bool:
        """True when the request payload's size is not fixed (memory table, config, raw)."""
        return self.payload.SIZE is None

    @property
    def has_reply(self) -> bool:
        """True when the receiver always answers with a body of its own."""
        return self.reply is not None


def _specs() -> list[RequestSpec]:
    F, B, P = FrontendRequest, BackendRequest, ProtocolFeature
    S = RequestSpec
    return [
        # -- front-end -> back-end ------------------------------------------------
        S(F.GET_FEATURES, reply=U64),
        S(F.SET_FEATURES, U64),
        S(F.SET_OWNER),
        S(F.RESET_OWNER, note="deprecated; ignore or disable all rings"),
        S(F.SET_MEM_TABLE, MemoryTable, FDS_PER_REGION, conditional_reply=MemoryTable,
          note="reply only while postcopy listens; an empty table is the front-end's postcopy ack"),
        S(F.SET_LOG_BASE, LogDescription, OPTIONAL_FD, conditional_reply=U64,
          note="QEMU sends the 16-byte log description; fd and U64 reply with LOG_SHMFD"),
        S(F.SET_LOG_FD, fds=ONE_FD),
        S(F.SET_VRING_NUM, VringState),
        S(F.SET_VRING_ADDR, VringAddress),
        S(F.SET_VRING_BASE, VringState),
        S(F.GET_VRING_BASE, VringState, reply=VringState),
        S(F.SET_VRING_KICK, VringFdRequest, FD_UNLESS_NOFD),
        S(F.SET_VRING_CALL, VringFdRequest, FD_UNLESS_NOFD),
        S(F.SET_VRING_ERR, VringFdRequest, FD_UNLESS_NOFD),
        S(F.GET_PROTOCOL_FEATURES, reply=U64, note="needs virtio bit 30, valid before SET_FEATURES"),
        S(F.SET_PROTOCOL_FEATURES, U64),
        S(F.GET_QUEUE_NUM, reply=U64, feature=P.MQ),
        S(F.SET_VRING_ENABLE, VringState, note="needs virtio bit 30 negotiated"),
        S(F.SEND_RARP, U64, feature=P.RARP, note="first 6 bytes are the guest MAC"),
        S(F.NET_SET_MTU, U64, feature=P.MTU),
        S(F.SET_BACKEND_REQ_FD, fds=ONE_FD, feature=P.BACKEND_REQ),
        S(F.IOTLB_MSG, IotlbMessage, reply=U64, note="gated by VIRTIO_F_ACCESS_PLATFORM"),
        S(F.SET_VRING_ENDIAN, VringState, feature=P.CROSS_ENDIAN),
        S(F.GET_CONFIG, ConfigSpace, reply=ConfigSpace, feature=P.CONFIG,
          extra_replies=(Empty,), note="a zero-size reply means failure"),
        S(F.SET_CONFIG, ConfigSpace, feature=P.CONFIG),
        S(F.CREATE_CRYPTO_SESSION, RawPayload, reply=RawPayload, feature=P.CRYPTO_SESSION,
          note="nested C structs the codec does not interpret"),
        S(F.CLOSE_CRYPTO_SESSION, U64, feature=P.CRYPTO_SESSION),
        S(F.POSTCOPY_ADVISE, reply=Empty, reply_fds=ONE_FD, feature=P.PAGEFAULT,
          note="the reply carries the userfaultfd"),
        S(F.POSTCOPY_LISTEN, feature=P.PAGEFAULT),
        S(F.POSTCOPY_END, reply=U64, feature=P.PAGEFAULT),
        S(F.GET_INFLIGHT_FD, InflightDescription, reply=InflightDescription, reply_fds=INFLIGHT_REPLY_FD,
          feature=P.INFLIGHT_SHMFD),
        S(F.SET_INFLIGHT_FD, InflightDescription, ONE_FD, feature=P.INFLIGHT_SHMFD),
        S(F.GPU_SET_SOCKET, fds=ONE_FD),
        S(F.RESET_DEVICE, feature=P.RESET_DEVICE),
        S(F.VRING_KICK, VringState, feature=P.INBAND_NOTIFICATIONS),
        S(F.GET_MAX_MEM_SLOTS, reply=U64, feature=P.CONFIGURE_MEM_SLOTS),
        S(F.ADD_MEM_REG, SingleMemoryRegion, ONE_FD, conditional_reply=SingleMemoryRegion,
          feature=P.CONFIGURE_MEM_SLOTS, note="reply only while postcopy listens"),
        S(F.REM_MEM_REG, SingleMemoryRegion, OPTIONAL_FD, feature=P.CONFIGURE_MEM_SLOTS,
          note="an fd SHOULD NOT be sent; if one is, close it unused"),
        S(F.SET_STATUS, U64, feature=P.STATUS),
        S(F.GET_STATUS, reply=U64, feature=P.STATUS),
        S(F.GET_SHARED_OBJECT, SharedObject, reply=U64, reply_fds=OPTIONAL_FD,
          feature=P.SHARED_OBJECT, extra_payloads=(Empty,), extra_replies=(Empty,),
          note="QEMU sends this request with size 0 (it never sets hdr.size), so Empty is accepted"),
        S(F.SET_DEVICE_STATE_FD, DeviceStateTransfer, ONE_FD, reply=U64,
          reply_fds=DEVICE_STATE_REPLY_FD, feature=P.DEVICE_STATE,
          note="reply bits 0-7 error, bit 8 no fd returned"),
        S(F.CHECK_DEVICE_STATE, reply=U64, feature=P.DEVICE_STATE),
        S(F.GET_SHMEM_CONFIG, reply=ShmemConfig, feature=P.SHMEM),
        # -- back-end -> front-end ------------------------------------------------
        S(B.BACKEND_IOTLB_MSG, IotlbMessage, note="gated by VIRTIO_F_ACCESS_PLATFORM"),
        S(B.BACKEND_CONFIG_CHANGE_MSG, feature=P.CONFIG),
        S(B.BACKEND_VRING_HOST_NOTIFIER_MSG, VringArea, FD_UNLESS_NOFD, feature=P.HOST_NOTIFIER,
          note="sending the fd also needs BACKEND_SEND_FD"),
        S(B.BACKEND_VRING_CALL, VringState, feature=P.INBAND_NOTIFICATIONS),
        S(B.BACKEND_VRING_ERR, VringState, feature=P.INBAND_NOTIFICATIONS),
        S(B.BACKEND_SHARED_OBJECT_ADD, SharedObject, feature=P.SHARED_OBJECT),
        S(B.BACKEND_SHARED_OBJECT_REMOVE, SharedObject, feature=P.SHARED_OBJECT),
        S(B.BACKEND_SHARED_OBJECT_LOOKUP, SharedObject, reply=U64, reply_fds=OPTIONAL_FD,
          feature=P.SHARED_OBJECT, note="reply: 0 and the dma-buf fd, or non-zero and no fd"),
        S(B.BACKEND_SHMEM_MAP, ShmemMap, ONE_FD, feature=P.SHMEM,
          note="sending the fd also needs BACKEND_SEND_FD"),
        S(B.BACKEND_SHMEM_UNMAP, ShmemMap, feature=P.SHMEM),
    ]


_TABLE: dict[tuple[type, int], RequestSpec] = {
    (type(spec.request), int(spec.request)): spec for spec in _specs()
}


def spec_for(request: Request) -> RequestSpec:
    """The table row for a FrontendRequest or BackendRequest member.

    Keyed by (enum type, number): FrontendRequest(1) and BackendRequest(1)
    are equal as ints but are different requests.
    """
    try:
        return _TABLE[(type(request), int(request))]
    except (KeyError, TypeError):
        raise LocalProtocolError(
            f"{request!r} is not a FrontendRequest or BackendRequest in the table"
        ) from None


def all_specs() -> tuple[RequestSpec, ...]:
    """Every row, front-end requests first."""
    return tuple(_TABLE.values())

