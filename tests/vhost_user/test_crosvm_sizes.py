"""What crosvm does that QEMU does not, against every real back-end process.

crosvm offers every virtqueue at 32768 entries unless the user passes
`max-queue-size=` (there is no message to learn a back-end's limit), and a
Linux guest takes that size; it reads config space in 4-byte pieces at any
offset, before SET_FEATURES and before any memory table, on every device
type, and takes `hdr.size - 12` bytes of the reply. Each back-end here runs
with its defaults and is driven through real I/O on 32768-entry queues; the
config reads go through the front-end's CROSVM profile. The whole crosvm
message profile (order, memory table, no NEED_REPLY, sleep/wake) is tested
in test_crosvm_profile.py.
"""

from __future__ import annotations

import os
import sys

from backends_proc import spawn
from vhost_user.backends.gpu.commands import CtrlType as T, Format, Rect
from vhost_user.backends.gpu.display_protocol import GpuRequest as G
from vhost_user.backends.blk.driver import BlkDriver
from vhost_user.backends.gpu.driver import GpuDriver
from vhost_user.backends.net.driver import NetDriver
from vhost_user.backends.vsock.driver import VsockDriver
from vhost_user.frontend import CROSVM, Frontend
from vsock_proc import host_listener

BIG = 32768


def _start(sockdir, module: str, *args: str, name: str):
    sock = os.path.join(sockdir, f"{name}.sock")
    argv = [sys.executable, "-m", f"vhost_user.backends.{module}", "--socket", sock, *args]
    return spawn(argv, sock, os.path.join(sockdir, f"{name}.log")), sock


def _config_like_crosvm(sock: str, length: int) -> bytes:
    """crosvm's opening, then 4-byte GET_CONFIG reads at every offset (the profile
    checks that each reply echoes offset and size), before any SET_FEATURES."""
    fe = Frontend(sock, profile=CROSVM)
    try:
        fe.negotiate(0)
        return fe.get_config(length)
    finally:
        fe.close()


def test_blk_serves_32768_entry_queues_by_default(sockdir):
    bp, sock = _start(sockdir, "blk", "--size", "16M", name="blk")
    try:
        assert len(_config_like_crosvm(sock, 24)) == 24
        with BlkDriver.connect(sock, queue_size=BIG) as drv:
            data = os.urandom(64 << 10)
            drv.write(2048, data)
            assert drv.read(2048, len(data)) == data
    finally:
        bp.stop()


def test_net_config_space_and_32768_entry_queues(sockdir):
    sock_b = os.path.join(sockdir, "net1.sock")
    bp, sock = _start(sockdir, "net", "--socket", sock_b, name="net0")
    try:
        space = _config_like_crosvm(sock, 12)
        mac, status, pairs = space[:6], int.from_bytes(space[6:8], "little"), int.from_bytes(space[8:10], "little")
        assert mac[0] & 1 == 0 and mac[0] & 2 == 2, mac.hex()  # unicast, locally administered
        assert status == 1 and pairs == 1
        assert _config_like_crosvm(sock, 12)[:6] == mac, "the MAC must be stable"
        assert _config_like_crosvm(sock_b, 12)[:6] != mac, "each port has its own MAC"
        from scapy.layers.l2 import Ether
        a, b = NetDriver.connect(sock, queue_size=BIG, ram_size=256 << 20), \
            NetDriver.connect(sock_b, queue_size=BIG, ram_size=256 << 20)
        try:
            b.fill_rx()  # a guest takes the full size and posts every buffer
            frame = bytes(Ether(src="02:00:00:00:00:01", dst="ff:ff:ff:ff:ff:ff") / (b"y" * 200))
            a.send(frame)
            assert [f for _, f in b.recv()] == [frame]
        finally:
            a.close()
            b.close()
    finally:
        bp.stop()


def test_vsock_serves_32768_entry_queues_by_default(sockdir):
    uds = os.path.join(sockdir, "vm3.vsock")
    bp, sock = _start(sockdir, "vsock", "--guest-cid", "3", "--uds-path", uds, name="vm3")
    try:
        assert int.from_bytes(_config_like_crosvm(sock, 8), "little") == 3
        listener = host_listener(uds + "_5000")
        with VsockDriver.attach(sock, queue_size=BIG) as drv:
            g = drv.connect(5000)
            h, _ = listener.accept()
            g.send(b"32768 entries")
            assert h.recv(100) == b"32768 entries"
    finally:
        bp.stop()


def test_gpu_serves_32768_entry_queues(sockdir):
    bp, sock = _start(sockdir, "gpu", name="gpu")
    try:
        assert len(_config_like_crosvm(sock, 16)) == 16
        with GpuDriver.connect(sock, queue_size=BIG) as drv:
            assert drv.create_2d(1, 4, 4, Format.B8G8R8X8_UNORM) == T.RESP_OK_NODATA
            b = drv.alloc_backing(64)
            drv.write_backing(b, b"\x05" * 64)
            assert drv.attach_backing(1, b) == T.RESP_OK_NODATA
            assert drv.set_scanout(0, 1, Rect(0, 0, 4, 4)) == T.RESP_OK_NODATA
            assert drv.transfer(1, Rect(0, 0, 4, 4)) == T.RESP_OK_NODATA
            assert drv.flush(1, Rect(0, 0, 4, 4)) == T.RESP_OK_NODATA
            assert drv.listener.wait_for(G.UPDATE, 1)
    finally:
        bp.stop()


def test_a_queue_size_beyond_the_limit_is_refused_with_a_reply_and_a_log_line(sockdir):
    import pytest
    from vhost_user.frontend import FrontendError

    bp, sock = _start(sockdir, "blk", "--size", "16M", "--queue-size", "256", "-v", name="blk")
    try:
        with pytest.raises(FrontendError):
            BlkDriver.connect(sock, queue_size=512)  # REPLY_ACK + NEED_REPLY: refused at once
        assert "size 512 is not a power of two in 1..256" in bp.log()
        with BlkDriver.connect(sock, queue_size=256) as drv:  # and it keeps serving
            drv.write(0, b"z" * 4096)
            assert drv.read(0, 4096) == b"z" * 4096
    finally:
        bp.stop()
