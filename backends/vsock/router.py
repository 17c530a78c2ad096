"""Sibling-VM routing: which VMs served by this process may reach each other.

A VM reaches another by CID when their group sets intersect (the
vhost-device-vsock `groups=` rule). Packets are relayed as they are: the
two guests run the credit protocol end to end, the router only forwards.
"""

from __future__ import annotations

import threading

__all__ = ["Router"]


class Router:
    def __init__(self) -> None:
        self._devices: dict[int, object] = {}
        self._lock = threading.Lock()

    def add(self, device) -> None:
        with self._lock:
            if device.guest_cid in self._devices:
                raise ValueError(f"guest CID {device.guest_cid} is used by two VMs")
            self._devices[device.guest_cid] = device

    def remove(self, device) -> None:
        with self._lock:
            if self._devices.get(device.guest_cid) is device:
                del self._devices[device.guest_cid]

    def lookup(self, source, cid: int):
        """The VM with CID `cid` that shares a group with `source`, or None."""
        with self._lock:
            dest = self._devices.get(cid)
        if dest is None or dest is source or not (dest.groups & source.groups):
            return None
        return dest
