"""Framing: encode -> decode for every request, fd attribution, malformed streams."""

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vhost_user.protocol import (
    HEADER_SIZE,
    MAX_PAYLOAD_SIZE,
    U64,
    BackendRequest,
    BadFdCount,
    BadVersion,
    ConfigSpace,
    DeviceStateTransfer,
    Empty,
    FrontendRequest,
    InflightDescription,
    IotlbMessage,
    LocalProtocolError,
    LogDescription,
    MalformedPayload,
    MemoryRegion,
    MemoryTable,
    Message,
    MessageDecoder,
    PayloadTooLarge,
    RawPayload,
    SharedObject,
    ShmemConfig,
    ShmemMap,
    SingleMemoryRegion,
    UnexpectedReply,
    UnknownRequest,
    VringAddress,
    VringArea,
    VringFdRequest,
    VringState,
    all_specs,
    encode,
    is_ack_reply,
    reply_expected,
)

F, B = FrontendRequest, BackendRequest
REGION = MemoryRegion(0x0, 0x40000000, 0x7F0000000000, 0)

SAMPLES = {
    Empty: Empty(),
    U64: U64(0x1122334455667788),
    VringFdRequest: VringFdRequest.for_queue(3),
    VringState: VringState(1, 256),
    VringAddress: VringAddress(1, 0, 0x1000, 0x2000, 0x3000, 0),
    MemoryTable: MemoryTable((REGION, MemoryRegion(0x100000000, 0x1000, 0x7F8000000000, 0x1000))),
    SingleMemoryRegion: SingleMemoryRegion(REGION),
    LogDescription: LogDescription(0x1000, 0),
    ConfigSpace: ConfigSpace(0, 4, 0, b"\x01\x02\x03\x04"),
    InflightDescription: InflightDescription(0x2000, 0, 2, 128),
    IotlbMessage: IotlbMessage(0x1000, 0x1000, 0x7F0000001000, 3, 2),
    VringArea: VringArea.for_queue(1, 4096, 0),
    DeviceStateTransfer: DeviceStateTransfer(0, 0),
    SharedObject: SharedObject(bytes(range(16))),
    ShmemConfig: ShmemConfig(1, (0x100000,)),
    ShmemMap: ShmemMap(0, 0, 0x1000, 0x2000, 1),
    RawPayload: RawPayload(b"crypto session"),
}

FRONTEND_SPECS = [s for s in all_specs() if isinstance(s.request, FrontendRequest)]
BACKEND_SPECS = [s for s in all_specs() if isinstance(s.request, BackendRequest)]


def _ids(spec):
    return spec.request.name


def decoder_receiving(request):
    """The decoder of the side that receives `request` (and sends its reply)."""
    return MessageDecoder.for_backend() if isinstance(request, FrontendRequest) else MessageDecoder.for_frontend()


def decoder_of_sender(request):
    """The decoder of the side that sent `request` and reads its reply."""
    return MessageDecoder.for_frontend() if isinstance(request, FrontendRequest) else MessageDecoder.for_backend()


def fd_counts(rule, payload):
    low, high = rule.bounds(payload)
    return sorted({low, high})


def decode_all(decoder, data, fds=()):
    decoder.feed(data, fds)
    out = []
    while (msg := decoder.next_message()) is not None:
        out.append(msg)
    return out


def raw_message(number, flags=1, payload=b"", size=None):
    return struct.pack("<III", number, flags, len(payload) if size is None else size) + payload


# -- every request, both directions ----------------------------------------------
@pytest.mark.parametrize("spec", FRONTEND_SPECS + BACKEND_SPECS, ids=_ids)
def test_request_round_trips_through_encode_and_decoder(spec):
    payload = SAMPLES[spec.payload]
    for count in fd_counts(spec.fds, payload):
        msg = Message.make(spec.request, payload, fds=range(100, 100 + count), need_reply=True)
        data, fds = encode(msg)
        assert len(data) == HEADER_SIZE + len(payload.pack())
        assert decode_all(decoder_receiving(spec.request), data, fds) == [msg]


@pytest.mark.parametrize("spec", [s for s in all_specs() if s.accepted_replies], ids=_ids)
def test_reply_round_trips_with_the_request_reply_type(spec):
    request = Message.make(spec.request, SAMPLES[spec.payload])
    for reply_type in spec.accepted_replies:
        payload = SAMPLES[reply_type]
        for count in fd_counts(spec.reply_fds, payload):
            reply = request.reply(payload, fds=range(7, 7 + count))
            [decoded] = decode_all(decoder_of_sender(spec.request), *encode(reply))
            assert decoded == reply
            assert type(decoded.payload) is reply_type
            assert decoded.is_reply


@pytest.mark.parametrize("spec", [s for s in all_specs() if s.reply is None], ids=_ids)
def test_ack_round_trips_for_every_request_without_a_reply_body(spec):
    ack = Message.make(spec.request, SAMPLES[spec.payload]).ack(False)
    [decoded] = decode_all(decoder_of_sender(spec.request), *encode(ack))
    assert decoded.payload == U64(1)
    assert decoded.is_reply and not decoded.need_reply


# -- message helpers -------------------------------------------------------------
def test_message_make_sets_version_and_need_reply():
    msg = Message.make(F.SET_FEATURES, U64(1), need_reply=True)
    assert msg.flags == 0x9 and msg.need_reply and not msg.is_reply and msg.version == 1
    assert Message.make(F.SET_OWNER).payload == Empty()


def test_message_ack_is_zero_on_success_and_flags_reply():
    ack = Message.make(F.SET_VRING_NUM, VringState(0, 256), need_reply=True).ack(True)
    assert ack.flags == 0x5 and ack.payload == U64(0) and ack.is_reply


def test_message_reply_to_a_reply_is_refused():
    reply = Message.make(F.GET_FEATURES).reply(U64(0))
    with pytest.raises(LocalProtocolError):
        reply.reply(U64(0))


def test_message_rejects_plain_int_request_and_negative_fd():
    with pytest.raises(LocalProtocolError):
        Message(1)
    with pytest.raises(LocalProtocolError):
        Message.make(F.SET_LOG_FD, fds=(-1,))


def test_is_ack_reply_tells_acks_from_u64_bodies():
    ack = Message.make(F.SET_VRING_NUM, VringState(0, 1)).ack(True)
    body = Message.make(F.GET_FEATURES).reply(U64(0))
    assert is_ack_reply(ack)
    assert not is_ack_reply(body)
    assert not is_ack_reply(Message.make(F.SET_FEATURES, U64(0)))


def test_reply_expected_follows_reply_body_and_need_reply():
    assert reply_expected(Message.make(F.GET_FEATURES), reply_ack=False)
    assert not reply_expected(Message.make(F.SET_OWNER, need_reply=True), reply_ack=False)
    assert reply_expected(Message.make(F.SET_OWNER, need_reply=True), reply_ack=True)
    assert not reply_expected(Message.make(F.SET_OWNER), reply_ack=True)


# -- encode refuses what the table forbids ----------------------------------------
@pytest.mark.parametrize(
    "msg",
    [
        Message.make(F.SET_VRING_NUM, VringState(0, 1), fds=(5,)),
        Message.make(F.SET_LOG_FD),
        Message.make(F.SET_VRING_KICK, VringFdRequest.for_queue(0)),
        Message.make(F.SET_VRING_KICK, VringFdRequest.for_queue(0, no_fd=True), fds=(5,)),
        Message.make(F.SET_MEM_TABLE, SAMPLES[MemoryTable], fds=(5,)),
        Message.make(F.GET_FEATURES).reply(U64(0), fds=(5,)),
        Message.make(F.SET_VRING_NUM, VringState(0, 1)).ack(True).__class__(
            F.SET_VRING_NUM, 0x5, U64(0), (4,)
        ),
    ],
)
def test_encode_rejects_wrong_fd_count(msg):
    with pytest.raises(LocalProtocolError, match="takes"):
        encode(msg)


def test_encode_rejects_payload_type_the_request_does_not_take():
    with pytest.raises(LocalProtocolError, match="cannot carry"):
        encode(Message.make(F.SET_VRING_NUM, U64(1)))
    with pytest.raises(LocalProtocolError, match="cannot carry"):
        encode(Message.make(F.GET_VRING_BASE, VringState(0, 0)).reply(ConfigSpace(0, 0, 0, b"")))


def test_encode_rejects_wrong_version_bits():
    with pytest.raises(LocalProtocolError, match="version"):
        encode(Message(F.SET_OWNER, flags=2))


def test_encode_writes_little_endian_header():
    data, fds = encode(Message.make(F.SET_FEATURES, U64(0x0102), need_reply=True))
    assert data == struct.pack("<IIIQ", 2, 0x9, 8, 0x0102)
    assert fds == ()


# -- streaming and fd attribution ----------------------------------------------------
STREAM = [
    Message.make(F.SET_OWNER),
    Message.make(F.SET_MEM_TABLE, SAMPLES[MemoryTable], fds=(10, 11), need_reply=True),
    Message.make(F.SET_VRING_NUM, VringState(0, 256)),
    Message.make(F.SET_VRING_KICK, VringFdRequest.for_queue(0), fds=(12,)),
    Message.make(F.SET_VRING_CALL, VringFdRequest.for_queue(0, no_fd=True)),
    Message.make(F.GET_CONFIG, ConfigSpace.for_read(0, 60)),
    Message.make(F.SET_BACKEND_REQ_FD, fds=(13,)),
]
ENCODED = [encode(m) for m in STREAM]


def test_decoder_returns_none_until_a_message_is_complete():
    data, fds = encode(STREAM[1])
    decoder = MessageDecoder.for_backend()
    decoder.feed(data[:5], fds)
    assert decoder.next_message() is None
    decoder.feed(data[5:-1])
    assert decoder.next_message() is None
    decoder.feed(data[-1:])
    assert decoder.next_message() == STREAM[1]
    assert decoder.next_message() is None


def test_decoder_accepts_the_stream_one_byte_at_a_time():
    decoder = MessageDecoder.for_backend()
    out = []
    for data, fds in ENCODED:
        for i in range(len(data)):
            decoder.feed(data[i:i + 1], fds if i == 0 else ())
            msg = decoder.next_message()
            if msg is not None:
                out.append(msg)
    assert out == STREAM


def test_decoder_bytes_needed_asks_for_header_then_payload():
    data, fds = encode(STREAM[2])
    decoder = MessageDecoder.for_backend()
    assert decoder.bytes_needed() == HEADER_SIZE
    decoder.feed(data[:4])
    assert decoder.bytes_needed() == HEADER_SIZE - 4
    decoder.feed(data[4:HEADER_SIZE])
    assert decoder.bytes_needed() == len(data) - HEADER_SIZE
    decoder.feed(data[HEADER_SIZE:])
    assert decoder.bytes_needed() == 0
    assert decoder.next_message() == STREAM[2]
    assert decoder.bytes_needed() == HEADER_SIZE


def test_decoder_gives_chunk_fds_to_the_message_of_its_first_byte():
    kick = Message.make(F.SET_VRING_KICK, VringFdRequest.for_queue(1), fds=(21,))
    chunk = encode(kick)[0] + encode(STREAM[2])[0] + encode(STREAM[0])[0]
    out = decode_all(MessageDecoder.for_backend(), chunk, (21,))
    assert out == [kick, STREAM[2], STREAM[0]]


def test_decoder_keeps_fds_with_a_message_split_across_chunks():
    first, _ = ENCODED[0]
    table, table_fds = ENCODED[1]
    decoder = MessageDecoder.for_backend()
    decoder.feed(first + table[:HEADER_SIZE + 3])  # no fds: they come with the table's bytes
    assert decoder.next_message() == STREAM[0]
    assert decoder.next_message() is None
    decoder.feed(table[HEADER_SIZE + 3:], table_fds)  # fds arrive with a later piece
    assert decoder.next_message() == STREAM[1]


def test_decoder_fds_fed_without_bytes_go_to_the_next_message():
    decoder = MessageDecoder.for_backend()
    data, fds = ENCODED[3]
    decoder.feed(b"", fds)
    decoder.feed(data)
    assert decoder.next_message() == STREAM[3]


@given(st.data())
def test_decoder_handles_any_chunking_at_message_boundaries(data):
    decoder = MessageDecoder.for_backend()
    out = []
    for raw, fds in ENCODED:
        cuts = sorted(data.draw(st.sets(st.integers(1, len(raw) - 1), max_size=4)))
        pieces = [raw[a:b] for a, b in zip([0] + cuts, cuts + [len(raw)])]
        for i, piece in enumerate(pieces):
            decoder.feed(piece, fds if i == 0 else ())
            while (msg := decoder.next_message()) is not None:
                out.append(msg)
    assert out == STREAM


def test_decoder_drain_fds_returns_fds_of_a_partial_message():
    data, fds = ENCODED[1]
    decoder = MessageDecoder.for_backend()
    decoder.feed(data[:20], fds)
    assert decoder.next_message() is None
    assert decoder.drain_fds() == (10, 11)
    assert decoder.drain_fds() == ()


# -- malformed input: fatal ----------------------------------------------------------
@pytest.mark.parametrize("flags", [0, 2, 3, 0x6])
def test_decoder_bad_version_is_fatal_and_returns_held_fds(flags):
    decoder = MessageDecoder.for_backend()
    decoder.feed(raw_message(F.SET_LOG_FD, flags=flags), (30,))
    decoder.feed(b"\x00", (31,))
    with pytest.raises(BadVersion) as info:
        decoder.next_message()
    err = info.value
    assert not err.recoverable
    assert err.fds == (30, 31)
    assert err.request == F.SET_LOG_FD and err.flags == flags
    with pytest.raises(BadVersion) as again:
        decoder.next_message()
    assert again.value.fds == () and not again.value.recoverable
    with pytest.raises(LocalProtocolError):
        decoder.feed(b"x", (32,))
    assert decoder.bytes_needed() == 0


def test_decoder_oversized_size_field_is_fatal_before_the_payload_arrives():
    decoder = MessageDecoder.for_backend()
    decoder.feed(raw_message(F.SET_MEM_TABLE, size=MAX_PAYLOAD_SIZE + 1), (40, 41))
    assert decoder.bytes_needed() == 0
    with pytest.raises(PayloadTooLarge) as info:
        decoder.next_message()
    assert not info.value.recoverable
    assert info.value.fds == (40, 41)


def test_decoder_accepts_a_payload_of_exactly_max_size_as_framing():
    decoder = MessageDecoder.for_backend()
    decoder.feed(raw_message(F.SET_OWNER, payload=bytes(MAX_PAYLOAD_SIZE)))
    with pytest.raises(MalformedPayload) as info:
        decoder.next_message()
    assert info.value.recoverable


# -- malformed input: recoverable, and the stream goes on ------------------------------
def assert_recoverable(raw, fds, error_type, follow=STREAM[2], decoder=None, match=None):
    decoder = decoder or MessageDecoder.for_backend()
    follow_data, follow_fds = encode(follow)
    decoder.feed(raw, fds)
    decoder.feed(follow_data, follow_fds)
    with pytest.raises(error_type, match=match) as info:
        decoder.next_message()
    assert info.value.recoverable
    assert info.value.fds == tuple(fds)
    assert decoder.next_message() == follow
    return info.value


def test_decoder_unknown_request_number_is_skipped_with_its_fds():
    err = assert_recoverable(raw_message(99, payload=bytes(16)), (50,), UnknownRequest)
    assert err.request == 99 and err.flags == 1


def test_decoder_backend_request_number_beyond_ten_is_unknown():
    err = assert_recoverable(raw_message(11, payload=bytes(8)), (), UnknownRequest,
                             follow=Message.make(B.BACKEND_CONFIG_CHANGE_MSG),
                             decoder=MessageDecoder.for_frontend())
    assert err.request == 11


def test_decoder_payload_of_wrong_size_is_recoverable_and_returns_fds():
    err = assert_recoverable(raw_message(F.SET_VRING_NUM, payload=bytes(4)), (51, 52), MalformedPayload)
    assert err.request is F.SET_VRING_NUM


@pytest.mark.parametrize(
    "request_, payload, fds",
    [
        (F.SET_VRING_NUM, VringState(0, 1).pack(), (60,)),  # too many
        (F.SET_LOG_FD, b"", ()),  # too few
        (F.SET_VRING_KICK, VringFdRequest.for_queue(0, no_fd=True).pack(), (61,)),  # fd on a no-fd message
        (F.SET_VRING_CALL, VringFdRequest.for_queue(0).pack(), ()),  # missing fd
        (F.SET_MEM_TABLE, SAMPLES[MemoryTable].pack(), (62,)),  # 2 regions, 1 fd
        (F.SET_MEM_TABLE, SAMPLES[MemoryTable].pack(), (62, 63, 64)),  # 2 regions, 3 fds
        (F.ADD_MEM_REG, SAMPLES[SingleMemoryRegion].pack(), (65, 66)),
        (F.SET_OWNER, b"", tuple(range(70, 79))),
    ],
)
def test_decoder_wrong_fd_count_is_recoverable_and_returns_fds(request_, payload, fds):
    err = assert_recoverable(raw_message(request_, payload=payload), fds, BadFdCount)
    assert err.request is request_


def test_decoder_rem_mem_reg_tolerates_one_stray_fd():
    msg = Message(F.REM_MEM_REG, 1, SAMPLES[SingleMemoryRegion], (80,))
    assert decode_all(MessageDecoder.for_backend(), *encode(msg)) == [msg]


@pytest.mark.parametrize(
    "payload",
    [
        struct.pack("<II", 9, 0) + bytes(9 * 32),  # more than 8 regions
        struct.pack("<II", 2, 0) + bytes(32),  # count larger than the payload
        struct.pack("<II", 1, 0) + bytes(64),  # count smaller than the payload
        struct.pack("<II", 0xFFFFFFFF, 0),  # absurd count
        b"\x01\x00\x00",  # shorter than the header
    ],
)
def test_decoder_inconsistent_mem_table_is_recoverable(payload):
    err = assert_recoverable(raw_message(F.SET_MEM_TABLE, payload=payload), (90,), MalformedPayload)
    assert err.request is F.SET_MEM_TABLE


def test_decoder_config_size_field_inconsistent_with_message_size_is_recoverable():
    payload = struct.pack("<III", 0, 60, 0) + bytes(8)
    assert_recoverable(raw_message(F.SET_CONFIG, payload=payload), (), MalformedPayload, match="size field")


def test_decoder_reply_where_only_requests_are_expected_is_recoverable():
    decoder = MessageDecoder(incoming_requests=FrontendRequest, replies_to=None)
    err = assert_recoverable(raw_message(F.GET_FEATURES, flags=0x5, payload=bytes(8)), (91,),
                             UnexpectedReply, decoder=decoder)
    assert err.request == F.GET_FEATURES


def test_decoder_request_where_only_replies_are_expected_is_recoverable():
    decoder = MessageDecoder(incoming_requests=None, replies_to=FrontendRequest)
    reply = Message.make(F.GET_FEATURES).reply(U64(3))
    assert_recoverable(raw_message(F.SET_OWNER), (), UnexpectedReply, follow=reply, decoder=decoder)


# -- reply typing --------------------------------------------------------------------
def test_decoder_types_a_reply_by_its_request_number():
    decoder = MessageDecoder.for_frontend()
    out = decode_all(decoder, raw_message(F.GET_VRING_BASE, flags=0x5, payload=struct.pack("<II", 1, 42)))
    assert out[0].payload == VringState(1, 42)


def test_decoder_reads_an_eight_byte_reply_to_a_bodiless_request_as_reply_ack():
    decoder = MessageDecoder.for_frontend()
    [ack] = decode_all(decoder, raw_message(F.SET_VRING_ADDR, flags=0x5, payload=struct.pack("<Q", 0)))
    assert ack.payload == U64(0) and is_ack_reply(ack)


def test_decoder_reads_failed_get_config_empty_reply():
    decoder = MessageDecoder.for_frontend()
    [reply] = decode_all(decoder, raw_message(F.GET_CONFIG, flags=0x5))
    assert reply.payload == Empty()


def test_decoder_rejects_reply_ack_that_carries_an_fd():
    decoder = MessageDecoder.for_frontend()
    reply = Message.make(F.GET_FEATURES).reply(U64(3))
    assert_recoverable(raw_message(F.SET_VRING_NUM, flags=0x5, payload=bytes(8)), (92,), BadFdCount,
                       follow=reply, decoder=decoder)


def test_decoder_rejects_reply_of_a_size_no_reply_type_fits():
    decoder = MessageDecoder.for_frontend()
    reply = Message.make(F.GET_FEATURES).reply(U64(3))
    assert_recoverable(raw_message(F.GET_CONFIG, flags=0x5, payload=bytes(5)), (), MalformedPayload,
                       follow=reply, decoder=decoder)


@pytest.mark.parametrize("value,fds", [(0, (9,)), (0x100, ()), (0x1, ()), (0x101, ())])
def test_decoder_device_state_reply_fd_follows_error_and_no_fd_bits(value, fds):
    request = Message.make(F.SET_DEVICE_STATE_FD, DeviceStateTransfer(0, 0), fds=(3,))
    reply = request.reply(U64(value), fds=fds)
    assert decode_all(MessageDecoder.for_frontend(), *encode(reply)) == [reply]


def test_decoder_device_state_success_reply_without_fd_or_no_fd_bit_is_rejected():
    follow = Message.make(F.GET_FEATURES).reply(U64(3))
    assert_recoverable(raw_message(F.SET_DEVICE_STATE_FD, flags=0x5, payload=bytes(8)), (), BadFdCount,
                       follow=follow, decoder=MessageDecoder.for_frontend())


def test_decoder_reads_eight_byte_reply_to_set_mem_table_as_ack_not_postcopy_table():
    [ack] = decode_all(MessageDecoder.for_frontend(), raw_message(F.SET_MEM_TABLE, flags=0x5, payload=bytes(8)))
    assert ack.payload == U64(0) and is_ack_reply(ack)


def test_decoder_accepts_qemu_get_shared_object_sent_without_payload():
    # QEMU fills in the UUID but never sets hdr.size, so the request arrives empty.
    [msg] = decode_all(MessageDecoder.for_backend(), raw_message(F.GET_SHARED_OBJECT))
    assert msg.payload == Empty()


def test_decoder_accepts_postcopy_ack_as_empty_mem_table():
    [msg] = decode_all(MessageDecoder.for_backend(), raw_message(F.SET_MEM_TABLE, payload=bytes(8)))
    assert msg.payload == MemoryTable(())


def test_decoder_keeps_unknown_flag_bits():
    [msg] = decode_all(MessageDecoder.for_backend(), raw_message(F.SET_OWNER, flags=0x101))
    assert msg.flags == 0x101 and msg.request is F.SET_OWNER
