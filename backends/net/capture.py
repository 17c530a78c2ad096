"""pcap capture of every switched frame (LINKTYPE_ETHERNET).

The C switch appends ready-made pcap records to a bounded ring and never
waits for us; this thread drains the ring into a file or stdout. When the
writer falls behind, the switch drops records and we log the count.
"""

from __future__ import annotations

from typing import BinaryIO

from vhost_user.pcap import RingDrainer, pcap_header
from .engine import NetSwitch

__all__ = ["PcapWriter", "pcap_global_header"]

_LINKTYPE_ETHERNET = 1
_SNAPLEN = 262144


def pcap_global_header() -> bytes:
    """The 24-byte pcap file header (host byte order, microsecond stamps)."""
    return pcap_header(_SNAPLEN, _LINKTYPE_ETHERNET)


class PcapWriter(RingDrainer):
    """Drains the switch's capture ring into `out` from its own thread."""

    def __init__(self, switch: NetSwitch, out: BinaryIO, *, interval: float = 0.005) -> None:
        super().__init__(switch.capture_read, out, interval=interval, count=switch.capture_dropped)
        self.switch = switch

    def start(self) -> None:
        self.out.write(pcap_global_header())
        self.out.flush()
        super().start()
