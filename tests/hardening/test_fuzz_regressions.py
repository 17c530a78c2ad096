"""Bugs the fuzzers found, each pinned by a test against the codec and the real back-end.

The `session` fuzz target found both: a refused GET_INFLIGHT_FD or
SET_DEVICE_STATE_FD got an error reply the codec would not encode, so the
connection died on an exception instead of answering (the front-end waited
for a reply that never came). The raw inputs are in fuzz/regressions/session/.
"""
from __future__ import annotations

import os
import select
import socket
import struct

import pytest

from backends_proc import start_blk
from vhost_user.frontend import Frontend
from vhost_user.protocol import (
    HEADER_SIZE,
    FrontendRequest as R,
    HeaderFlag,
    InflightDescription,
    Message,
    MessageDecoder,
    ProtocolFeature as PF,
    U64,
    encode,
)


@pytest.fixture
def backend(sockdir):
    bp = start_blk(sockdir, "--size", "8M")
    yield bp
    assert bp.stop() == 0, bp.log()[-3000:]


def _reply(fe: Frontend) -> tuple[int, int, bytes, list[int]]:
    sock = fe.channel.sock
    assert select.select([sock], [], [], 10)[0], "no reply: the front-end would wait forever"
    data, anc, _, _ = sock.recvmsg(HEADER_SIZE + 64, socket.CMSG_SPACE(4 * 4))
    fds = [fd for level, kind, blob in anc if kind == socket.SCM_RIGHTS
           for fd in struct.unpack(f"{len(blob) // 4}i", blob)]
    assert len(data) >= HEADER_SIZE, "the back-end hung up instead of answering"
    request, flags, size = struct.unpack_from("<III", data)
    return request, flags, data[HEADER_SIZE:HEADER_SIZE + size], fds


def test_zero_size_get_inflight_fd_reply_needs_no_fd_in_the_codec():
    request = Message.make(R.GET_INFLIGHT_FD, InflightDescription(0, 0, 0, 0))
    data, fds = encode(request.reply(InflightDescription(0, 0, 0, 0)))
    assert fds == ()
    decoder = MessageDecoder.for_frontend()
    decoder.feed(data)
    assert decoder.next_message().payload.mmap_size == 0


def test_refused_get_inflight_fd_gets_a_zero_size_reply_and_the_session_goes_on(backend):
    with Frontend(backend.socket) as fe:
        fe.negotiate(0)
        assert fe.has_protocol_feature(PF.INFLIGHT_SHMFD)
        fe.channel.send(Message.make(R.GET_INFLIGHT_FD, InflightDescription(0, 0, 0, 64)))
        request, flags, body, fds = _reply(fe)
        assert (request, bool(flags & HeaderFlag.REPLY), fds) == (R.GET_INFLIGHT_FD, True, [])
        assert InflightDescription.unpack(body).mmap_size == 0
        assert fe.call(R.GET_QUEUE_NUM).payload.value == 1
    assert "GET_INFLIGHT_FD failed" in backend.log()
    assert backend.running


@pytest.mark.parametrize("request_", [R.SET_DEVICE_STATE_FD, R.CHECK_DEVICE_STATE])
def test_refused_device_state_request_gets_an_error_status_and_its_fd_is_closed(backend, request_):
    from vhost_user.protocol import DeviceStateTransfer

    with Frontend(backend.socket) as fe:
        fe.negotiate(0)
        assert not fe.has_protocol_feature(PF.DEVICE_STATE)
        before = len(os.listdir(f"/proc/{backend.pid}/fd"))
        r, w = os.pipe()
        try:
            if request_ == R.SET_DEVICE_STATE_FD:
                fe.channel.send(Message.make(request_, DeviceStateTransfer(0, 0), fds=(r,)))
            else:
                fe.channel.send(Message.make(request_))
            request, flags, body, fds = _reply(fe)
        finally:
            os.close(r)
            os.close(w)
        assert (request, bool(flags & HeaderFlag.REPLY), fds) == (request_, True, [])
        assert U64.unpack(body).value & 0xFF != 0, "a refused device-state request reported success"
        assert fe.call(R.GET_QUEUE_NUM).payload.value == 1
        assert len(os.listdir(f"/proc/{backend.pid}/fd")) == before
    assert f"{request_.name} failed" in backend.log()
