"""vhost-user-net: virtio-net ports joined by a built-in learning switch."""

from .device import NetDevice, NetOptions, NetSwitchPorts
from .header import HEADER_SIZE, NetFeature, NetHeader, header_size

__all__ = ["NetDevice", "NetOptions", "NetSwitchPorts", "NetHeader", "NetFeature",
           "HEADER_SIZE", "header_size"]
