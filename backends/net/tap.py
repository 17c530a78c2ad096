"""A TAP port on the switch (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR).

The kernel device is created when missing and brought up. With a 12-byte
virtio-net header and TUNSETOFFLOAD, checksum and TSO offloads pass between
the guests and the host stack; the C switch segments or checksums for a
guest that did not negotiate them. Frames from the kernel are read by a C
loop in its own thread (vr_net_tap_run), never by Python.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import struct
import threading

from vhost_user.errors import DeviceError
from .engine import NetSwitch

from .header import OFFLOAD_FEATURES

__all__ = ["TapPort", "open_tap"]

log = logging.getLogger(__name__)

_TUNSETIFF = 0x400454CA
_TUNSETOFFLOAD = 0x400454D0
_TUNSETVNETHDRSZ = 0x400454D8
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_IFF_VNET_HDR = 0x4000
_TUN_F_CSUM, _TUN_F_TSO4, _TUN_F_TSO6, _TUN_F_TSO_ECN = 1, 2, 4, 8
_SIOCGIFFLAGS, _SIOCSIFFLAGS = 0x8913, 0x8914
_IFF_UP = 0x1
_VERSION_1 = 1 << 32


def open_tap(name: str) -> int:
    """Open (or create) TAP `name` with a virtio-net header; returns a non-blocking fd."""
    if not name or len(name.encode()) >= 16:
        raise DeviceError(f"--tap {name!r}: a TAP name is 1..15 bytes")
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise DeviceError(f"/dev/net/tun: {exc.strerror}") from None
    try:
        ifr = struct.pack("16sH22x", name.encode(), _IFF_TAP | _IFF_NO_PI | _IFF_VNET_HDR)
        fcntl.ioctl(fd, _TUNSETIFF, ifr)
        fcntl.ioctl(fd, _TUNSETVNETHDRSZ, struct.pack("i", 12))
        fcntl.ioctl(fd, _TUNSETOFFLOAD, _TUN_F_CSUM | _TUN_F_TSO4 | _TUN_F_TSO6 | _TUN_F_TSO_ECN)
        _link_up(name)
    except OSError as exc:
        os.close(fd)
        raise DeviceError(f"TAP {name}: cannot set it up: {exc.strerror}") from None
    return fd


def _link_up(name: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifr = struct.pack("16sH22x", name.encode(), 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(s, _SIOCGIFFLAGS, ifr))[1]
        fcntl.ioctl(s, _SIOCSIFFLAGS, struct.pack("16sH22x", name.encode(), flags | _IFF_UP))


class TapPort:
    """A TAP device joined to the switch, with its reader thread."""

    def __init__(self, switch: NetSwitch, name: str) -> None:
        self.name = name
        self.fd = open_tap(name)
        self.switch = switch
        self.port = switch.add_port(self.fd, OFFLOAD_FEATURES | _VERSION_1)
        self._ctl = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._thread = threading.Thread(target=self._run, name=f"tap-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()
        log.info("TAP %s joined the switch as port %d", self.name, self.port)

    def _run(self) -> None:
        rc = self.switch.run_tap(self.port, self._ctl)
        if rc != 0:
            log.error("TAP %s: reader stopped (error %d)", self.name, rc)

    @property
    def stats(self) -> dict[str, int]:
        return self.switch.stats(self.port)

    def close(self) -> None:
        """Stop the reader; the fd stays open (the switch may still write to it)."""
        os.eventfd_write(self._ctl, 1)
        if self._thread.is_alive():
            self._thread.join()
