"""A hostile front-end writing blk config space: only the `writeback` byte is writable.

Every refused write is NACKed (QEMU's profile asks for REPLY_ACK), logged in
one line, changes nothing in config space, and the back-end goes on serving
the same connection and the next one.
"""

from __future__ import annotations

import struct
import time

import pytest

from backends_proc import start_blk
from vhost_user.backends.blk.config import CONFIG_SPACE_SIZE, BlkConfig
from vhost_user.backends.blk.driver import DRIVER_FEATURES, BlkDriver
from vhost_user.backends.blk.request import BlkFeature
from vhost_user.frontend.connection import FrontendError
from vhost_user.protocol import FrontendRequest as R, HeaderFlag

WRITEBACK_OFFSET = 32


@pytest.fixture
def backend(sockdir, shm_image):
    bp = start_blk(sockdir, image=shm_image(16 << 20))
    yield bp
    bp.stop()


def _wait_log(bp, needle: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if needle in bp.log():
            return
        time.sleep(0.05)
    raise AssertionError(f"{needle!r} not in back-end log:\n{bp.log()[-3000:]}")


def _space(drv: BlkDriver) -> bytes:
    return drv.fe.get_config(CONFIG_SPACE_SIZE)


@pytest.mark.parametrize("offset, data, why", [
    (0, struct.pack("<Q", 1 << 40), "only the writeback byte"),          # capacity
    (WRITEBACK_OFFSET, b"\0\0", "only the writeback byte"),              # writeback + unused0
    (WRITEBACK_OFFSET - 1, b"\0", "only the writeback byte"),
    (WRITEBACK_OFFSET + 1, b"\0", "only the writeback byte"),
    (CONFIG_SPACE_SIZE, b"\0", "only the writeback byte"),               # past the space
    (0xFFFFFFFF, b"\0", "only the writeback byte"),                      # offset + size wraps u32
    (0, bytes(CONFIG_SPACE_SIZE), "only the writeback byte"),            # the whole space
    (WRITEBACK_OFFSET, b"\x07", "must be 0 (writethrough) or 1"),
])
def test_config_write_outside_writeback_is_refused(backend, offset, data, why):
    with BlkDriver.connect(backend.socket) as drv:
        before = _space(drv)
        with pytest.raises(FrontendError):
            drv.fe.set_config(offset, data)
        assert _space(drv) == before
        drv.write(0, b"s" * 512)
    _wait_log(backend, why)
    with BlkDriver.connect(backend.socket) as drv:
        assert BlkConfig.unpack(_space(drv)).writeback == 1
    assert backend.running


def test_writeback_write_without_config_wce_is_refused(backend):
    features = DRIVER_FEATURES & ~(1 << BlkFeature.CONFIG_WCE)
    with BlkDriver.connect(backend.socket, features=features) as drv:
        with pytest.raises(FrontendError):
            drv.fe.set_config(WRITEBACK_OFFSET, b"\0")
        assert BlkConfig.unpack(_space(drv)).writeback == 1
        drv.read(0, 512)
    _wait_log(backend, "without VIRTIO_BLK_F_CONFIG_WCE")


@pytest.mark.parametrize("claimed, sent", [(4, 1), (1, 4), (0, 0)])
def test_config_write_whose_size_field_lies_is_refused(backend, claimed, sent):
    """SET_CONFIG whose `size` field disagrees with the bytes that follow (or is 0)."""
    with BlkDriver.connect(backend.socket) as drv:
        before = _space(drv)
        body = struct.pack("<III", WRITEBACK_OFFSET, claimed, 0) + b"\0" * sent
        header = struct.pack("<III", R.SET_CONFIG, 1 | HeaderFlag.NEED_REPLY, len(body))
        drv.fe.channel.sock.sendall(header + body)
        reply = drv.fe.channel.receive()
        # Refused either way: a NACK on this connection, or the connection dropped.
        if reply is not None:
            assert reply.request == R.SET_CONFIG and reply.payload.value != 0
            assert _space(drv) == before
    assert backend.running
    with BlkDriver.connect(backend.socket) as drv:
        assert BlkConfig.unpack(_space(drv)).writeback == 1
        drv.read(0, 512)
