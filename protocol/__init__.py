"""vhost-user wire protocol: a sans-IO codec.

Bytes and fd numbers in, typed `Message` objects out, and back; no sockets,
no event loop. Used by the back-end server and by the built-in front-end.

    decoder = MessageDecoder.for_backend()
    decoder.feed(chunk, fds)          # as recvmsg returned them
    msg = decoder.next_message()      # Message or None; RemoteProtocolError
    data, fds = encode(msg.reply(U64(features)))
"""

from .codec import (
    Message, MessageDecoder, ReplyKind, encode, encode_failure_reply, is_ack_reply, reply_expected, reply_kind,
)
from .constants import (
    HEADER_SIZE,
    LARGEST_PAYLOAD_SIZE,
    MAX_CONFIG_SIZE,
    MAX_FDS_PER_MESSAGE,
    MAX_MEM_REGIONS,
    MAX_PAYLOAD_SIZE,
    MAX_SHMEM_REGIONS,
    UUID_SIZE,
    VHOST_F_LOG_ALL,
    VHOST_LOG_PAGE,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_USER_VERSION,
    VHOST_VRING_F_LOG,
    VRING_IDX_MASK,
    VRING_NOFD_MASK,
    BackendRequest,
    ConfigFlag,
    FrontendRequest,
    HeaderFlag,
    IotlbPermission,
    IotlbType,
    MigrationPhase,
    ProtocolFeature,
    TransferDirection,
    VirtioFeature,
    mask,
)
from .errors import (
    BadFdCount,
    BadVersion,
    LocalProtocolError,
    MalformedPayload,
    PayloadTooLarge,
    ProtocolError,
    RemoteProtocolError,
    UnexpectedReply,
    UnknownRequest,
    VhostUserError,
)
from .messages import (
    U64,
    ConfigSpace,
    DeviceStateTransfer,
    Empty,
    InflightDescription,
    IotlbMessage,
    LogDescription,
    MemoryRegion,
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
from .table import (
    DEVICE_STATE_REPLY_FD,
    FD_UNLESS_NOFD,
    FDS_PER_REGION,
    NO_FDS,
    ONE_FD,
    OPTIONAL_FD,
    FdCount,
    FdRule,
    Request,
    RequestSpec,
    all_specs,
    spec_for,
)

__all__ = [
    # codec
    "Message", "MessageDecoder", "encode", "encode_failure_reply", "is_ack_reply", "reply_expected", "reply_kind", "ReplyKind",
    # table
    "Request", "RequestSpec", "spec_for", "all_specs",
    "FdRule", "FdCount", "NO_FDS", "ONE_FD", "OPTIONAL_FD", "FDS_PER_REGION", "FD_UNLESS_NOFD",
    "DEVICE_STATE_REPLY_FD",
    # payloads
    "Payload", "Empty", "U64", "VringFdRequest", "VringState", "VringAddress",
    "MemoryRegion", "MemoryTable", "SingleMemoryRegion", "LogDescription", "ConfigSpace",
    "InflightDescription", "IotlbMessage", "VringArea", "DeviceStateTransfer",
    "SharedObject", "ShmemConfig", "ShmemMap", "RawPayload",
    # constants
    "FrontendRequest", "BackendRequest", "ProtocolFeature", "VirtioFeature", "HeaderFlag",
    "IotlbType", "IotlbPermission", "ConfigFlag", "TransferDirection", "MigrationPhase", "mask",
    "VHOST_USER_VERSION", "VHOST_USER_F_PROTOCOL_FEATURES", "VHOST_F_LOG_ALL",
    "VHOST_VRING_F_LOG", "VHOST_LOG_PAGE", "VRING_IDX_MASK", "VRING_NOFD_MASK",
    "MAX_MEM_REGIONS", "MAX_CONFIG_SIZE", "MAX_SHMEM_REGIONS", "MAX_FDS_PER_MESSAGE",
    "UUID_SIZE", "HEADER_SIZE", "LARGEST_PAYLOAD_SIZE", "MAX_PAYLOAD_SIZE",
    # errors
    "VhostUserError", "ProtocolError", "LocalProtocolError", "RemoteProtocolError",
    "BadVersion", "PayloadTooLarge", "UnknownRequest", "UnexpectedReply",
    "MalformedPayload", "BadFdCount",
]
