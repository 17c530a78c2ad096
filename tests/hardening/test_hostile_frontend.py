"""A hostile front-end against each back-end process, parametrised by command line.

Extends tests/integration/test_hostile_blk.py (which covers one case of each
kind against blk) to every request type and every negotiation step, for any
back-end: a back-end joins by adding one line to BACKENDS. Each case checks
that the back-end NACKs (or drops the connection) with a log line naming the
problem, closes every fd it was sent (its /proc/PID/fd count returns to the
baseline), never crashes, and serves the next front-end: a full negotiation
that starts and stops a queue.
"""
from __future__ import annotations

import mmap
import os
import select
import socket
import struct
import sys
import time

import pytest

from backends_proc import spawn
from vhost_user.frontend import Frontend, FrontendError
from vhost_user.protocol import (
    HEADER_SIZE,
    FrontendRequest as R,
    HeaderFlag,
    MemoryRegion,
    MemoryTable,
    Message,
    ProtocolFeature as PF,
    SingleMemoryRegion,
    U64,
    VringAddress,
    VringFdRequest,
    VringState,
    spec_for,
)

# name -> argv after `python -m`; {sock} is replaced. One line per back-end.
BACKENDS = {
    "blk": ["vhost_user.backends.blk", "--socket", "{sock}", "-v", "--num-queues", "2", "--size", "16M"],
    "net": ["vhost_user.backends.net", "--socket", "{sock}", "-v"],
    "vsock": ["vhost_user.backends.vsock", "--guest-cid", "3", "--socket", "{sock}", "-v"],
    "gpu": ["vhost_user.backends.gpu", "--socket", "{sock}", "--verbose"],
    "rng": ["vhost_user.backends.rng", "--socket", "{sock}", "-v"],
}

# back-ends with a single queue: the negotiation cases start only queue 0 there
ONE_QUEUE = {"rng"}

NEED_REPLY = 1 | HeaderFlag.NEED_REPLY
_PAGE = 4096


@pytest.fixture(scope="module", params=sorted(BACKENDS))
def backend(request, tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    sock = f"/tmp/vu-hostile-{os.getpid()}-{request.param}.sock"
    argv = [sys.executable, "-m"] + [a.replace("{sock}", sock) for a in BACKENDS[request.param]]
    log_path = str(d / "backend.log")
    bp = spawn(argv, sock, log_path)
    bp.extra["queues"] = 1 if request.param in ONE_QUEUE else 2
    try:
        _serves_next_frontend(bp)  # warm-up: lazily created fds exist from now on
        bp.extra["baseline"] = _settled_fd_count(bp, None)
        yield bp
    finally:
        rc = bp.stop()
        assert rc == 0, f"back-end exit {rc}:\n{bp.log()[-3000:]}"


# -- helpers -----------------------------------------------------------------------------

def _fd_count(bp) -> int:
    return len(os.listdir(f"/proc/{bp.pid}/fd"))


def _settled_fd_count(bp, want: int | None, timeout: float = 10.0) -> int:
    """The back-end's fd count once it stops changing (or equals `want`)."""
    deadline = time.monotonic() + timeout
    last = _fd_count(bp)
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = _fd_count(bp)
        if (want is not None and now == want) or (want is None and now == last):
            return now
        last = now
    return last


def _serves_next_frontend(bp) -> None:
    """Liveness: a full QEMU-like negotiation that starts and stops queue 0."""
    with Frontend(bp.socket) as fe:
        fe.negotiate(0)
        fe.set_mem_table()
        fe.setup_queue(0, 64)
        assert fe.stop_queue(0) == 0


def _after_case(bp, log_before: int, needle: str | None) -> None:
    """The shared verdict: alive, a log line, every fd closed, next front-end served."""
    assert bp.running, f"back-end died:\n{bp.log()[-3000:]}"
    new_log = bp.log()[log_before:]
    deadline = time.monotonic() + 10
    while needle is not None and needle not in new_log and time.monotonic() < deadline:
        time.sleep(0.05)  # the back-end logs after it has seen the hang-up
        new_log = bp.log()[log_before:]
    if needle is not None:
        assert needle in new_log, f"no log line with {needle!r}:\n{new_log[-3000:]}"
    baseline = bp.extra["baseline"]
    assert _settled_fd_count(bp, baseline) == baseline, f"fd leak in the back-end:\n{new_log[-2000:]}"
    _serves_next_frontend(bp)
    assert _settled_fd_count(bp, baseline) == baseline


def _opened(fe_features: int = 0, *, owner: bool = True, bp=None) -> Frontend:
    fe = Frontend(bp.socket)
    fe.backend_features = fe._value(R.GET_FEATURES)
    fe.backend_protocol_features = fe._value(R.GET_PROTOCOL_FEATURES)
    fe.protocol_features = fe.backend_protocol_features & (
        (1 << PF.REPLY_ACK) | (1 << PF.MQ) | (1 << PF.CONFIGURE_MEM_SLOTS) | (1 << PF.CONFIG))
    fe.call(R.SET_PROTOCOL_FEATURES, U64(fe.protocol_features), ack=False)
    if owner:
        fe.call(R.SET_OWNER)
    return fe


def _send_raw(fe: Frontend, data: bytes, fds=()) -> None:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] if fds else []
    fe.channel.sock.sendmsg([data], anc)


def _recv_raw(fe: Frontend, timeout: float = 10.0) -> tuple[int, int, bytes] | None:
    """One reply read byte-exactly off the socket; None when the back-end hung up."""
    sock = fe.channel.sock
    if not select.select([sock], [], [], timeout)[0]:
        raise AssertionError("no reply and no disconnect")
    head = sock.recv(HEADER_SIZE, socket.MSG_WAITALL)
    if len(head) < HEADER_SIZE:
        return None
    request, flags, size = struct.unpack("<III", head)
    body = sock.recv(size, socket.MSG_WAITALL) if size else b""
    return request, flags, body  # a refusal carries no fds


def _nacked(fe: Frontend, request: int) -> None:
    got = _recv_raw(fe)
    assert got is not None, "back-end dropped the connection instead of NACKing"
    number, flags, body = got
    assert number == int(request) and flags & HeaderFlag.REPLY
    if len(body) == 8:
        assert struct.unpack("<Q", body)[0] != 0 or spec_for(R(request)).reply is not None
    assert _alive_session(fe)


def _alive_session(fe: Frontend) -> bool:
    return fe.call(R.GET_QUEUE_NUM).payload.value >= 1


def _eventfds(n: int) -> list[int]:
    return [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(n)]


def _close(fds) -> None:
    for fd in fds:
        os.close(fd)


def _memfd(size: int) -> int:
    fd = os.memfd_create("hostile", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def _zero_payload(request: R) -> bytes:
    """A well-sized, all-zero payload for `request` (decodes without error)."""
    cls = spec_for(request).accepted_payloads[0]
    if getattr(cls, "SIZE", None) is not None:
        return bytes(cls.SIZE)
    return {"MemoryTable": bytes(8), "ConfigSpace": bytes(12)}.get(cls.__name__, b"")


def _max_fds(request: R) -> int:
    spec = spec_for(request)
    payload = spec.accepted_payloads[0].unpack(_zero_payload(request))
    return spec.fds.bounds(payload)[1]


# -- malformed headers and sizes ---------------------------------------------------------

BAD_HEADERS = {
    "version_0": (struct.pack("<III", R.GET_FEATURES, 0, 0), "version"),
    "version_2": (struct.pack("<III", R.GET_FEATURES, 2, 0), "version"),
    "payload_over_limit": (struct.pack("<III", R.SET_CONFIG, NEED_REPLY, 0x1001), "4097"),
    "payload_size_u32_max": (struct.pack("<III", R.SET_CONFIG, NEED_REPLY, 0xFFFFFFFF), "4294967295"),
    "truncated_header": (struct.pack("<II", R.GET_FEATURES, 1), "disconnected"),
    "truncated_payload": (struct.pack("<III", R.SET_FEATURES, NEED_REPLY, 8) + b"\1\2", "disconnected"),
}


@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
def test_hostile_header_drops_connection_with_log_line(backend, case):
    data, needle = BAD_HEADERS[case]
    mark = len(backend.log())
    fds = _eventfds(3)
    try:
        fe = _opened(bp=backend)
        _send_raw(fe, data, fds)
        if case.startswith("truncated"):
            fe.close()
        else:
            assert _recv_raw(fe) is None, "back-end kept a connection whose framing broke"
            fe.close()
    finally:
        _close(fds)
    _after_case(backend, mark, needle)


@pytest.mark.parametrize("number", [0, 45, 99, 1000, 0xFFFFFFFF])
def test_hostile_unknown_request_is_nacked(backend, number):
    mark = len(backend.log())
    with _opened(bp=backend) as fe:
        _send_raw(fe, struct.pack("<III", number, NEED_REPLY, 0))
        _nacked(fe, number)
    _after_case(backend, mark, str(number))


def test_hostile_reply_flag_on_a_request_is_refused(backend):
    mark = len(backend.log())
    with _opened(bp=backend) as fe:
        _send_raw(fe, struct.pack("<III", R.GET_FEATURES, 1 | HeaderFlag.REPLY, 0))
        assert _alive_session(fe)
    _after_case(backend, mark, "malformed")


def test_hostile_wrong_payload_size_on_every_request_is_nacked(backend):
    mark = len(backend.log())
    with _opened(bp=backend) as fe:
        for request in R:
            size = len(_zero_payload(request))
            for wrong in {size - 1, size + 1} - {-1}:
                cls = spec_for(request).accepted_payloads
                if any(c.accepts_size(wrong) for c in cls):
                    continue  # variable-size payloads accept this size
                _send_raw(fe, struct.pack("<III", request, NEED_REPLY, wrong) + bytes(wrong))
                _nacked(fe, request)
    _after_case(backend, mark, "malformed message")


def test_hostile_too_many_fds_on_every_request_are_closed_and_nacked(backend):
    mark = len(backend.log())
    with _opened(bp=backend) as fe:
        for request in R:
            fds = _eventfds(_max_fds(request) + 1)
            try:
                _send_raw(fe, struct.pack("<III", request, NEED_REPLY, len(_zero_payload(request)))
                          + _zero_payload(request), fds)
                _nacked(fe, request)
            finally:
                _close(fds)
            assert request.name in backend.log()[mark:], f"no log line for {request.name}"
    _after_case(backend, mark, "fd")


def test_hostile_missing_fd_is_nacked(backend):
    mark = len(backend.log())
    with _opened(bp=backend) as fe:
        for request in (R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_BACKEND_REQ_FD, R.ADD_MEM_REG):
            _send_raw(fe, struct.pack("<III", request, NEED_REPLY, len(_zero_payload(request)))
                      + _zero_payload(request))
            _nacked(fe, request)
    _after_case(backend, mark, "fd")


# -- memory tables -----------------------------------------------------------------------

MEM_TABLES = {
    # name: ([(gpa, size, uaddr, mmap_offset)], fd size)
    "overlapping_gpa": ([(0, 1 << 20, 1 << 30, 0), (1 << 19, 1 << 20, 1 << 31, 0)], 1 << 20),
    "overlapping_uaddr": ([(0, 1 << 20, 1 << 30, 0), (1 << 21, 1 << 20, (1 << 30) + 4096, 0)], 1 << 20),
    "zero_sized": ([(0, 0, 1 << 30, 0)], 1 << 20),
    "beyond_the_fd": ([(0, 16 << 20, 1 << 30, 0)], 1 << 20),
    "offset_beyond_the_fd": ([(0, 1 << 20, 1 << 30, 1 << 20)], 1 << 20),
    "gpa_wraps_64_bits": ([((1 << 64) - 4096, 1 << 20, 1 << 30, 0)], 1 << 20),
    "huge_size": ([(0, (1 << 64) - 1, 1 << 30, 0)], 1 << 20),
}


@pytest.mark.parametrize("case", sorted(MEM_TABLES))
@pytest.mark.parametrize("how", ["SET_MEM_TABLE", "ADD_MEM_REG"])
def test_hostile_memory_region_is_refused_and_its_fds_closed(backend, case, how):
    regions, fd_size = MEM_TABLES[case]
    mark = len(backend.log())
    fds = [_memfd(fd_size) for _ in regions]
    try:
        with _opened(bp=backend) as fe:
            table = [MemoryRegion(*r) for r in regions]
            if how == "SET_MEM_TABLE":
                fe.channel.send(Message.make(R.SET_MEM_TABLE, MemoryTable(tuple(table)), fds=tuple(fds),
                                             need_reply=True))
                _nacked(fe, R.SET_MEM_TABLE)
            else:
                for k, region in enumerate(table):
                    fe.channel.send(Message.make(R.ADD_MEM_REG, SingleMemoryRegion(region), fds=(fds[k],),
                                                 need_reply=True))
                    got = _recv_raw(fe)
                    assert got is not None
                assert struct.unpack("<Q", got[2])[0] != 0, "the bad region was accepted"
    finally:
        _close(fds)
    _after_case(backend, mark, "failed")


def test_hostile_region_count_beyond_payload_is_refused(backend):
    """qemu-storage-daemon 7.2/10.0 crash on this (PROTOCOL-NOTES.md)."""
    mark = len(backend.log())
    fd = _memfd(1 << 20)
    try:
        with _opened(bp=backend) as fe:
            body = struct.pack("<II", 8, 0) + MemoryRegion(0, 1 << 20, 1 << 30, 0).pack()
            _send_raw(fe, struct.pack("<III", R.SET_MEM_TABLE, NEED_REPLY, len(body)) + body, [fd])
            _nacked(fe, R.SET_MEM_TABLE)
    finally:
        os.close(fd)
    _after_case(backend, mark, "SET_MEM_TABLE")


# -- vrings --------------------------------------------------------------------------------

def _with_memory(bp) -> Frontend:
    fe = _opened(bp=bp)
    fe.call(R.SET_FEATURES, U64(fe.backend_features & (1 << 32)))
    fe.set_mem_table()
    return fe


@pytest.mark.parametrize("index", [2, 7, 255])
def test_hostile_queue_index_out_of_range_is_nacked_for_every_vring_request(backend, index):
    mark = len(backend.log())
    kick = _eventfds(3)
    try:
        with _with_memory(backend) as fe:
            index = max(index, fe._value(R.GET_QUEUE_NUM))  # vsock's 3 queues: index 2 is its event queue
            for request, payload, fds in [
                (R.SET_VRING_NUM, VringState(index, 64), ()),
                (R.SET_VRING_BASE, VringState(index, 0), ()),
                (R.SET_VRING_ADDR, VringAddress(index, 0, 0, 0, 0, 0), ()),
                (R.SET_VRING_ENABLE, VringState(index, 1), ()),
                (R.GET_VRING_BASE, VringState(index, 0), ()),
                (R.SET_VRING_KICK, VringFdRequest.for_queue(index), (kick[0],)),
                (R.SET_VRING_CALL, VringFdRequest.for_queue(index), (kick[1],)),
                (R.SET_VRING_ERR, VringFdRequest.for_queue(index), (kick[2],)),
            ]:
                fe.channel.send(Message.make(request, payload, fds=fds, need_reply=True))
                _nacked(fe, request)
    finally:
        _close(kick)
    _after_case(backend, mark, f"queue index {index} out of range")


# 32768 is the largest size the spec allows (crosvm offers it): it is legal.
@pytest.mark.parametrize("num", [0, 3, 100, 65535, 65536, 1 << 31])
def test_hostile_queue_size_is_nacked(backend, num):
    mark = len(backend.log())
    with _with_memory(backend) as fe:
        fe.channel.send(Message.make(R.SET_VRING_NUM, VringState(0, num), need_reply=True))
        _nacked(fe, R.SET_VRING_NUM)
    _after_case(backend, mark, "SET_VRING_NUM failed")


RING_ADDRESSES = {
    "outside_memory": lambda ram: (1 << 40, 1 << 41, 1 << 42),
    "desc_misaligned": lambda ram: (ram.uaddr(0x1008) + 1, ram.uaddr(0x2000), ram.uaddr(0x3000)),
    "used_crosses_region_end": lambda ram: (ram.uaddr(0x1000), ram.uaddr(0x2000),
                                            ram.uaddr(ram.regions[0].size - 8)),
    "wraps_64_bits": lambda ram: ((1 << 64) - 16, (1 << 64) - 8, (1 << 64) - 4),
}


def _start_answers(fe: Frontend, desc: int, avail: int, used: int, kick: int) -> list[int]:
    """SET_VRING_ADDR, SET_VRING_KICK, SET_VRING_ENABLE on queue 0, each with NEED_REPLY;
    the u64 answers (non-zero: refused)."""
    answers = []
    for request, payload, fds in [
        (R.SET_VRING_ADDR, VringAddress(0, 0, desc, used, avail, 0), ()),
        (R.SET_VRING_KICK, VringFdRequest.for_queue(0), (kick,)),
        (R.SET_VRING_ENABLE, VringState(0, 1), ()),
    ]:
        fe.channel.send(Message.make(request, payload, fds=fds, need_reply=True))
        got = _recv_raw(fe)
        assert got is not None
        answers.append(struct.unpack("<Q", got[2])[0])
    return answers


@pytest.mark.parametrize("case", sorted(RING_ADDRESSES))
def test_hostile_vring_address_is_refused_when_the_ring_starts(backend, case):
    mark = len(backend.log())
    kick = _eventfds(1)
    try:
        with _with_memory(backend) as fe:
            fe.call(R.SET_VRING_NUM, VringState(0, 64))
            fe.call(R.SET_VRING_BASE, VringState(0, 0))
            desc, avail, used = RING_ADDRESSES[case](fe.ram)
            answers = _start_answers(fe, desc, avail, used, kick[0])
            assert any(answers), "a ring outside guest memory was started"
            assert _alive_session(fe)
    finally:
        _close(kick)
    _after_case(backend, mark, "failed")


# -- packed rings ------------------------------------------------------------------------------

PACKED = 1 << 34     # VIRTIO_F_RING_PACKED
VERSION_1 = 1 << 32


# avail slot = size, used slot = size, both slots 0x7fff (with the wrap bits set)
@pytest.mark.parametrize("base", [0x8000_8040, 0x8040_8000, 0xFFFF_FFFF])
def test_hostile_packed_ring_base_beyond_the_ring_does_not_start(backend, base):
    mark = len(backend.log())
    kick = _eventfds(1)
    try:
        with _opened(bp=backend) as fe:
            fe.call(R.SET_FEATURES, U64(fe.backend_features & (VERSION_1 | PACKED)))
            fe.set_mem_table()
            fe.call(R.SET_VRING_NUM, VringState(0, 64))
            fe.call(R.SET_VRING_BASE, VringState(0, base))
            answers = _start_answers(fe, fe.ram.uaddr(0x1000), fe.ram.uaddr(0x2000),
                                     fe.ram.uaddr(0x3000), kick[0])
            assert any(answers), f"a packed ring with base {base:#x} was started"
            assert _alive_session(fe)
    finally:
        _close(kick)
    _after_case(backend, mark, "failed")


def test_no_backend_offers_per_queue_reset(backend):
    """VIRTIO_F_RING_RESET (bit 40) stays unoffered. Tried with QEMU 10 and a Linux guest
    on vhost-user-net: QEMU passes the bit through, the guest's `ethtool -G eth0 rx 64`
    resets and re-lays its rings, but QEMU tells a vhost-user back-end nothing (it only
    stops the queue for TAP), so the back-end sees the avail index jump back and the
    guest's transmit queue times out. vhost-user has no message for a queue reset."""
    with _opened(bp=backend) as fe:
        assert not fe.backend_features & (1 << 40)


# A packed inflight region (csrc/inflight_packed.c) the front-end "kept from a crash":
# version 1, 64 entries, one head in flight whose fields break one rule each.
PACKED_INFLIGHT_HEADS = {
    "id out of range": dict(id=64, num=1, last=0, next=1),
    "chain longer than the ring": dict(id=3, num=65, last=0, next=1),
    "link out of range": dict(id=3, num=2, last=1, next=4000),
    "last entry wrong": dict(id=3, num=1, last=9, next=1),
}


@pytest.mark.parametrize("case", sorted(PACKED_INFLIGHT_HEADS))
def test_hostile_packed_inflight_region_keeps_the_ring_from_starting(backend, case):
    mark = len(backend.log())
    kick = _eventfds(1)
    fe = _opened(bp=backend, owner=False)
    try:
        if not fe.backend_protocol_features & (1 << PF.INFLIGHT_SHMFD):
            pytest.skip("this back-end does not offer INFLIGHT_SHMFD")
        fe.protocol_features |= 1 << PF.INFLIGHT_SHMFD
        fe.call(R.SET_PROTOCOL_FEATURES, U64(fe.protocol_features), ack=False)
        fe.call(R.SET_OWNER)
        fe.get_inflight_fd(64)
        fd, desc = fe.inflight
        region = mmap.mmap(fd, desc.mmap_size)
        try:
            # QueueRegionPacked of queue 0: features, version 1, desc_num 64, slots 0 / wrap 1
            struct.pack_into("<QHHHHHHBB", region, 0, PACKED, 1, 64, 0, 0, 0, 0, 1, 1)
            head = PACKED_INFLIGHT_HEADS[case]
            # DescStatePacked 0: inflight, next, last, num, counter, id, flags, len, addr
            struct.pack_into("<BxHHHQHHIQ", region, 32, 1, head["next"], head["last"],
                             head["num"], 0, head["id"], 0, 16, 0x1000)
        finally:
            region.close()
        fe.call(R.SET_FEATURES, U64(fe.backend_features & (VERSION_1 | PACKED)))
        fe.set_mem_table()
        fe.call(R.SET_VRING_NUM, VringState(0, 64))
        fe.call(R.SET_VRING_BASE, VringState(0, 0x8000_8000))
        answers = _start_answers(fe, fe.ram.uaddr(0x1000), fe.ram.uaddr(0x2000),
                                 fe.ram.uaddr(0x3000), kick[0])
        assert any(answers), f"a packed ring started on a region with a head whose {case}"
        assert _alive_session(fe)
    finally:
        fe.close()
        _close(kick)
    _after_case(backend, mark, "inflight region does not match")


def test_hostile_split_ring_base_above_16_bits_is_nacked(backend):
    mark = len(backend.log())
    with _with_memory(backend) as fe:
        fe.channel.send(Message.make(R.SET_VRING_BASE, VringState(0, 0x1_0000), need_reply=True))
        _nacked(fe, R.SET_VRING_BASE)
    _after_case(backend, mark, "16-bit")


def test_hostile_ring_layout_change_on_a_running_queue_is_refused(backend):
    mark = len(backend.log())
    with Frontend(backend.socket) as fe:
        fe.negotiate(0)
        fe.set_mem_table()
        fe.setup_queue(0, 64)
        acked = fe.backend_features & (VERSION_1 | (1 << 30))
        fe.channel.send(Message.make(R.SET_FEATURES, U64(acked | PACKED), need_reply=True))
        _nacked(fe, R.SET_FEATURES)
        assert fe.stop_queue(0) == 0
    _after_case(backend, mark, "ring layout of a running queue")


# -- out of order ------------------------------------------------------------------------------

def test_hostile_vring_setup_before_set_owner_is_nacked(backend):
    mark = len(backend.log())
    kick = _eventfds(1)
    fd = _memfd(1 << 20)
    try:
        with _opened(owner=False, bp=backend) as fe:
            for request, payload, fds in [
                (R.SET_FEATURES, U64(0), ()),
                (R.SET_MEM_TABLE, MemoryTable((MemoryRegion(0, 1 << 20, 1 << 30, 0),)), (fd,)),
                (R.SET_VRING_NUM, VringState(0, 64), ()),
                (R.SET_VRING_ADDR, VringAddress(0, 0, 1 << 30, 1 << 30, 1 << 30, 0), ()),
                (R.SET_VRING_KICK, VringFdRequest.for_queue(0), (kick[0],)),
                (R.GET_VRING_BASE, VringState(0, 0), ()),
            ]:
                fe.channel.send(Message.make(request, payload, fds=fds, need_reply=True))
                _nacked(fe, request)
    finally:
        _close(kick + [fd])
    _after_case(backend, mark, "before SET_OWNER")


def test_hostile_queue_started_before_features_and_memory_does_not_run(backend):
    """QEMU sends SET_VRING_CALL before SET_FEATURES; a kick before memory must not start a ring."""
    mark = len(backend.log())
    fds = _eventfds(2)
    try:
        with _opened(bp=backend) as fe:
            fe.call(R.SET_VRING_CALL, VringFdRequest.for_queue(0), fds=(fds[0],))
            fe.call(R.SET_VRING_NUM, VringState(0, 64))
            fe.call(R.SET_VRING_ADDR, VringAddress(0, 0, 1 << 30, 1 << 30, 1 << 30, 0))
            fe.call(R.SET_VRING_KICK, VringFdRequest.for_queue(0), fds=(fds[1],))
            fe.call(R.SET_VRING_ENABLE, VringState(0, 1))
            assert fe.stop_queue(0) == 0
    finally:
        _close(fds)
    _after_case(backend, mark, None)
    assert "queue 0 started" not in backend.log()[mark:].split("front-end disconnected")[0]


# -- disconnect at every step of a QEMU-like negotiation -----------------------------------------

def _qemu_steps(fe: Frontend, extra: list, queues: int = 2) -> list:
    """QEMU 10's opening and device start (PROTOCOL-NOTES.md), as callables."""
    def set_features():
        fe.call(R.SET_FEATURES, U64(fe.backend_features & (1 << 32)))
        fe.features = fe.backend_features & (1 << 32)

    def ring(i):
        return [lambda: fe.call(R.SET_VRING_NUM, VringState(i, 64)),
                lambda: fe.call(R.SET_VRING_BASE, VringState(i, 0)),
                lambda: _ring_addr(fe, i, extra),
                lambda: fe.call(R.SET_VRING_KICK, VringFdRequest.for_queue(i), fds=(extra[i],)),
                lambda: fe.call(R.SET_VRING_ENABLE, VringState(i, 1))]

    return [
        lambda: setattr(fe, "backend_features", fe._value(R.GET_FEATURES)),
        lambda: setattr(fe, "backend_protocol_features", fe._value(R.GET_PROTOCOL_FEATURES)),
        lambda: (fe.call(R.SET_PROTOCOL_FEATURES, U64(fe.backend_protocol_features & (
            (1 << PF.REPLY_ACK) | (1 << PF.MQ) | (1 << PF.CONFIGURE_MEM_SLOTS) | (1 << PF.BACKEND_REQ)
            | (1 << PF.INFLIGHT_SHMFD))), ack=False),
            setattr(fe, "protocol_features", fe.backend_protocol_features & (
                (1 << PF.REPLY_ACK) | (1 << PF.MQ) | (1 << PF.CONFIGURE_MEM_SLOTS)
                | (1 << PF.BACKEND_REQ) | (1 << PF.INFLIGHT_SHMFD)))),
        lambda: setattr(fe, "num_queues", fe._value(R.GET_QUEUE_NUM)),
        lambda: fe.call(R.GET_MAX_MEM_SLOTS),
        lambda: _backend_req(fe, extra),
        lambda: fe.call(R.SET_OWNER),
        lambda: fe.call(R.GET_FEATURES),
        lambda: fe.call(R.SET_VRING_CALL, VringFdRequest.for_queue(0), fds=(extra[2],)),
        lambda: fe.call(R.SET_VRING_ERR, VringFdRequest.for_queue(0), fds=(extra[3],)),
        # QEMU asks only where INFLIGHT_SHMFD was negotiated (net and vsock do not offer it)
        lambda: fe.get_inflight_fd(64) if fe.protocol_features & (1 << PF.INFLIGHT_SHMFD) else None,
        set_features,
        fe.set_mem_table,
        *ring(0),
        *(ring(1) if queues > 1 else []),
        lambda: fe.stop_queue(0),
    ]


def _ring_addr(fe: Frontend, i: int, extra: list) -> None:
    gpa = fe.ram.alloc(64 * 16 + 6 + 2 * 64 + 4096, align=_PAGE)
    fe.call(R.SET_VRING_ADDR, VringAddress(i, 0, fe.ram.uaddr(gpa), fe.ram.uaddr(gpa + 2048),
                                           fe.ram.uaddr(gpa + 1024), 0))


def _backend_req(fe: Frontend, extra: list) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    extra.append(ours)
    try:
        fe.call(R.SET_BACKEND_REQ_FD, fds=(theirs.fileno(),))
    finally:
        theirs.close()


def test_hostile_disconnect_at_every_negotiation_step(backend):
    mark = len(backend.log())
    probe_fe = Frontend(backend.socket)
    queues = backend.extra["queues"]
    total = len(_qemu_steps(probe_fe, [], queues))
    probe_fe.close()
    for stop_after in range(total + 1):
        extra = _eventfds(4)
        fe = Frontend(backend.socket)
        try:
            for step in _qemu_steps(fe, extra, queues)[:stop_after]:
                step()
        except FrontendError as exc:
            raise AssertionError(f"step {stop_after} refused: {exc}") from None
        finally:
            fe.close()
            for item in extra:
                item.close() if isinstance(item, socket.socket) else os.close(item)
        baseline = backend.extra["baseline"]
        assert _settled_fd_count(backend, baseline) == baseline, f"fd leak after {stop_after} steps"
        assert backend.running
    _after_case(backend, mark, "front-end disconnected")
