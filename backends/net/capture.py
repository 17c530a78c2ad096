"""pcap capture of every switched frame (LINKTYPE_ETHERNET).

The C switch appends ready-made pcap records to a bounded ring and never
waits for us; this thread drains the ring into a file or stdout. When the
writer falls behind, the switch drops records and we log the count.
"""

from __future__ import annotations

import logging
import struct
import threading
from typing import BinaryIO

from vhost_user.virtqueue import NetSwitch

__all__ = ["PcapWriter", "pcap_global_header"]

log = logging.getLogger(__name__)
_LINKTYPE_ETHERNET = 1
_SNAPLEN = 262144


def pcap_global_header() -> bytes:
    """The 24-byte pcap file header (host byte order, microsecond stamps)."""
    return struct.pack("=IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, _SNAPLEN, _LINKTYPE_ETHERNET)


class PcapWriter:
    """Drains the switch's capture ring into `out` from its own thread."""

    def __init__(self, switch: NetSwitch, out: BinaryIO, *, interval: float = 0.005) -> None:
        self.switch, self.out, self.interval = switch, out, interval
        self.dropped = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pcap", daemon=True)

    def start(self) -> None:
        self.out.write(pcap_global_header())
        self.out.flush()
        self._thread.start()

    def _drain(self) -> bool:
        data, dropped = self.switch.capture_read()
        if dropped != self.dropped:
            log.warning("capture: %d frame(s) dropped so far (the writer fell behind)", dropped)
            self.dropped = dropped
        if data:
            self.out.write(data)
            self.out.flush()
        return bool(data)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if not self._drain():
                    self._stop.wait(self.interval)
            while self._drain():
                pass
        except (BrokenPipeError, OSError) as exc:
            log.error("capture stopped: %s", exc)

    def stop(self, timeout: float = 2.0) -> None:
        """Write what is left; a reader that stopped reading does not hold up the exit."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("capture: the reader of the capture stopped reading; exiting without "
                            "the rest (%d frame(s) dropped)", self.dropped)
