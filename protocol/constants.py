"""Numbers of the vhost-user wire protocol, named as the specification names them.

Source: QEMU docs/interop/vhost-user.rst. Request numbers 20-22 and 44 and
protocol feature bits 20-22 drifted between implementations; the values here
follow the project's PROTOCOL-NOTES (rust-vmm vhost PR 367, crosvm 8ae81e773)
and live only in this module, so a peer that disagrees is a one-line change.
"""

from __future__ import annotations

import enum

__all__ = [
    "FrontendRequest",
    "BackendRequest",
    "ProtocolFeature",
    "VirtioFeature",
    "HeaderFlag",
    "IotlbType",
    "IotlbPermission",
    "ConfigFlag",
    "TransferDirection",
    "MigrationPhase",
    "mask",
    "VHOST_USER_VERSION",
    "VHOST_USER_F_PROTOCOL_FEATURES",
    "VHOST_F_LOG_ALL",
    "VHOST_VRING_F_LOG",
    "VHOST_LOG_PAGE",
    "VRING_IDX_MASK",
    "VRING_NOFD_MASK",
    "MAX_MEM_REGIONS",
    "MAX_CONFIG_SIZE",
    "MAX_SHMEM_REGIONS",
    "MAX_FDS_PER_MESSAGE",
    "UUID_SIZE",
    "HEADER_SIZE",
    "LARGEST_PAYLOAD_SIZE",
    "MAX_PAYLOAD_SIZE",
]


class FrontendRequest(enum.IntEnum):
    """Requests the front-end sends on the main socket (spec: "Front-end message types")."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43
    GET_SHMEM_CONFIG = 44


class BackendRequest(enum.IntEnum):
    """Requests the back-end sends on the SET_BACKEND_REQ_FD channel."""

    BACKEND_IOTLB_MSG = 1
    BACKEND_CONFIG_CHANGE_MSG = 2
    BACKEND_VRING_HOST_NOTIFIER_MSG = 3
    BACKEND_VRING_CALL = 4
    BACKEND_VRING_ERR = 5
    BACKEND_SHARED_OBJECT_ADD = 6
    BACKEND_SHARED_OBJECT_REMOVE = 7
    BACKEND_SHARED_OBJECT_LOOKUP = 8
    BACKEND_SHMEM_MAP = 9
    BACKEND_SHMEM_UNMAP = 10


class ProtocolFeature(enum.IntEnum):
    """Bit numbers of VHOST_USER_PROTOCOL_F_*; use `mask()` to build a bit set."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16
    XEN_MMAP = 17
    SHARED_OBJECT = 18
    DEVICE_STATE = 19
    GET_VRING_BASE_INFLIGHT = 20
    GPA_ADDRESSES = 21
    SHMEM = 22


class VirtioFeature(enum.IntEnum):
    """Device-independent virtio feature bit numbers the back-ends negotiate."""

    VIRTIO_F_NOTIFY_ON_EMPTY = 24
    VIRTIO_RING_F_INDIRECT_DESC = 28
    VIRTIO_RING_F_EVENT_IDX = 29
    VIRTIO_F_VERSION_1 = 32
    VIRTIO_F_ACCESS_PLATFORM = 33
    VIRTIO_F_RING_PACKED = 34
    VIRTIO_F_IN_ORDER = 35
    VIRTIO_F_NOTIFICATION_DATA = 38
    VIRTIO_F_RING_RESET = 40


class HeaderFlag(enum.IntFlag):
    """Bits of the header's flags word."""

    VERSION_MASK = 0x3
    REPLY = 1 << 2
    NEED_REPLY = 1 << 3


class IotlbType(enum.IntEnum):
    """`type` field of an IOTLB message."""

    MISS = 1
    UPDATE = 2
    INVALIDATE = 3
    ACCESS_FAIL = 4


class IotlbPermission(enum.IntEnum):
    """`permissions flags` field of an IOTLB message."""

    NONE = 0
    READ = 1
    WRITE = 2
    READ_WRITE = 3


class ConfigFlag(enum.IntEnum):
    """`flags` field of the config space payload (SET_CONFIG)."""

    WRITABLE = 0  # front-end writes a guest-writable field
    MIGRATION = 1  # live migration restores the whole space


class TransferDirection(enum.IntEnum):
    """SET_DEVICE_STATE_FD `transfer direction`."""

    SAVE = 0
    LOAD = 1


class MigrationPhase(enum.IntEnum):
    """SET_DEVICE_STATE_FD `migration phase`."""

    STOPPED = 0


def mask(*bits: int) -> int:
    """Bit set with the given bit numbers, e.g. ``mask(ProtocolFeature.MQ, ProtocolFeature.REPLY_ACK)``."""
    value = 0
    for bit in bits:
        if not 0 <= int(bit) < 64:
            raise ValueError(f"feature bit {bit} is outside 0..63")
        value |= 1 << int(bit)
    return value


VHOST_USER_VERSION = 1
VHOST_USER_F_PROTOCOL_FEATURES = 30  # virtio feature bit, not a protocol feature
VHOST_F_LOG_ALL = 26  # virtio feature bit: the front-end wants dirty logging
VHOST_VRING_F_LOG = 1 << 0  # SET_VRING_ADDR flags: log used-ring writes
VHOST_LOG_PAGE = 0x1000

VRING_IDX_MASK = 0xFF  # SET_VRING_KICK/CALL/ERR u64: bits 0-7 are the ring index
VRING_NOFD_MASK = 1 << 8  # ... bit 8 says no fd is attached (poll instead)

MAX_MEM_REGIONS = 8  # SET_MEM_TABLE carries at most 8 regions (and 8 fds)
MAX_CONFIG_SIZE = 256  # VHOST_USER_MAX_CONFIG_SIZE
MAX_SHMEM_REGIONS = 256  # GET_SHMEM_CONFIG reply array length
MAX_FDS_PER_MESSAGE = 8  # "at most 8 descriptors in each message"
UUID_SIZE = 16

HEADER_SIZE = 12  # u32 request | u32 flags | u32 size

# The largest payload the specification defines is the GET_SHMEM_CONFIG reply:
# u32 nregions + u32 padding + 256 x u64 sizes = 2056 bytes. Next come
# CREATE_CRYPTO_SESSION (about 1.1 KiB with an asymmetric key), the config
# space (12 + 256 = 268) and SET_MEM_TABLE (8 + 8 x 32 = 264).
LARGEST_PAYLOAD_SIZE = 8 + 8 * MAX_SHMEM_REGIONS

# The framing bound: a header announcing more than this kills the connection,
# because the stream can no longer be trusted. It is 4 KiB rather than the
# exact 2056 so that any size rust-vmm's vhost crate accepts (its MAX_MSG_SIZE
# is 0x1000) is at least consumed and answered with a NACK instead of
# disconnecting; exact per-request sizes are still enforced (recoverably).
# libvhost-user is stricter on the bound (sizeof its payload union, 268 B) but
# looser per message: it only checks lower bounds (ADD/REM_MEM_REG >= 32 B)
# and ignores trailing bytes. 4 KiB of buffering per connection is nothing.
MAX_PAYLOAD_SIZE = 0x1000
