"""Writing a capture ring to a pcap file, from a thread of its own.

The C engines (net's switch, vsock's data path) append ready-made pcap
records to a bounded ring (csrc/capture.c) and never wait for a reader.
`RingDrainer` is that reader, shared by every capture: it writes whole
records as they come, flushes so that `tshark -r` or Wireshark sees them
at once, logs when the ring had to drop frames, and gives up on a reader
that stopped reading rather than hold up the back-end's exit.
"""

from __future__ import annotations

import logging
import struct
import threading
from typing import BinaryIO, Callable

__all__ = ["RingDrainer", "pcap_header"]

log = logging.getLogger(__name__)

_PCAP_HEADER = struct.Struct("=IHHiIII")  # magic, version 2.4, zone, sigfigs, snaplen, linktype


def pcap_header(snaplen: int, linktype: int) -> bytes:
    """The 24-byte classic pcap file header (host byte order, microsecond stamps)."""
    return _PCAP_HEADER.pack(0xA1B2C3D4, 2, 4, 0, 0, snaplen, linktype)


class RingDrainer:
    """Drains `read()` -> (whole records, total frames dropped) into `out`.

    `count()`, when given, reads the ring's drop count without taking records:
    `dropped` then stays current while this thread is blocked in a write.
    """

    def __init__(self, read: Callable[[], tuple[bytes | memoryview, int]], out: BinaryIO, *,
                 interval: float = 0.005, count: Callable[[], int] | None = None) -> None:
        self._read, self.out, self.interval, self._count = read, out, interval, count
        self._seen = 0     # frames the ring dropped, as last seen by the drainer
        self.written = 0   # record bytes written to `out`
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pcap", daemon=True)

    @property
    def started(self) -> bool:
        return self._thread.ident is not None

    @property
    def dropped(self) -> int:
        """Frames the ring had no room for so far."""
        return max(self._seen, self._count()) if self._count is not None else self._seen

    def start(self) -> None:
        self._thread.start()

    def _drain(self) -> bool:
        data, dropped = self._read()
        # the count first: a write into a pipe nobody reads blocks, and the drops
        # must still show (SIGUSR1 line, log)
        if dropped != self._seen:
            log.warning("capture: %d frame(s) dropped so far (the writer fell behind)", dropped)
            self._seen = dropped
        if data:
            self.out.write(data)
            self.out.flush()
            self.written += len(data)
        return bool(data)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if not self._drain():
                    self._stop.wait(self.interval)
            while self._drain():
                pass
        except (BrokenPipeError, OSError) as exc:
            log.error("capture stopped: %s", exc.strerror or exc)

    def stop(self, timeout: float = 2.0) -> bool:
        """Write what is left; False if the reader stopped reading (given up after `timeout`)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("capture: the reader of the capture stopped reading; exiting without "
                            "the rest (%d frame(s) dropped)", self.dropped)
                return False
        return True
