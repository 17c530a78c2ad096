"""A hostile guest and a hostile front-end against the real vhost-user-blk process.

Every case must leave the back-end alive, log one clear line, and keep
serving: the other queue of the same connection (hostile rings), the same
connection (recoverable protocol errors), or the next connection.
"""

from __future__ import annotations

import os
import select
import socket
import struct

import pytest

from backends_proc import start_blk
from vhost_user.backends.blk.driver import BlkDriver
from vhost_user.frontend import Frontend
from vhost_user.frontend.splitring import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, append_avail, write_desc
from vhost_user.protocol import (
    HEADER_SIZE,
    FrontendRequest as R,
    HeaderFlag,
    Message,
    ProtocolFeature as PF,
    U64,
    VringState,
)

F_NEXT, F_WRITE, F_INDIRECT = DESC_F_NEXT, DESC_F_WRITE, DESC_F_INDIRECT


@pytest.fixture
def backend(sockdir, shm_image):
    bp = start_blk(sockdir, "--num-queues", "2", image=shm_image(16 << 20))
    yield bp
    bp.stop()


def _wait_readable(fd: int, timeout: float = 5.0) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


class RawRing:
    """Writes descriptors and avail entries by hand, as a malicious driver would."""

    def __init__(self, drv: BlkDriver, queue: int):
        self.drv = drv
        self.q = drv.queues[queue]
        self.ram = drv.fe.ram
        self.buf = self.ram.alloc(4096, 4096)
        self.table = self.ram.alloc(16 * 8, 16)

    def desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0, table=None) -> None:
        base = self.q.ring.desc_gpa if table is None else table
        write_desc(self.ram, base, i, addr, length, flags, nxt)

    def publish(self, head: int, avail_idx: int | None = None) -> None:
        append_avail(self.ram, self.q.ring.avail_gpa, self.q.size, head, avail_idx)
        os.eventfd_write(self.q.kick_fd, 1)


def _loop(r: RawRing):
    r.desc(0, r.buf, 16, F_NEXT, 1)
    r.desc(1, r.buf + 16, 16, F_NEXT, 0)


def _next_out_of_range(r: RawRing):
    r.desc(0, r.buf, 16, F_NEXT, r.q.size + 5)


def _nested_indirect(r: RawRing):
    r.desc(0, r.table, 32, F_INDIRECT)
    r.desc(0, r.buf, 16, F_NEXT, 1, table=r.table)
    r.desc(1, r.table, 16, F_INDIRECT, table=r.table)


def _indirect_len(r: RawRing):
    r.desc(0, r.table, 24, F_INDIRECT)


def _outside_memory(r: RawRing):
    r.desc(0, 1 << 40, 16, F_NEXT, 1)
    r.desc(1, r.buf, 1, F_WRITE)


def _len_overflow(r: RawRing):
    r.desc(0, (1 << 64) - 8, 16, F_NEXT, 1)
    r.desc(1, r.buf, 1, F_WRITE)


def _write_before_read(r: RawRing):
    r.desc(0, r.buf, 1, F_WRITE | F_NEXT, 1)
    r.desc(1, r.buf + 16, 16, 0)


HOSTILE = {
    "descriptor_loop": (_loop, None),
    "next_out_of_range": (_next_out_of_range, None),
    "nested_indirect": (_nested_indirect, None),
    "indirect_len_not_multiple_of_16": (_indirect_len, None),
    "address_outside_memory": (_outside_memory, None),
    "addr_len_overflow": (_len_overflow, None),
    "writable_before_readable": (_write_before_read, None),
    "avail_index_jump": (lambda r: r.desc(0, r.buf, 16), "jump"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_ring_breaks_only_its_queue_and_backend_keeps_serving(backend, case):
    build, mode = HOSTILE[case]
    with BlkDriver.connect(backend.socket, num_queues=2) as drv:
        drv.write(0, b"ok" * 256, queue=0)
        raw = RawRing(drv, 0)
        build(raw)
        if mode == "jump":
            avail = raw.q.ring.avail_gpa
            idx = struct.unpack("<H", raw.ram.read(avail + 2, 2))[0]
            raw.publish(0, avail_idx=(idx + raw.q.size + 1) & 0xFFFF)
        else:
            raw.publish(0)
        assert _wait_readable(raw.q.err_fd), "queue 0 did not signal its err eventfd"
        backend.wait_log("queue 0")
        # The other queue of the same device keeps working.
        assert drv.read(0, 512, queue=1) == b"ok" * 256
    assert backend.running
    with BlkDriver.connect(backend.socket, num_queues=2) as drv:
        assert drv.read(0, 512, queue=0) == b"ok" * 256


# -- hostile front-end ---------------------------------------------------------------

def _raw_frontend(bp) -> Frontend:
    fe = Frontend(bp.socket)
    fe.negotiate(1 << 32)
    return fe


def _send_raw(fe: Frontend, data: bytes, fds=()) -> None:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] if fds else []
    fe.channel.sock.sendmsg([data], anc)


def _header(request: int, size: int, flags: int = 1 | HeaderFlag.NEED_REPLY) -> bytes:
    return struct.pack("<III", request, flags, size)


def _expect_nack(fe: Frontend, request) -> None:
    reply = fe.channel.receive()
    assert reply is not None, "back-end dropped the connection instead of NACKing"
    assert reply.is_reply and reply.request == request
    assert reply.payload.value != 0


def test_unknown_request_gets_nack_and_session_continues(backend):
    with _raw_frontend(backend) as fe:
        assert fe.has_protocol_feature(PF.REPLY_ACK)
        _send_raw(fe, _header(99, 0))
        raw = fe.channel.sock.recv(HEADER_SIZE + 8, socket.MSG_WAITALL)
        request, flags, size, value = struct.unpack("<IIIQ", raw)
        assert (request, flags & HeaderFlag.REPLY, size) == (99, HeaderFlag.REPLY, 8)
        assert value != 0
        assert fe.call(R.GET_QUEUE_NUM).payload.value == 2
    backend.wait_log("99")


def test_wrong_payload_size_gets_nack_and_session_continues(backend):
    with _raw_frontend(backend) as fe:
        _send_raw(fe, _header(R.SET_VRING_NUM, 4) + b"\0" * 4)
        _expect_nack(fe, R.SET_VRING_NUM)
        assert fe.call(R.GET_QUEUE_NUM).payload.value == 2


def test_fd_on_message_that_takes_none_is_closed_and_nacked(backend):
    with _raw_frontend(backend) as fe:
        before = len(os.listdir(f"/proc/{backend.pid}/fd"))
        r, w = os.pipe()
        try:
            _send_raw(fe, _header(R.SET_VRING_NUM, 8) + struct.pack("<II", 0, 64), fds=(r,))
            _expect_nack(fe, R.SET_VRING_NUM)
        finally:
            os.close(r)
            os.close(w)
        assert len(os.listdir(f"/proc/{backend.pid}/fd")) == before


def test_vring_setup_before_set_owner_is_refused(backend):
    fe = Frontend(backend.socket)
    try:
        fe.backend_features = fe._value(R.GET_FEATURES)
        fe.protocol_features = fe._value(R.GET_PROTOCOL_FEATURES) & (1 << PF.REPLY_ACK)
        fe.call(R.SET_PROTOCOL_FEATURES, U64(fe.protocol_features), ack=False)
        fe.channel.send(Message.make(R.SET_VRING_NUM, VringState(0, 64), need_reply=True))
        _expect_nack(fe, R.SET_VRING_NUM)
    finally:
        fe.close()
    backend.wait_log("before SET_OWNER")


@pytest.mark.parametrize("state", [VringState(7, 64), VringState(0, 1 << 20), VringState(0, 100)])
def test_bad_queue_index_or_size_is_refused(backend, state):
    with _raw_frontend(backend) as fe:
        fe.channel.send(Message.make(R.SET_VRING_NUM, state, need_reply=True))
        _expect_nack(fe, R.SET_VRING_NUM)


def test_bad_version_drops_connection_and_next_one_works(backend):
    with _raw_frontend(backend) as fe:
        _send_raw(fe, _header(R.GET_FEATURES, 0, flags=2))
        assert fe.channel.receive() is None
    with BlkDriver.connect(backend.socket) as drv:
        drv.read(0, 512)


def test_oversized_payload_drops_connection_and_next_one_works(backend):
    with _raw_frontend(backend) as fe:
        _send_raw(fe, _header(R.SET_CONFIG, 1 << 20))
        assert fe.channel.receive() is None
    with BlkDriver.connect(backend.socket) as drv:
        drv.read(0, 512)


def test_mem_table_with_overlapping_regions_is_refused(backend):
    from vhost_user.protocol import MemoryRegion, MemoryTable

    with _raw_frontend(backend) as fe:
        fds = []
        for _ in range(2):
            fd = os.memfd_create("r")
            os.ftruncate(fd, 1 << 20)
            fds.append(fd)
        try:
            table = MemoryTable((MemoryRegion(0, 1 << 20, 1 << 30, 0),
                                 MemoryRegion(1 << 19, 1 << 20, 1 << 31, 0)))
            fe.channel.send(Message.make(R.SET_MEM_TABLE, table, fds=tuple(fds), need_reply=True))
            _expect_nack(fe, R.SET_MEM_TABLE)
        finally:
            for fd in fds:
                os.close(fd)


def test_region_beyond_its_fd_is_refused(backend):
    from vhost_user.protocol import MemoryRegion, SingleMemoryRegion

    with _raw_frontend(backend) as fe:
        fd = os.memfd_create("r")
        os.ftruncate(fd, 1 << 20)
        try:
            fe.channel.send(Message.make(R.ADD_MEM_REG, SingleMemoryRegion(
                MemoryRegion(0, 16 << 20, 1 << 30, 0)), fds=(fd,), need_reply=True))
            _expect_nack(fe, R.ADD_MEM_REG)
        finally:
            os.close(fd)


def test_disconnect_at_every_negotiation_step_leaves_backend_serving(backend):
    steps = [R.GET_FEATURES, R.GET_PROTOCOL_FEATURES, R.SET_OWNER, R.GET_QUEUE_NUM]
    for n in range(len(steps) + 1):
        fe = Frontend(backend.socket)
        for req in steps[:n]:
            if req in (R.SET_OWNER,):
                fe.call(req, ack=False)
            else:
                fe.call(req)
        fe.close()
    with BlkDriver.connect(backend.socket, num_queues=2) as drv:
        drv.write(0, b"x" * 512, queue=1)
        assert drv.read(0, 512) == b"x" * 512
    assert backend.running
