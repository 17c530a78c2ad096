"""The numbers and the request table, checked against PROTOCOL-NOTES independently of the enums."""

import ast
import pathlib

import pytest

from vhost_user import protocol
from vhost_user.protocol import (
    BackendRequest,
    FrontendRequest,
    HeaderFlag,
    ProtocolFeature,
    VirtioFeature,
    all_specs,
    mask,
    spec_for,
)

# Copied by hand from /work/shared/PROTOCOL-NOTES.md section 1.
NOTES_FRONTEND = {
    "GET_FEATURES": 1, "SET_FEATURES": 2, "SET_OWNER": 3, "RESET_OWNER": 4,
    "SET_MEM_TABLE": 5, "SET_LOG_BASE": 6, "SET_LOG_FD": 7, "SET_VRING_NUM": 8,
    "SET_VRING_ADDR": 9, "SET_VRING_BASE": 10, "GET_VRING_BASE": 11, "SET_VRING_KICK": 12,
    "SET_VRING_CALL": 13, "SET_VRING_ERR": 14, "GET_PROTOCOL_FEATURES": 15,
    "SET_PROTOCOL_FEATURES": 16, "GET_QUEUE_NUM": 17, "SET_VRING_ENABLE": 18, "SEND_RARP": 19,
    "NET_SET_MTU": 20, "SET_BACKEND_REQ_FD": 21, "IOTLB_MSG": 22, "SET_VRING_ENDIAN": 23,
    "GET_CONFIG": 24, "SET_CONFIG": 25, "CREATE_CRYPTO_SESSION": 26, "CLOSE_CRYPTO_SESSION": 27,
    "POSTCOPY_ADVISE": 28, "POSTCOPY_LISTEN": 29, "POSTCOPY_END": 30, "GET_INFLIGHT_FD": 31,
    "SET_INFLIGHT_FD": 32, "GPU_SET_SOCKET": 33, "RESET_DEVICE": 34, "VRING_KICK": 35,
    "GET_MAX_MEM_SLOTS": 36, "ADD_MEM_REG": 37, "REM_MEM_REG": 38, "SET_STATUS": 39,
    "GET_STATUS": 40, "GET_SHARED_OBJECT": 41, "SET_DEVICE_STATE_FD": 42,
    "CHECK_DEVICE_STATE": 43, "GET_SHMEM_CONFIG": 44,
}

# Section 2.
NOTES_BACKEND = {
    "BACKEND_IOTLB_MSG": 1, "BACKEND_CONFIG_CHANGE_MSG": 2, "BACKEND_VRING_HOST_NOTIFIER_MSG": 3,
    "BACKEND_VRING_CALL": 4, "BACKEND_VRING_ERR": 5, "BACKEND_SHARED_OBJECT_ADD": 6,
    "BACKEND_SHARED_OBJECT_REMOVE": 7, "BACKEND_SHARED_OBJECT_LOOKUP": 8,
    "BACKEND_SHMEM_MAP": 9, "BACKEND_SHMEM_UNMAP": 10,
}

# Section 3.
NOTES_PROTOCOL_FEATURES = {
    "MQ": 0, "LOG_SHMFD": 1, "RARP": 2, "REPLY_ACK": 3, "MTU": 4, "BACKEND_REQ": 5,
    "CROSS_ENDIAN": 6, "CRYPTO_SESSION": 7, "PAGEFAULT": 8, "CONFIG": 9, "BACKEND_SEND_FD": 10,
    "HOST_NOTIFIER": 11, "INFLIGHT_SHMFD": 12, "RESET_DEVICE": 13, "INBAND_NOTIFICATIONS": 14,
    "CONFIGURE_MEM_SLOTS": 15, "STATUS": 16, "XEN_MMAP": 17, "SHARED_OBJECT": 18,
    "DEVICE_STATE": 19, "GET_VRING_BASE_INFLIGHT": 20, "GPA_ADDRESSES": 21, "SHMEM": 22,
}

FORBIDDEN_IMPORTS = {"socket", "asyncio", "mmap", "os", "threading", "selectors", "subprocess"}


def test_frontend_request_numbers_match_notes():
    assert {m.name: m.value for m in FrontendRequest} == NOTES_FRONTEND


def test_backend_request_numbers_match_notes():
    assert {m.name: m.value for m in BackendRequest} == NOTES_BACKEND


def test_protocol_feature_bits_match_notes():
    assert {m.name: m.value for m in ProtocolFeature} == NOTES_PROTOCOL_FEATURES


def test_table_covers_every_frontend_and_backend_request():
    frontend = sorted(s.request.value for s in all_specs() if isinstance(s.request, FrontendRequest))
    backend = sorted(s.request.value for s in all_specs() if isinstance(s.request, BackendRequest))
    assert frontend == list(range(1, 45))
    assert backend == list(range(1, 11))
    for number in range(1, 45):
        assert spec_for(FrontendRequest(number)).request is FrontendRequest(number)
    for number in range(1, 11):
        assert spec_for(BackendRequest(number)).request is BackendRequest(number)


def test_spec_for_keeps_directions_apart():
    assert spec_for(FrontendRequest.GET_FEATURES).reply is protocol.U64
    assert spec_for(BackendRequest.BACKEND_IOTLB_MSG).payload is protocol.IotlbMessage


def test_spec_for_rejects_a_plain_int():
    with pytest.raises(protocol.LocalProtocolError):
        spec_for(1)


def test_header_and_feature_constants_match_spec():
    assert protocol.HEADER_SIZE == 12
    assert protocol.VHOST_USER_VERSION == 1
    assert HeaderFlag.VERSION_MASK == 0x3
    assert HeaderFlag.REPLY == 0x4
    assert HeaderFlag.NEED_REPLY == 0x8
    assert protocol.VHOST_USER_F_PROTOCOL_FEATURES == 30
    assert protocol.VHOST_F_LOG_ALL == 26
    assert protocol.VRING_IDX_MASK == 0xFF
    assert protocol.VRING_NOFD_MASK == 0x100
    assert protocol.MAX_MEM_REGIONS == 8
    assert protocol.MAX_CONFIG_SIZE == 256
    assert VirtioFeature.VIRTIO_F_VERSION_1 == 32
    assert VirtioFeature.VIRTIO_F_RING_RESET == 40


def test_max_payload_size_covers_the_largest_spec_payload():
    assert protocol.LARGEST_PAYLOAD_SIZE == protocol.ShmemConfig.SIZE == 2056
    assert protocol.MAX_PAYLOAD_SIZE >= protocol.LARGEST_PAYLOAD_SIZE
    assert protocol.MAX_PAYLOAD_SIZE >= 12 + protocol.MAX_CONFIG_SIZE


def test_mask_sets_the_named_bits():
    assert mask() == 0
    assert mask(ProtocolFeature.MQ, ProtocolFeature.REPLY_ACK) == 0b1001
    assert mask(VirtioFeature.VIRTIO_F_VERSION_1) == 1 << 32


def test_mask_rejects_bits_outside_u64():
    with pytest.raises(ValueError):
        mask(64)


def test_all_lists_every_public_name_and_nothing_missing():
    for name in protocol.__all__:
        assert hasattr(protocol, name), name
    for module in ("codec", "constants", "errors", "messages", "table"):
        sub = getattr(protocol, module)
        for name in sub.__all__:
            assert hasattr(sub, name), f"{module}.{name}"


def test_protocol_package_imports_no_io_modules():
    root = pathlib.Path(protocol.__file__).parent
    for path in root.glob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            for name in names:
                assert name.split(".")[0] not in FORBIDDEN_IMPORTS, f"{path.name} imports {name}"
