"""The pure virtio-net header parser."""

import pytest

from vhost_user.backends.net.header import HEADER_SIZE, NetFeature, NetHeader, header_size


def test_header_round_trips_little_endian():
    h = NetHeader(flags=1, gso_type=4, hdr_len=74, gso_size=1448, csum_start=54, csum_offset=16,
                  num_buffers=3)
    raw = h.pack()
    assert raw == bytes([1, 4, 74, 0, 0xA8, 5, 54, 0, 16, 0, 3, 0])
    assert NetHeader.unpack(raw) == h


def test_legacy_header_has_no_num_buffers():
    h = NetHeader(flags=2, csum_start=34)
    assert len(h.pack(10)) == 10
    assert NetHeader.unpack(h.pack(10), 10) == NetHeader(flags=2, csum_start=34, num_buffers=1)


def test_header_size_depends_on_version_1_or_mrg_rxbuf():
    assert header_size(1 << 32) == HEADER_SIZE == 12
    assert header_size(1 << NetFeature.MRG_RXBUF) == 12
    assert header_size(1 << NetFeature.CSUM) == 10


def test_short_or_out_of_range_header_is_rejected():
    with pytest.raises(ValueError):
        NetHeader.unpack(b"\0" * 11)
    with pytest.raises(ValueError):
        NetHeader(gso_size=1 << 16)
