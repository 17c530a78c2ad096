"""vhost-user-blk end to end: the real back-end process driven by the built-in front-end.

Tests that state plain virtio-blk semantics run against qemu-storage-daemon
too, which proves the front-end is a real front-end and not a mirror of our
back-end.
"""

from __future__ import annotations

import os
import random
import time

import pytest

from backends_proc import open_fds, start_blk, start_qsd_blk
from vhost_user.backends.blk.request import RequestType, Status
from vhost_user.backends.blk.driver import BlkDriver, BlkIOError, BlkRequest

MiB = 1 << 20


@pytest.fixture(params=["ours", "ours-disk-file", "qsd"])
def any_blk(request, sockdir, shm_image, tmp_path):
    """(socket path, image path) of a running back-end of either kind. ours-disk-file:
    the image on a disk file system, where our reads copy from a mapping of it."""
    if request.param == "ours-disk-file":
        image = str(tmp_path / "disk.img")
        with open(image, "wb") as f:
            f.truncate(64 * MiB)
    else:
        image = shm_image(64 * MiB)
    if request.param.startswith("ours"):
        bp = start_blk(sockdir, "--num-queues", "2", image=image)
    else:
        bp = start_qsd_blk(sockdir, image, num_queues=2)
    yield bp, image
    bp.stop()


def _image_bytes(image: str, offset: int, length: int) -> bytes:
    with open(image, "rb") as f:
        f.seek(offset)
        return f.read(length)


def test_blk_patterns_at_many_offsets_round_trip(any_blk):
    bp, image = any_blk
    rng = random.Random(7)
    with BlkDriver.connect(bp.socket) as drv:
        assert drv.config.capacity == 64 * MiB // 512
        for _ in range(40):
            sectors = rng.choice([1, 2, 7, 8, 64, 255, 2048])
            sector = rng.randrange(0, drv.config.capacity - sectors)
            data = rng.randbytes(sectors * 512)
            drv.write(sector, data, split=rng.choice([1, 2, 3]))
            assert drv.read(sector, len(data), split=rng.choice([1, 4])) == data
            assert _image_bytes(image, sector * 512, len(data)) == data


def test_blk_host_written_pattern_reads_back(any_blk):
    bp, image = any_blk
    data = os.urandom(MiB)
    with open(image, "r+b") as f:
        f.seek(5 * MiB)
        f.write(data)
    with BlkDriver.connect(bp.socket) as drv:
        assert drv.read(5 * MiB // 512, MiB) == data


def test_blk_flush_and_write_zeroes_succeed(any_blk):
    bp, image = any_blk
    with BlkDriver.connect(bp.socket) as drv:
        drv.write(100, b"\xab" * 8192)
        drv.flush()
        drv.write_zeroes(100, 8)
        assert drv.read(100, 8192) == b"\0" * 4096 + b"\xab" * 4096
    assert _image_bytes(image, 100 * 512, 4096) == b"\0" * 4096


def test_blk_many_requests_in_flight_complete(any_blk):
    bp, _ = any_blk
    rng = random.Random(3)
    with BlkDriver.connect(bp.socket, slots_per_queue=32, max_io=64 * 1024) as drv:
        blocks = {i: rng.randbytes(4096) for i in range(64)}
        results = drv.run([BlkRequest(RequestType.OUT, i * 8, data=d) for i, d in blocks.items()])
        assert all(status == Status.OK for status, _ in results)
        reads = drv.run([BlkRequest(RequestType.IN, i * 8, read_len=4096) for i in blocks])
        assert [data for _, data in reads] == list(blocks.values())


def test_blk_two_queues_serve_at_once(any_blk):
    bp, _ = any_blk
    with BlkDriver.connect(bp.socket, num_queues=2) as drv:
        a, b = os.urandom(4096), os.urandom(4096)
        t0 = drv.submit(BlkRequest(RequestType.OUT, 0, data=a), queue=0)
        t1 = drv.submit(BlkRequest(RequestType.OUT, 8, data=b), queue=1)
        assert [(h, s) for h, s, _ in drv.complete(0)] == [(t0, Status.OK)]
        assert [(h, s) for h, s, _ in drv.complete(1)] == [(t1, Status.OK)]
        assert drv.read(0, 4096, queue=1) == a
        assert drv.read(8, 4096, queue=0) == b


def test_blk_out_of_range_sector_gets_ioerr(any_blk):
    bp, _ = any_blk
    with BlkDriver.connect(bp.socket) as drv:
        cap = drv.config.capacity
        with pytest.raises(BlkIOError) as err:
            drv.read(cap - 1, 1024)
        assert err.value.status == Status.IOERR
        with pytest.raises(BlkIOError):
            drv.write(cap, b"\0" * 512)
        drv.read(cap - 1, 512)  # the last sector itself is fine


# -- our back-end only ------------------------------------------------------------------

@pytest.fixture
def ours(sockdir, shm_image):
    started = []

    def start(*args, image=None, size=16 * MiB):
        image = image or shm_image(size)
        bp = start_blk(sockdir, *args, image=image, name=f"blk{len(started)}")
        started.append(bp)
        return bp, image

    yield start
    for bp in started:
        bp.stop()


def test_blk_discard_punches_holes(ours):
    bp, image = ours()
    with open(image, "r+b") as f:
        f.write(os.urandom(8 * MiB))
        f.flush()
        os.fsync(f.fileno())
    before = os.stat(image).st_blocks
    with BlkDriver.connect(bp.socket) as drv:
        drv.discard(0, 4 * MiB // 512)
        assert drv.read(0, 4096) == b"\0" * 4096
    assert os.stat(image).st_blocks < before


def test_blk_write_zeroes_with_unmap_frees_blocks(ours):
    bp, image = ours()
    with BlkDriver.connect(bp.socket) as drv:
        drv.write(0, os.urandom(MiB))
        before = os.stat(image).st_blocks
        drv.write_zeroes(0, MiB // 512, unmap=True)
        assert drv.read(0, MiB) == b"\0" * MiB
    assert os.stat(image).st_blocks < before


def test_blk_read_only_rejects_writes_with_ioerr(ours):
    bp, image = ours("--read-only")
    with open(image, "r+b") as f:
        f.write(b"keep" * 128)
    with BlkDriver.connect(bp.socket) as drv:
        assert drv.read_only
        with pytest.raises(BlkIOError) as err:
            drv.write(0, b"\xff" * 512)
        assert err.value.status == Status.IOERR
        with pytest.raises(BlkIOError):
            drv.discard(0, 8)
        assert drv.read(0, 512) == b"keep" * 128
    assert _image_bytes(image, 0, 512) == b"keep" * 128


def test_blk_get_id_returns_serial(ours):
    bp, _ = ours("--serial", "disk-0042")
    with BlkDriver.connect(bp.socket) as drv:
        assert drv.get_id() == b"disk-0042".ljust(20, b"\0")


def test_blk_unknown_request_type_gets_unsupp(ours):
    bp, _ = ours()
    with BlkDriver.connect(bp.socket) as drv:
        [(status, _)] = drv.run([BlkRequest(99, 0, read_len=512)])
        assert status == Status.UNSUPP
        drv.read(0, 512)  # the queue keeps serving


def test_blk_in_memory_default_disk_serves_1g(sockdir):
    bp = start_blk(sockdir)
    try:
        with BlkDriver.connect(bp.socket) as drv:
            assert drv.config.capacity == (1 << 30) // 512
            drv.write(12345, b"x" * 4096)
            assert drv.read(12345, 4096) == b"x" * 4096
    finally:
        bp.stop()


def test_blk_logical_block_size_in_config(ours):
    bp, _ = ours("--logical-block-size", "4096")
    with BlkDriver.connect(bp.socket) as drv:
        assert drv.config.blk_size == 4096


def test_blk_set_mem_table_path_works_without_mem_slots(ours):
    bp, _ = ours()
    with BlkDriver.connect(bp.socket, use_mem_slots=False) as drv:
        drv.write(0, b"m" * 512)
        assert drv.read(0, 512) == b"m" * 512


def test_server_reconnect_serves_fresh_session_with_same_disk(ours):
    bp, _ = ours()
    with BlkDriver.connect(bp.socket) as drv:
        drv.write(64, b"persist!" * 64)
    for _ in range(3):
        with BlkDriver.connect(bp.socket) as drv:
            assert drv.read(64, 512) == b"persist!" * 64
    assert bp.running


def test_server_survives_front_end_vanishing_mid_io(ours):
    bp, _ = ours()
    drv = BlkDriver.connect(bp.socket, slots_per_queue=16)
    for i in range(16):
        drv.submit(BlkRequest(RequestType.OUT, i * 8, data=b"z" * 4096))
    drv.close()  # gone with requests in flight
    with BlkDriver.connect(bp.socket) as drv2:
        assert drv2.read(0, 512) in (b"z" * 512, b"\0" * 512)
    assert bp.running


def test_sigterm_stops_cleanly_and_removes_socket(ours):
    bp, _ = ours()
    with BlkDriver.connect(bp.socket) as drv:
        drv.read(0, 512)
    assert bp.stop() == 0
    assert not os.path.exists(bp.socket)


def test_sigterm_with_connected_front_end_stops_cleanly(ours):
    bp, _ = ours()
    drv = BlkDriver.connect(bp.socket)
    try:
        drv.read(0, 512)
        assert bp.stop() == 0
    finally:
        drv.close()
    assert not os.path.exists(bp.socket)


def test_frontend_closes_every_fd_it_opened(ours):
    bp, _ = ours()
    before = open_fds()
    for _ in range(3):
        with BlkDriver.connect(bp.socket, num_queues=1) as drv:
            drv.write(0, b"a" * 512)
    assert open_fds() == before


def test_backend_closes_fds_between_sessions(ours):
    bp, _ = ours("--num-queues", "2")
    fd_dir = f"/proc/{bp.pid}/fd"
    with BlkDriver.connect(bp.socket, num_queues=2) as drv:
        drv.write(0, b"a" * 512)
    time.sleep(0.3)
    baseline = len(os.listdir(fd_dir))
    for _ in range(5):
        with BlkDriver.connect(bp.socket, num_queues=2) as drv:
            drv.write(0, b"a" * 512)
    time.sleep(0.3)
    assert len(os.listdir(fd_dir)) == baseline


def test_blk_image_shrunk_under_a_running_back_end_fails_reads_past_its_end(sockdir, tmp_path):
    """A disk-file image (read through the back-end's mapping) is cut short on the host with
    no resize: reads of the lost pages get IOERR (SIGBUS caught), the back-end serves on."""
    image = tmp_path / "disk.img"
    data = os.urandom(8 * MiB)
    image.write_bytes(data)
    bp = start_blk(sockdir, image=str(image))
    try:
        with BlkDriver.connect(bp.socket) as drv:
            assert drv.read(4 * MiB // 512, 4096) == data[4 * MiB: 4 * MiB + 4096]
            os.truncate(image, 2 * MiB)
            for sector in (4 * MiB // 512, 6 * MiB // 512):
                with pytest.raises(BlkIOError) as err:
                    drv.read(sector, 4096)
                assert err.value.status == Status.IOERR
            assert drv.read(8, 4096) == data[4096:8192]
            [served] = bp.log_stats().values()  # while the queue runs
            assert served["queues"]["0"]["map_faults"] == 2, bp.explain("map_faults")
            # a large read of cached pages is copied too: mincore passes the sandbox
            mapped = served["queues"]["0"]["mapped_reads"]
            assert drv.read(0, MiB) == data[:MiB]
            [served] = bp.log_stats().values()
            assert served["queues"]["0"]["mapped_reads"] == mapped + 1, bp.explain("mapped_reads")
        assert bp.proc.poll() is None
    finally:
        bp.stop()
