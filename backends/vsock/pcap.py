"""Packet capture in the Linux vsockmon format (pcap link type 271).

Each record is the 32-byte af_vsockmon header (source and destination
CID/port, a coarse op, the transport = virtio, the transport header length),
then the 44-byte virtio vsock header and the payload, exactly what Linux's
vsockmon device hands to tcpdump, so Wireshark and tshark dissect it with
their vsock dissector. The file is classic pcap (microsecond stamps),
written with no third-party module, so `--pcap` works on a plain install.

Theory of operation
-------------------
Capturing must not move the data path back to Python. The C engine
(backends/vsock/vsock.c) appends every RW packet it moves, both directions, to a
bounded ring of ready-made pcap records in C (csrc/capture.c, the ring
net's switch uses too); the packets Python handles (control packets,
SEQPACKET, sibling VMs, leftovers) go into the same ring through `write`,
so the one file keeps their order. A writer thread drains the ring into
the file. Nobody waits for the writer: when it falls behind (a slow disk, a
pipe nobody reads) the ring fills and further frames are dropped from the
capture only, counted in `frames_dropped` (SIGUSR1 line, `capture` entry);
records are whole, so the file stays valid pcap. One ring serves every VM
of the process.
"""

from __future__ import annotations

import struct
import sys

from vhost_user.pcap import RingDrainer, pcap_header
from .fastpath import CaptureRing

from .packet import HEADER_SIZE, Header, Op

__all__ = ["Capture", "LINKTYPE_VSOCK", "vsockmon_record", "MonOp", "DEFAULT_SNAPLEN",
           "DEFAULT_RING"]

LINKTYPE_VSOCK = 271
_MON = struct.Struct("<QQIIHHH2x")
MON_HEADER_SIZE = _MON.size  # 32
_TRANSPORT_VIRTIO = 2
#: the largest frame: both headers and a 64 KiB payload (nothing is cut by default)
DEFAULT_SNAPLEN = 65536 + HEADER_SIZE + MON_HEADER_SIZE
DEFAULT_RING = 16 << 20


class MonOp:
    """enum af_vsockmon_op."""

    UNKNOWN = 0
    CONNECT = 1
    DISCONNECT = 2
    CONTROL = 3
    PAYLOAD = 4


_OP_MAP = {
    Op.REQUEST: MonOp.CONNECT, Op.RESPONSE: MonOp.CONNECT,
    Op.RST: MonOp.DISCONNECT, Op.SHUTDOWN: MonOp.DISCONNECT,
    Op.RW: MonOp.PAYLOAD,
    Op.CREDIT_UPDATE: MonOp.CONTROL, Op.CREDIT_REQUEST: MonOp.CONTROL,
}


def vsockmon_record(hdr: Header, payload: bytes = b"") -> bytes:
    """One link-layer frame: af_vsockmon_hdr + virtio_vsock_hdr + payload."""
    mon = _MON.pack(hdr.src_cid, hdr.dst_cid, hdr.src_port, hdr.dst_port,
                    _OP_MAP.get(hdr.op, MonOp.UNKNOWN), _TRANSPORT_VIRTIO, HEADER_SIZE)
    return mon + hdr.pack() + bytes(payload)


class Capture:
    """The capture ring of a process and the thread that writes it to a pcap file
    (or stdout for "-")."""

    def __init__(self, path: str, *, ring_size: int = DEFAULT_RING, snaplen: int = DEFAULT_SNAPLEN,
                 interval: float = 0.005):
        """Open `path` (OSError names it) and write the pcap file header; `start` begins
        draining. ValueError for a ring or snap length C refuses."""
        self.ring = CaptureRing(ring_size, snaplen)
        self._file = sys.stdout.buffer if path == "-" else open(path, "wb")
        self._own = path != "-"
        self._drainer = RingDrainer(lambda: (self.ring.read(), self.ring.stats()["frames_dropped"]),
                                    self._file, interval=interval)
        self._file.write(pcap_header(snaplen, LINKTYPE_VSOCK))
        self._file.flush()

    @property
    def written(self) -> int:
        """Record bytes written to the file."""
        return self._drainer.written

    def start(self) -> None:
        self._drainer.start()

    def write(self, hdr: Header, payload: bytes = b"") -> None:
        """One packet the Python path handled, into the ring (in order with C's)."""
        self.ring.append(vsockmon_record(hdr, payload))

    def stats(self) -> dict[str, int]:
        """For the SIGUSR1 line: frames captured, frames dropped (ring full)."""
        st = self.ring.stats()
        return {"frames": st["frames"], "frames_dropped": st["frames_dropped"]}

    def close(self, timeout: float = 2.0) -> None:
        """Write what is left and close; a reader that stopped reading does not hold up
        the exit (the writer thread is given `timeout` seconds)."""
        if not self._drainer.started:
            self._drainer.start()  # never started: what was appended still goes out
        if not self._drainer.stop(timeout):
            return
        if self._file is not None and self._own:
            self._file.close()
        self._file = None
