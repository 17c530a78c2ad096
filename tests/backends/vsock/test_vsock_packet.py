"""The pure layout module: header, config, events, CONNECT line, vsockmon framing."""

from __future__ import annotations

import struct

import pytest

from vhost_user.backends.vsock.host import parse_connect
from vhost_user.backends.vsock.packet import (
    HEADER_SIZE, Header, Op, PacketError, SockType, pack_config, pack_event, unpack_config, unpack_event,
)
from vhost_user.backends.vsock.pcap import MonOp, vsockmon_record


def test_vsock_header_round_trips_at_spec_offsets():
    h = Header(src_cid=3, dst_cid=2, src_port=1024, dst_port=5000, len=7, type=SockType.SEQPACKET,
               op=Op.RW, flags=3, buf_alloc=65536, fwd_cnt=99)
    raw = h.pack()
    assert len(raw) == HEADER_SIZE == 44
    # virtio spec 5.10.6: le64 src_cid, le64 dst_cid, le32 src_port, le32 dst_port, le32 len,
    # le16 type, le16 op, le32 flags, le32 buf_alloc, le32 fwd_cnt
    assert struct.unpack("<QQIIIHHIII", raw) == (3, 2, 1024, 5000, 7, 2, 5, 3, 65536, 99)
    assert Header.unpack(raw + b"payload") == h


def test_vsock_header_reply_swaps_addresses_and_clears_len():
    h = Header(src_cid=3, dst_cid=2, src_port=1, dst_port=2, len=9, op=Op.RW, flags=1)
    r = h.reply(op=Op.RST)
    assert (r.src_cid, r.dst_cid, r.src_port, r.dst_port, r.len, r.flags, r.op) == (2, 3, 2, 1, 0, 0, Op.RST)


def test_vsock_short_or_out_of_range_header_is_rejected():
    with pytest.raises(PacketError):
        Header.unpack(b"\0" * 43)
    with pytest.raises(PacketError):
        Header(src_port=1 << 32).pack()


def test_vsock_config_and_event_layouts():
    assert pack_config(0x1_0000_0003) == struct.pack("<Q", 0x1_0000_0003)
    assert unpack_config(pack_config(42)) == 42
    assert pack_event() == b"\0\0\0\0" and unpack_event(pack_event(0)) == 0


@pytest.mark.parametrize("line,port", [
    (b"CONNECT 5000", 5000), (b"CONNECT 5000\r", 5000), (b"CONNECT 4294967295", 0xFFFFFFFF),
    (b"CONNECT 4294967296", None), (b"CONNECT -1", None), (b"connect 1", None), (b"CONNECT", None),
    (b"CONNECT 1 2", None), (b"", None),
])
def test_vsock_connect_line_parsing(line, port):
    assert parse_connect(line) == port


def test_vsock_vsockmon_record_layout():
    h = Header(src_cid=3, dst_cid=2, src_port=10, dst_port=20, len=3, op=Op.RW)
    rec = vsockmon_record(h, b"abc")
    # include/uapi/linux/vsockmon.h: le64 src_cid, le64 dst_cid, le32 src_port, le32 dst_port,
    # le16 op, le16 transport (2 = virtio), le16 len (transport header), 2 reserved bytes
    assert struct.unpack_from("<QQIIHHH", rec) == (3, 2, 10, 20, MonOp.PAYLOAD, 2, 44)
    assert rec[32:76] == h.pack() and rec[76:] == b"abc"
