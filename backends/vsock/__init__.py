"""virtio-vsock back-end: host Unix sockets, sibling VMs, vsockmon capture."""

from .device import CAPABILITIES, VmOptions, VsockDevice
from .packet import Header, Op, SockType

__all__ = ["VsockDevice", "VmOptions", "CAPABILITIES", "Header", "Op", "SockType"]
