"""One error hierarchy for the whole project, split by who is at fault.

Protocol errors live in `vhost_user.protocol.errors` (the codec must stay
importable on its own) and are re-exported here so callers catch everything
under `VhostUserError`.
"""

from vhost_user.protocol.errors import (
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    VhostUserError,
)

__all__ = [
    "VhostUserError",
    "ProtocolError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "GuestMemoryError",
    "VirtqueueError",
    "DescriptorLoop",
    "DescriptorIndexOutOfRange",
    "NestedIndirect",
    "BadIndirectLength",
    "AddressOutOfRange",
    "AvailIndexJump",
    "DescriptorOrder",
    "ChainTooLong",
    "BadBufferId",
    "UnsupportedRequest",
    "DeviceError",
]


class GuestMemoryError(VhostUserError):
    """A guest address or length does not fall inside the mapped regions."""


class VirtqueueError(VhostUserError):
    """The driver broke the virtqueue rules; the queue is marked broken."""


class DescriptorLoop(VirtqueueError):
    """A descriptor chain revisits a descriptor or exceeds the hop budget."""


class DescriptorIndexOutOfRange(VirtqueueError):
    """A head or `next` index is not below the queue size."""


class NestedIndirect(VirtqueueError):
    """An indirect table contains another indirect descriptor."""


class BadIndirectLength(VirtqueueError):
    """An indirect table length is zero or not a multiple of 16."""


class AddressOutOfRange(VirtqueueError, GuestMemoryError):
    """A descriptor or ring address lies outside guest memory or overflows."""


class AvailIndexJump(VirtqueueError):
    """avail->idx moved more than the queue size past last_avail_idx."""


class DescriptorOrder(VirtqueueError):
    """A device-readable descriptor follows a device-writable one."""


class ChainTooLong(VirtqueueError):
    """A chain has more segments than the device can take."""


class BadBufferId(VirtqueueError):
    """A packed ring's buffer id is not below the queue size, or is already in flight."""


class UnsupportedRequest(VhostUserError):
    """A request the back-end does not implement or did not negotiate."""


class DeviceError(VhostUserError):
    """A device could not be set up (bad image, bad option)."""
