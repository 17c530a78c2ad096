"""Payload types: round trips, wire layouts from the spec, validation both ways."""

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vhost_user.protocol import messages
from vhost_user.protocol import (
    U64,
    ConfigSpace,
    DeviceStateTransfer,
    Empty,
    InflightDescription,
    IotlbMessage,
    LocalProtocolError,
    LogDescription,
    MalformedPayload,
    MemoryRegion,
    MemoryTable,
    RawPayload,
    SharedObject,
    ShmemConfig,
    ShmemMap,
    SingleMemoryRegion,
    VringAddress,
    VringArea,
    VringFdRequest,
    VringState,
)

u8 = st.integers(0, 2**8 - 1)
u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
regions = st.builds(MemoryRegion, u64, u64, u64, u64)
config_spaces = st.binary(max_size=256).flatmap(
    lambda data: st.builds(ConfigSpace, u32, st.just(len(data)), u32, st.just(data))
)

STRATEGIES = {
    Empty: st.just(Empty()),
    U64: st.builds(U64, u64),
    VringFdRequest: st.builds(VringFdRequest.for_queue, u8, no_fd=st.booleans()),
    VringState: st.builds(VringState, u32, u32),
    VringAddress: st.builds(VringAddress, u32, u32, u64, u64, u64, u64),
    MemoryRegion: regions,
    MemoryTable: st.builds(MemoryTable, st.lists(regions, max_size=8).map(tuple)),
    SingleMemoryRegion: st.builds(SingleMemoryRegion, regions),
    LogDescription: st.builds(LogDescription, u64, u64),
    ConfigSpace: config_spaces,
    InflightDescription: st.builds(InflightDescription, u64, u64, u16, u16),
    IotlbMessage: st.builds(IotlbMessage, u64, u64, u64, u8, u8),
    VringArea: st.builds(VringArea, u64, u64, u64),
    DeviceStateTransfer: st.builds(DeviceStateTransfer, u32, u32),
    SharedObject: st.builds(SharedObject, st.binary(min_size=16, max_size=16)),
    ShmemConfig: st.builds(ShmemConfig, st.integers(0, 256), st.lists(u64, max_size=256).map(tuple)),
    ShmemMap: st.builds(ShmemMap, u8, u64, u64, u64, u64),
    RawPayload: st.builds(RawPayload, st.binary(max_size=4096)),
}

any_payload = st.one_of(*STRATEGIES.values())


def test_strategies_cover_every_payload_type():
    exported = {getattr(messages, name) for name in messages.__all__} - {messages.Payload}
    assert exported == set(STRATEGIES)


@given(any_payload)
def test_payload_round_trips_through_pack_and_unpack(payload):
    data = payload.pack()
    assert type(payload).unpack(data) == payload
    assert payload.wire_size() == len(data)
    assert type(payload).accepts_size(len(data))
    if type(payload).SIZE is not None:
        assert len(data) == type(payload).SIZE


@given(any_payload, st.binary(min_size=1, max_size=3))
def test_payload_unpack_rejects_extra_bytes_recoverably(payload, extra):
    if isinstance(payload, RawPayload):
        return
    with pytest.raises(MalformedPayload) as info:
        type(payload).unpack(payload.pack() + extra)
    assert info.value.recoverable


@given(any_payload)
def test_payload_unpack_rejects_a_truncated_payload(payload):
    data = payload.pack()
    if not data or isinstance(payload, RawPayload):
        return
    with pytest.raises(MalformedPayload):
        type(payload).unpack(data[:-1])


# -- wire layouts, written out from the spec's tables ---------------------------
def test_vring_address_layout_matches_spec():
    addr = VringAddress(1, 1, 0x1000, 0x2000, 0x3000, 0x4000)
    assert addr.pack() == struct.pack("<IIQQQQ", 1, 1, 0x1000, 0x2000, 0x3000, 0x4000)
    assert addr.log_enabled


def test_memory_table_layout_is_count_padding_then_regions():
    r = MemoryRegion(0x0, 0x10000, 0x7F0000000000, 0)
    data = MemoryTable((r, r)).pack()
    assert data[:8] == struct.pack("<II", 2, 0)
    assert len(data) == 8 + 2 * 32
    assert data[8:40] == struct.pack("<QQQQ", 0, 0x10000, 0x7F0000000000, 0)


def test_single_memory_region_layout_is_padding_then_region():
    r = MemoryRegion(1, 2, 3, 4)
    assert SingleMemoryRegion(r).pack() == struct.pack("<QQQQQ", 0, 1, 2, 3, 4)


def test_inflight_description_is_padded_to_24_bytes():
    data = InflightDescription(0x1000, 0x10, 2, 256).pack()
    assert data == struct.pack("<QQHH", 0x1000, 0x10, 2, 256) + bytes(4)


def test_iotlb_message_is_padded_to_the_c_struct_size():
    data = IotlbMessage(1, 2, 3, 3, 2).pack()
    assert len(data) == 32
    assert data[24:26] == bytes([3, 2])


def test_shmem_config_layout_is_count_padding_and_256_sizes():
    data = ShmemConfig(2, (0x1000, 0x2000)).pack()
    assert len(data) == 8 + 256 * 8
    assert data[:24] == struct.pack("<IIQQ", 2, 0, 0x1000, 0x2000)
    assert data[24:] == bytes(len(data) - 24)


def test_shmem_config_ignores_trailing_zero_sizes_in_equality():
    assert ShmemConfig(1, (4096, 0, 0)) == ShmemConfig(1, (4096,))


def test_shmem_map_layout_has_shmid_then_seven_padding_bytes():
    data = ShmemMap(5, 0x10, 0x20, 0x30, 1).pack()
    assert data == bytes([5]) + bytes(7) + struct.pack("<QQQQ", 0x10, 0x20, 0x30, 1)


def test_config_space_layout_is_header_then_bytes():
    assert ConfigSpace(8, 3, 1, b"abc").pack() == struct.pack("<III", 8, 3, 1) + b"abc"
    assert ConfigSpace.for_read(0, 4).payload == bytes(4)


def test_vring_fd_request_encodes_index_and_no_fd_bit():
    assert VringFdRequest.for_queue(3).value == 3
    assert VringFdRequest.for_queue(3, no_fd=True).value == 0x103
    req = VringFdRequest(0x105)
    assert (req.index, req.no_fd) == (5, True)


def test_vring_area_encodes_index_and_no_fd_bit():
    area = VringArea.for_queue(2, 4096, 0, no_fd=True)
    assert (area.u64, area.index, area.no_fd) == (0x102, 2, True)


def test_shared_object_accepts_a_uuid_object():
    import uuid

    value = uuid.UUID("12345678-1234-5678-1234-567812345678")
    assert SharedObject.from_uuid(value).uuid == value.bytes


# -- validation of values we build ---------------------------------------------
@pytest.mark.parametrize(
    "build",
    [
        lambda: U64(-1),
        lambda: U64(2**64),
        lambda: U64(True),
        lambda: U64("1"),
        lambda: VringState(2**32, 0),
        lambda: InflightDescription(0, 0, 2**16, 0),
        lambda: IotlbMessage(0, 0, 0, 256, 0),
        lambda: SharedObject(b"short"),
        lambda: VringFdRequest(0x200),
        lambda: VringFdRequest.for_queue(256),
        lambda: MemoryTable((MemoryRegion(0, 0, 0, 0),) * 9),
        lambda: MemoryTable(("not a region",)),
        lambda: SingleMemoryRegion("not a region"),
        lambda: ConfigSpace(0, 4, 0, b"abc"),
        lambda: ConfigSpace(0, 257, 0, bytes(257)),
        lambda: ShmemConfig(257, ()),
        lambda: ShmemConfig(1, (0,) * 256 + (1,)),
        lambda: RawPayload(bytes(4097)),
    ],
)
def test_payload_rejects_bad_values_when_built_locally(build):
    with pytest.raises(LocalProtocolError):
        build()


def test_memory_table_unpack_rejects_more_than_eight_regions():
    data = struct.pack("<II", 9, 0) + bytes(9 * 32)
    with pytest.raises(MalformedPayload, match="exceeds 8"):
        MemoryTable.unpack(data)


@pytest.mark.parametrize("nregions,present", [(2, 1), (1, 2), (3, 0), (1, 0)])
def test_memory_table_unpack_rejects_count_inconsistent_with_size(nregions, present):
    data = struct.pack("<II", nregions, 0) + bytes(present * 32)
    with pytest.raises(MalformedPayload, match="needs"):
        MemoryTable.unpack(data)


def test_memory_table_unpack_rejects_a_payload_shorter_than_its_header():
    with pytest.raises(MalformedPayload):
        MemoryTable.unpack(b"\x01\x00")


def test_memory_table_with_no_regions_is_the_postcopy_ack():
    assert MemoryTable.unpack(bytes(8)) == MemoryTable(())


@pytest.mark.parametrize("declared,present", [(10, 4), (4, 10), (0, 1)])
def test_config_space_unpack_rejects_size_field_inconsistent_with_payload(declared, present):
    data = struct.pack("<III", 0, declared, 0) + bytes(present)
    with pytest.raises(MalformedPayload, match="size field"):
        ConfigSpace.unpack(data)


def test_config_space_unpack_rejects_more_than_256_bytes():
    data = struct.pack("<III", 0, 300, 0) + bytes(300)
    with pytest.raises(MalformedPayload, match="exceeds 256"):
        ConfigSpace.unpack(data)


def test_vring_fd_request_unpack_rejects_reserved_bits():
    with pytest.raises(MalformedPayload, match="reserved"):
        VringFdRequest.unpack(struct.pack("<Q", 1 << 9))
