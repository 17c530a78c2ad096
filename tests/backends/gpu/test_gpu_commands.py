"""The pure virtio-gpu command codec, the display protocol codec and the EDID builder."""

from __future__ import annotations

import struct

import pytest

from vhost_user.backends.gpu.commands import (
    FLAG_FENCE,
    BadCommand,
    CtrlHeader,
    CtrlType as T,
    CursorPos,
    GetEdid,
    MemEntry,
    Rect,
    ResourceAttachBacking,
    ResourceCreate2d,
    ResourceFlush,
    RespDisplayInfo,
    RespEdid,
    SetScanout,
    TransferToHost2d,
    UpdateCursor,
    parse,
    parse_cursor,
)
from vhost_user.backends.gpu.display_protocol import GpuMessageDecoder, GpuRequest, UpdateMsg, pack_message
from vhost_user.backends.gpu.edid import build_edid, edid_checksum_ok, edid_preferred_mode


def test_commands_have_the_sizes_of_the_virtio_spec_structs():
    # virtio 1.2, 5.7.6.8: struct sizes including the 24-byte virtio_gpu_ctrl_hdr
    assert CtrlHeader.SIZE == 24
    assert ResourceCreate2d.SIZE == 40
    assert SetScanout.SIZE == 48
    assert ResourceFlush.SIZE == 48
    assert TransferToHost2d.SIZE == 56
    assert ResourceAttachBacking.SIZE == 32
    assert UpdateCursor.SIZE == 56
    assert RespDisplayInfo.SIZE == 24 + 16 * 24
    assert RespEdid.SIZE == 24 + 8 + 1024


def test_commands_round_trip_through_parse():
    cmds = [
        ResourceCreate2d(7, 2, 1920, 1080),
        SetScanout(Rect(1, 2, 3, 4), 1, 7),
        ResourceFlush(Rect(5, 6, 7, 8), 7),
        TransferToHost2d(Rect(0, 1, 2, 3), 1 << 40, 9),
        GetEdid(3),
    ]
    for cmd in cmds:
        hdr, parsed = parse(cmd.pack())
        assert parsed == cmd
        assert hdr.type == cmd.hdr.type


def test_attach_backing_entries_round_trip_and_lies_are_caught():
    entries = (MemEntry(0x1000, 4096), MemEntry(0x8000, 100))
    cmd = ResourceAttachBacking(3, entries)
    assert ResourceAttachBacking.unpack_all(cmd.pack_all()).entries == entries
    liar = ResourceAttachBacking(3, entries, nr_entries=5).pack_all()
    with pytest.raises(BadCommand):
        ResourceAttachBacking.unpack_all(liar)
    with pytest.raises(BadCommand):
        ResourceAttachBacking.unpack_all(ResourceAttachBacking(3, (), nr_entries=1 << 20).pack())


def test_short_commands_are_bad_with_the_right_error():
    with pytest.raises(BadCommand) as e:
        parse(b"\x01\x01\x00\x00")
    assert e.value.error == T.RESP_ERR_UNSPEC  # what QEMU's vhost-user-gpu answers
    with pytest.raises(BadCommand) as e:
        parse(ResourceCreate2d(1, 2, 3, 4).pack()[:30])
    assert e.value.error == T.RESP_ERR_UNSPEC
    with pytest.raises(BadCommand):
        parse_cursor(b"\0" * 40)


def test_unknown_command_parses_to_none():
    hdr, cmd = parse(CtrlHeader(0x0207).pack())
    assert cmd is None and hdr.type == 0x0207


def test_fenced_response_echoes_fence_and_context():
    hdr = CtrlHeader(T.CMD_RESOURCE_FLUSH, FLAG_FENCE, fence_id=0xDEADBEEF01, ctx_id=5)
    resp = CtrlHeader.unpack(hdr.response(T.RESP_OK_NODATA).pack())
    assert (resp.type, resp.flags, resp.fence_id, resp.ctx_id) == (T.RESP_OK_NODATA, FLAG_FENCE, 0xDEADBEEF01, 5)
    plain = CtrlHeader(T.CMD_RESOURCE_FLUSH, 0, fence_id=9).response(T.RESP_OK_NODATA)
    assert (plain.flags, plain.fence_id) == (0, 0)


def test_rect_inside_catches_overflowing_rectangles():
    assert Rect(0, 0, 10, 10).inside(10, 10)
    assert not Rect(5, 0, 6, 1).inside(10, 10)
    assert not Rect(0xFFFFFFFF, 0, 2, 1).inside(10, 10)
    assert Rect(2, 2, 4, 4).intersect(Rect(4, 0, 10, 3)) == Rect(4, 2, 2, 1)
    assert Rect(0, 0, 2, 2).intersect(Rect(5, 5, 1, 1)).empty


def test_cursor_commands_parse():
    cmd = UpdateCursor(CursorPos(1, 20, 30), 4, 2, 3)
    assert parse_cursor(cmd.pack()) == cmd


def test_display_decoder_reassembles_messages_fed_byte_by_byte():
    upd = UpdateMsg(0, 1, 2, 3, 1)
    stream = pack_message(GpuRequest.SCANOUT, struct.pack("<III", 0, 3, 1)) + \
        pack_message(GpuRequest.UPDATE, upd.pack() + bytes(range(12)))
    dec = GpuMessageDecoder()
    out = []
    for i in range(len(stream)):
        out += dec.feed(stream[i:i + 1])
    assert [m.request for m in out] == [GpuRequest.SCANOUT, GpuRequest.UPDATE]
    assert UpdateMsg.unpack(out[1].payload) == upd and out[1].payload[20:] == bytes(range(12))


def test_display_decoder_refuses_absurd_sizes():
    with pytest.raises(ValueError):
        GpuMessageDecoder().feed(struct.pack("<III", 8, 0, 0xFFFFFFFF))


@pytest.mark.parametrize("mode", [(1280, 800), (1920, 1080), (640, 480), (3840, 2160)])
def test_edid_is_valid_and_announces_the_mode(mode):
    edid = build_edid(*mode)
    assert len(edid) == 128 and edid_checksum_ok(edid)
    assert edid_preferred_mode(edid) == mode
    assert edid[18:20] == b"\x01\x04"  # EDID 1.4
    assert b"vhost-user" in edid
