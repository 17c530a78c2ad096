"""Packet capture in the Linux vsockmon format (pcap link type 271).

Each record is the 32-byte af_vsockmon header (source and destination
CID/port, a coarse op, the transport = virtio, the transport header length),
then the 44-byte virtio vsock header and the payload, exactly what Linux's
vsockmon device hands to tcpdump, so Wireshark and tshark dissect it with
their vsock dissector. The file is classic pcap (microsecond stamps),
written here with no third-party module, so `--pcap` works on a plain
install; one lock serialises the writers of all VMs in the process.
"""

from __future__ import annotations

import struct
import sys
import threading
import time

from .packet import HEADER_SIZE, Header, Op

__all__ = ["Capture", "LINKTYPE_VSOCK", "vsockmon_record", "MonOp"]

LINKTYPE_VSOCK = 271
_MON = struct.Struct("<QQIIHHH2x")
MON_HEADER_SIZE = _MON.size  # 32
_TRANSPORT_VIRTIO = 2
_PCAP_HEADER = struct.Struct("=IHHiIII")   # magic, version 2.4, zone, sigfigs, snaplen, linktype
_RECORD_HEADER = struct.Struct("=IIII")    # seconds, microseconds, captured length, original length


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
    """Writes vsockmon frames to a pcap file (or stdout for "-")."""

    def __init__(self, path: str, snaplen: int = 65536 + HEADER_SIZE + MON_HEADER_SIZE):
        """Open `path` (OSError names it) and write the pcap file header."""
        self._file = sys.stdout.buffer if path == "-" else open(path, "wb")
        self._own = path != "-"
        self._snaplen = snaplen
        self._lock = threading.Lock()
        self.packets = 0
        self._file.write(_PCAP_HEADER.pack(0xA1B2C3D4, 2, 4, 0, 0, snaplen, LINKTYPE_VSOCK))
        self._file.flush()

    def write(self, hdr: Header, payload: bytes = b"") -> None:
        """One record; flushed at once, so a reader (tshark -r, Wireshark) sees it now."""
        frame = vsockmon_record(hdr, payload)
        now = time.time()
        kept = frame[:self._snaplen]
        record = _RECORD_HEADER.pack(int(now), int(now % 1 * 1e6), len(kept), len(frame)) + kept
        with self._lock:
            if self._file is None:
                return
            self._file.write(record)
            self._file.flush()
            self.packets += 1

    def close(self) -> None:
        with self._lock:
            if self._file is None:
                return
            self._file.flush()
            if self._own:
                self._file.close()
            self._file = None
