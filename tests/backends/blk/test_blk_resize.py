"""vhost-user-blk online resize and cache mode, against the real back-end process.

Resize: the image grows or shrinks on the host, SIGHUP makes the back-end
read its size again; the front-end gets BACKEND_CONFIG_CHANGE_MSG on the
back-end channel, config space shows the new capacity, and the engines serve
exactly the new range. Cache mode (VIRTIO_BLK_F_CONFIG_WCE): the driver's
write of the `writeback` byte, and writethrough's fdatasync per write.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import pytest

from backends_proc import require_tool, start_blk
from vhost_user.backends.blk.config import CONFIG_SPACE_SIZE, BlkConfig
from vhost_user.backends.blk.driver import BlkDriver, BlkIOError
from vhost_user.backends.blk.request import BlkFeature, Status
from vhost_user.protocol import BackendRequest

MiB = 1 << 20
WRITEBACK_OFFSET = 32  # virtio 1.2, 5.2.4


@pytest.fixture
def disk(sockdir, shm_image):
    image = shm_image(16 * MiB)
    bp = start_blk(sockdir, image=image)
    yield bp, image
    bp.stop()


def _wait_log(bp, pattern: str, timeout: float = 10.0) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(pattern, bp.log())
        if m:
            return m
        time.sleep(0.05)
    raise AssertionError(f"{pattern!r} not in back-end log:\n{bp.log()[-3000:]}")


def _config(drv: BlkDriver) -> BlkConfig:
    return BlkConfig.unpack(drv.fe.get_config(CONFIG_SPACE_SIZE))


def _resize(bp, drv: BlkDriver, image: str, size: int) -> BlkConfig:
    """Truncate the image, SIGHUP the back-end, expect the config-change message."""
    os.truncate(image, size)
    bp.proc.send_signal(signal.SIGHUP)
    msg = drv.fe.backend_request(timeout=10.0)
    assert msg is not None, bp.log()
    assert msg.request == BackendRequest.BACKEND_CONFIG_CHANGE_MSG
    return _config(drv)


def test_blk_grow_sends_config_change_and_serves_the_new_sectors(disk):
    bp, image = disk
    with BlkDriver.connect(bp.socket) as drv:
        old = drv.config.capacity
        assert old == 16 * MiB // 512
        with pytest.raises(BlkIOError):
            drv.write(old, b"n" * 512)
        cfg = _resize(bp, drv, image, 32 * MiB)
        assert cfg.capacity == 32 * MiB // 512
        data = os.urandom(4096)
        drv.write(cfg.capacity - 8, data)  # the last 4 KiB of the grown disk
        assert drv.read(cfg.capacity - 8, 4096) == data
        drv.write(old, b"n" * 512)  # the first sector that was past the end
        with pytest.raises(BlkIOError) as err:
            drv.read(cfg.capacity, 512)
        assert err.value.status == Status.IOERR
    with open(image, "rb") as f:
        f.seek(32 * MiB - 4096)
        assert f.read(4096) == data
    assert f"{old} -> {32 * MiB // 512} sectors" in bp.log()


def test_blk_shrink_fails_requests_past_the_new_end(disk):
    bp, image = disk
    with BlkDriver.connect(bp.socket) as drv:
        drv.write(0, b"k" * 512)
        cfg = _resize(bp, drv, image, 8 * MiB)
        assert cfg.capacity == 8 * MiB // 512
        for sector in (cfg.capacity, 16 * MiB // 512 - 1):
            with pytest.raises(BlkIOError) as err:
                drv.write(sector, b"x" * 512)
            assert err.value.status == Status.IOERR
        with pytest.raises(BlkIOError):
            drv.read(cfg.capacity - 1, 1024)  # crosses the new end
        with pytest.raises(BlkIOError):
            drv.write_zeroes(cfg.capacity - 8, 16)
        drv.read(cfg.capacity - 1, 512)
        assert drv.read(0, 512) == b"k" * 512
    assert os.path.getsize(image) == 8 * MiB  # nothing wrote past the new end
    assert f"{16 * MiB // 512} -> {8 * MiB // 512} sectors" in bp.log()


def test_blk_resize_reaches_every_queue_and_the_next_session(sockdir, shm_image):
    image = shm_image(16 * MiB)
    bp = start_blk(sockdir, "--num-queues", "2", image=image)
    try:
        with BlkDriver.connect(bp.socket, num_queues=2) as drv:
            cfg = _resize(bp, drv, image, 24 * MiB)
            for q in (0, 1):
                drv.write(cfg.capacity - 1, b"q" * 512, queue=q)
                with pytest.raises(BlkIOError):
                    drv.write(cfg.capacity, b"q" * 512, queue=q)
        with BlkDriver.connect(bp.socket) as drv:
            assert drv.config.capacity == 24 * MiB // 512
            drv.read(24 * MiB // 512 - 1, 512)
    finally:
        bp.stop()


def test_blk_sighup_keeps_serving_when_the_size_is_unchanged(disk):
    bp, _ = disk
    with BlkDriver.connect(bp.socket) as drv:
        bp.proc.send_signal(signal.SIGHUP)
        _wait_log(bp, r"still 32768 sectors")
        assert _config(drv).capacity == 32768
        drv.read(0, 512)
    assert bp.running


def test_blk_sighup_on_the_in_memory_disk_says_it_cannot_resize(sockdir):
    bp = start_blk(sockdir, "--size", "8M")
    try:
        with BlkDriver.connect(bp.socket) as drv:
            bp.proc.send_signal(signal.SIGHUP)
            _wait_log(bp, r"in-memory disk has a fixed size")
            assert _config(drv).capacity == 8 * MiB // 512
            drv.write(0, b"m" * 512)
        assert bp.running
    finally:
        bp.stop()


# -- cache mode ---------------------------------------------------------------------------

def test_blk_offers_config_wce_and_starts_in_writeback(disk):
    bp, _ = disk
    with BlkDriver.connect(bp.socket) as drv:
        assert drv.fe.has_feature(BlkFeature.CONFIG_WCE)
        assert drv.config.writeback == 1


def test_blk_set_config_writethrough_reads_back(disk):
    bp, _ = disk
    with BlkDriver.connect(bp.socket) as drv:
        drv.fe.set_config(WRITEBACK_OFFSET, b"\0")
        assert _config(drv).writeback == 0
        _wait_log(bp, r"cache mode: writethrough")
        drv.fe.set_config(WRITEBACK_OFFSET, b"\1")
        assert _config(drv).writeback == 1
    with BlkDriver.connect(bp.socket) as drv:  # a new driver starts in writeback again
        assert drv.config.writeback == 1


def _count_fdatasync(bp, drv: BlkDriver, writes: int, size: int = 4096) -> int:
    """fdatasync calls the back-end makes while `writes` writes of `size` bytes complete."""
    strace = require_tool("strace")
    out = os.path.join(os.path.dirname(bp.log_path), "strace.out")
    tracer = subprocess.Popen([strace, "-f", "-qq", "-e", "trace=fdatasync", "-o", out,
                               "-p", str(bp.pid)], stderr=subprocess.PIPE)
    try:
        # strace has attached to every thread once the worker's status shows a tracer.
        deadline = time.monotonic() + 10
        while not _traced(bp.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _traced(bp.pid), "strace did not attach"
        for i in range(writes):
            drv.write(i * (size // 512), os.urandom(size))
    finally:
        tracer.send_signal(signal.SIGINT)
        tracer.wait(10)
    with open(out) as f:
        return sum(1 for line in f if "fdatasync(" in line)


def _traced(pid: int) -> bool:
    tasks = os.listdir(f"/proc/{pid}/task")
    for tid in tasks:
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            if "TracerPid:\t0\n" in f.read():
                return False
    return bool(tasks)


def test_blk_writethrough_syncs_every_write_before_completing_it(disk):
    bp, _ = disk
    with BlkDriver.connect(bp.socket) as drv:
        drv.write(0, b"w" * 512)  # the queue's worker thread exists
        assert _count_fdatasync(bp, drv, 4) == 0  # writeback: only a flush syncs
        drv.fe.set_config(WRITEBACK_OFFSET, b"\0")
        assert _count_fdatasync(bp, drv, 4) == 4


def test_blk_writethrough_syncs_large_writes_the_io_pool_carries(sockdir, shm_image):
    """A 256 KiB write is split over the I/O threads: in writethrough it still
    completes only after a sync (one per job, here one write per job)."""
    bp = start_blk(sockdir, "--io-threads", "2", image=shm_image(16 * MiB))
    try:
        with BlkDriver.connect(bp.socket) as drv:
            drv.write(0, b"w" * 512)
            drv.fe.set_config(WRITEBACK_OFFSET, b"\0")
            assert _count_fdatasync(bp, drv, 3, size=256 << 10) == 3
            [served] = bp.log_stats().values()  # keyed by the socket path
            assert served["queues"]["0"]["pooled"] == 3
    finally:
        bp.stop()
