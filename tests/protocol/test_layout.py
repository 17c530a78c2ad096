"""protocol/layout.py: one declared layout gives struct, size, checks, pack and unpack,
for the vhost-user payloads and for every device's fixed wire header."""
from __future__ import annotations

import struct
from dataclasses import dataclass

import pytest

from vhost_user.backends.blk.request import DiscardSegment, RequestHeader
from vhost_user.backends.gpu.commands import BadCommand, CtrlHeader, GpuConfig, MemEntry
from vhost_user.backends.net.header import NetHeader
from vhost_user.backends.vsock.packet import Header, PacketError
from vhost_user.protocol.errors import LocalProtocolError, MalformedPayload
from vhost_user.protocol.layout import WireStruct
from vhost_user.protocol.messages import VringState

#: (type, size in the spec, a sample) for every fixed device header
DEVICE_LAYOUTS = [
    (RequestHeader, 16, RequestHeader(type=1, sector=7)),          # virtio 1.2 5.2.6
    (DiscardSegment, 16, DiscardSegment(sector=9, num_sectors=8, flags=1)),
    (Header, 44, Header(src_cid=3, dst_cid=2, src_port=1, dst_port=2, len=5, op=5)),  # 5.10.6
    (NetHeader, 12, NetHeader(flags=1, gso_type=4, hdr_len=54, gso_size=1448)),     # 5.1.6
    (CtrlHeader, 24, CtrlHeader(type=0x101, flags=1, fence_id=1 << 40, ctx_id=3, ring_idx=2)),
    (MemEntry, 16, MemEntry(addr=1 << 33, length=4096)),
    (GpuConfig, 16, GpuConfig(num_scanouts=2, num_capsets=1)),
]


@pytest.mark.parametrize("cls,size,sample", DEVICE_LAYOUTS, ids=lambda x: getattr(x, "__name__", ""))
def test_device_header_is_a_declared_layout_of_the_spec_size_that_round_trips(cls, size, sample):
    assert issubclass(cls, WireStruct) and cls.SIZE == size
    assert len(sample.pack()) == size
    assert cls.unpack(sample.pack()) == sample


def test_fields_are_matched_by_name_where_the_dataclass_orders_them_otherwise():
    # virtio_blk_outhdr is type, reserved, sector on the wire; the dataclass puts reserved last
    raw = struct.pack("<IIQ", 4, 0xAA, 1 << 40)
    assert RequestHeader.unpack(raw) == RequestHeader(type=4, sector=1 << 40, reserved=0xAA)
    assert RequestHeader(type=4, sector=1 << 40, reserved=0xAA).pack() == raw


def test_a_value_that_does_not_fit_is_refused_when_built_with_the_owners_error():
    with pytest.raises(ValueError, match=r"RequestHeader.sector=.* does not fit in u64"):
        RequestHeader(type=1, sector=1 << 64)
    with pytest.raises(PacketError, match="src_port"):
        Header(src_port=1 << 32)
    with pytest.raises(LocalProtocolError):
        VringState(index=1 << 32, num=0)
    with pytest.raises(ValueError):
        NetHeader(flags=256)


def test_short_bytes_are_the_peers_error_and_a_prefix_layout_reads_the_front():
    with pytest.raises(PacketError):
        Header.unpack(bytes(43))
    assert Header.unpack(Header(len=9).pack() + b"payload").len == 9
    with pytest.raises(BadCommand):
        CtrlHeader.unpack(bytes(23))
    with pytest.raises(ValueError):
        RequestHeader.unpack(bytes(17))  # exact size unless the layout is a prefix
    with pytest.raises(MalformedPayload):
        VringState.unpack(bytes(7))


def test_vsock_fwd_cnt_is_a_running_count_whose_low_32_bits_go_on_the_wire():
    h = Header(fwd_cnt=(5 << 32) + 7)
    assert h.fwd_cnt == 7 and Header.unpack(h.pack()).fwd_cnt == 7


def test_an_unsupported_code_in_a_layout_is_refused_when_the_class_is_made():
    with pytest.raises(TypeError, match="unsupported struct code"):
        @dataclass(frozen=True)
        class Bad(WireStruct):
            x: float
            _LAYOUT = (("x", "d"),)
