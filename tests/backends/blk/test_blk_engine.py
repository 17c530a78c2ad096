"""The native virtio-blk engine, driven through a split ring by a worker thread."""
from __future__ import annotations

import os
import random
import struct
import subprocess

import pytest

from backends_proc import on_ram_fs
from ringlayout import GuestRam, SplitRing, count_events, wait_for
from vhost_user.errors import VirtqueueError
from vhost_user.backends.blk.engine import BlkEngine
from vhost_user.virtqueue import Virtqueue

MB = 1 << 20
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
DISK = 8 * MB
CAPACITY = DISK // 512


class BlkRig:
    """Guest RAM + ring + Virtqueue(BlkEngine) + a driver that submits requests."""

    def __init__(self, fd: int, *, read_only=False, num=64, serial=b"SN-1234", direct=False,
                 layout=((0, 8 * MB), (8 * MB, 8 * MB)), io_threads=0, map_reads=True):
        self.ram = GuestRam(list(layout))
        self.ring = SplitRing(self.ram, num)
        self.fd = fd
        self.engine = BlkEngine(fd, CAPACITY, read_only=read_only, serial=serial,
                                max_discard_sectors=1 << 20, max_discard_seg=16,
                                max_write_zeroes_sectors=1 << 20, max_write_zeroes_seg=16,
                                direct=direct, io_threads=io_threads, map_reads=map_reads)
        self.vq = Virtqueue(0)
        self.ring.setup(self.vq)
        self.kick = os.eventfd(0, os.EFD_CLOEXEC)
        self.call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.vq.set_kick(os.dup(self.kick))
        self.vq.set_call(os.dup(self.call))
        self.mem = self.ram.memory()
        self.vq.start(self.mem, self.engine)
        self.rng = random.Random(1)

    def close(self):
        self.vq.close()
        self.mem.close()
        self.ram.close()
        os.close(self.kick)
        os.close(self.call)

    # -- building requests ----------------------------------------------------------------
    def split(self, gpa: int, n: int, pieces: int) -> list[tuple[int, int]]:
        if pieces <= 1 or n < pieces:
            return [(gpa, n)]
        cuts = sorted(self.rng.sample(range(1, n), pieces - 1))
        edges = [0] + cuts + [n]
        return [(gpa + a, b - a) for a, b in zip(edges, edges[1:])]

    def header(self, type_: int, sector: int = 0, split: int = 1) -> list[tuple[int, int]]:
        h = self.ram.alloc(16)
        self.ram.write(h, struct.pack("<IIQ", type_, 0, sector))
        return self.split(h, 16, split)

    def submit(self, readable, writable) -> tuple[int, int]:
        """Publish one chain, kick, wait; returns (status byte, used len)."""
        head = self.ring.add_chain(readable, writable)
        status_gpa = writable[-1][0] + writable[-1][1] - 1
        self.ring.publish(head)
        os.eventfd_write(self.kick, 1)
        got = []
        wait_for(lambda: got.extend(self.ring.reap()) or got)
        assert got[0][0] == head
        return self.ram.read(status_gpa, 1)[0], got[0][1]

    def status_buf(self):
        return [(self.ram.alloc(1), 1)]

    def write(self, sector: int, data: bytes, pieces: int = 1, region: int = 0):
        buf = self.ram.alloc(len(data), 1, region)
        self.ram.write(buf, data)
        return self.submit(self.header(T_OUT, sector) + self.split(buf, len(data), pieces),
                           self.status_buf())

    def read(self, sector: int, n: int, pieces: int = 1, region: int = 0):
        buf = self.ram.alloc(n, 1, region)
        st, used = self.submit(self.header(T_IN, sector), self.split(buf, n, pieces) + self.status_buf())
        return st, used, self.ram.read(buf, n)

    def dwz(self, type_: int, ranges) -> tuple[int, int]:
        body = b"".join(struct.pack("<QII", s, n, f) for s, n, f in ranges)
        buf = self.ram.alloc(len(body))
        self.ram.write(buf, body)
        return self.submit(self.header(type_) + [(buf, len(body))], self.status_buf())


@pytest.fixture(params=["shm-file", "memfd", "disk-file"])
def disk(request, tmp_path_factory):
    """The image: on tmpfs (reads with preadv) or on a disk file system (reads
    copied from the engine's mapping of it; tmp_path is not tmpfs here)."""
    if request.param == "memfd":
        fd = os.memfd_create("disk", os.MFD_CLOEXEC)
        path = None
    else:
        if request.param == "disk-file":
            d = str(tmp_path_factory.mktemp("disk"))
            if on_ram_fs(d):
                pytest.fail(f"{d} is on tmpfs or hugetlbfs: the mapped read path needs a disk file system")
        else:
            d = "/dev/shm" if os.path.isdir("/dev/shm") else str(tmp_path_factory.mktemp("disk"))
        path = os.path.join(d, f"vu-blk-test-{os.getpid()}.img")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    os.ftruncate(fd, DISK)
    yield fd
    os.close(fd)
    if path:
        os.unlink(path)


@pytest.fixture
def rig(disk):
    r = BlkRig(disk)
    yield r
    r.close()


def test_blk_write_read_patterns_at_many_offsets(rig):
    rng = random.Random(7)
    for i in range(60):
        nsec = rng.choice([1, 2, 3, 8, 17, 64, 255])
        sector = rng.randrange(0, CAPACITY - nsec)
        data = rng.randbytes(nsec * 512)
        pieces = rng.choice([1, 2, 5])
        region = i % 2
        assert rig.write(sector, data, pieces, region) == (S_OK, 1)
        assert os.pread(rig.fd, len(data), sector * 512) == data
        st, used, got = rig.read(sector, len(data), rng.choice([1, 3, 7]), 1 - region)
        assert (st, used) == (S_OK, len(data) + 1)
        assert got == data
    s = rig.vq.stats
    assert s["writes"] == 60 and s["reads"] == 60 and s["io_errors"] == 0
    assert s["bytes_written"] == s["bytes_read"] > 0
    assert s["requests"] == 120


def test_blk_buffer_crossing_region_boundary(rig):
    data = bytes(range(256)) * 8
    buf = 8 * MB - 1000  # crosses from region 0 into region 1
    rig.ram.write(buf, data)
    assert rig.submit(rig.header(T_OUT, 10) + [(buf, 2048)], rig.status_buf()) == (S_OK, 1)
    assert os.pread(rig.fd, 2048, 10 * 512) == data


def test_blk_split_header_and_status_in_data_descriptor(rig):
    os.pwrite(rig.fd, b"Z" * 512, 512 * 3)
    hdr = rig.header(T_IN, 3, split=3)
    buf = rig.ram.alloc(513)  # data and status byte in one descriptor
    st, used = rig.submit(hdr, [(buf, 513)])
    assert (st, used) == (S_OK, 513)
    assert rig.ram.read(buf, 512) == b"Z" * 512


def test_blk_flush(rig):
    assert rig.submit(rig.header(T_FLUSH), rig.status_buf()) == (S_OK, 1)
    assert rig.vq.stats["flushes"] == 1


def test_blk_get_id_zero_padded(rig):
    buf = rig.ram.alloc(20)
    rig.ram.write(buf, b"\xff" * 20)
    assert rig.submit(rig.header(T_GET_ID), [(buf, 20)] + rig.status_buf()) == (S_OK, 21)
    assert rig.ram.read(buf, 20) == b"SN-1234".ljust(20, b"\0")


def test_blk_unsupported_type(rig):
    assert rig.submit(rig.header(99), rig.status_buf()) == (S_UNSUPP, 1)
    assert rig.vq.stats["unsupported"] == 1


@pytest.mark.parametrize("sector,nsec", [(CAPACITY, 1), (CAPACITY - 1, 2), ((1 << 64) - 1, 1)])
def test_blk_out_of_range_sector_is_ioerr(rig, sector, nsec):
    assert rig.write(sector, b"x" * 512 * nsec)[0] == S_IOERR
    assert rig.read(sector, 512 * nsec)[0] == S_IOERR
    assert rig.dwz(T_DISCARD, [(sector, nsec, 0)])[0] == S_IOERR


def test_blk_data_not_multiple_of_512_is_ioerr(rig):
    assert rig.write(0, b"x" * 500)[0] == S_IOERR
    assert rig.read(0, 1000)[0] == S_IOERR


def test_blk_discard_punches_hole(rig):
    os.pwrite(rig.fd, os.urandom(MB), 0)
    os.fsync(rig.fd)
    before = os.fstat(rig.fd).st_blocks
    assert rig.dwz(T_DISCARD, [(0, 1024, 0), (1024, 1024, 0)]) == (S_OK, 1)
    assert os.fstat(rig.fd).st_blocks < before
    assert os.pread(rig.fd, MB, 0) == bytes(MB)


def test_blk_discard_with_unmap_flag_unsupported(rig):
    assert rig.dwz(T_DISCARD, [(0, 8, 1)])[0] == S_UNSUPP
    assert rig.dwz(T_WRITE_ZEROES, [(0, 8, 2)])[0] == S_UNSUPP


@pytest.mark.parametrize("flags", [0, 1])
def test_blk_write_zeroes(rig, flags):
    os.pwrite(rig.fd, b"\x55" * 8192, 4096)
    assert rig.dwz(T_WRITE_ZEROES, [(9, 7, flags)]) == (S_OK, 1)
    got = os.pread(rig.fd, 8192, 4096)
    assert got[:512] == b"\x55" * 512
    assert got[512:512 + 7 * 512] == bytes(7 * 512)
    assert got[512 + 7 * 512:] == b"\x55" * (8192 - 8 * 512)


def test_blk_discard_too_many_segments_is_ioerr(rig):
    assert rig.dwz(T_DISCARD, [(i, 1, 0) for i in range(17)])[0] == S_IOERR


def test_blk_read_only_rejects_writes(disk):
    os.pwrite(disk, b"R" * 512, 0)
    rig = BlkRig(disk, read_only=True)
    try:
        assert rig.write(0, b"W" * 512)[0] == S_IOERR
        assert rig.dwz(T_DISCARD, [(0, 1, 0)])[0] == S_IOERR
        assert rig.dwz(T_WRITE_ZEROES, [(0, 1, 0)])[0] == S_IOERR
        assert rig.read(0, 512)[:2] == (S_OK, 513)
        assert rig.submit(rig.header(T_FLUSH), rig.status_buf())[0] == S_OK
        assert os.pread(disk, 512, 0) == b"R" * 512
    finally:
        rig.close()


def test_blk_io_error_keeps_queue_running(tmp_path):
    path = tmp_path / "ro.img"
    path.write_bytes(bytes(DISK))
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # writes fail with EBADF
    rig = BlkRig(fd)
    try:
        assert rig.write(0, b"x" * 512)[0] == S_IOERR
        assert rig.read(0, 512)[0] == S_OK
        assert rig.vq.stats["io_errors"] == 1
        assert not rig.vq.broken
    finally:
        rig.close()
        os.close(fd)


def test_blk_short_file_read_is_ioerr(disk):
    os.ftruncate(disk, 4096)  # capacity says 8 MiB, the file ends earlier
    rig = BlkRig(disk)
    try:
        assert rig.read(4, 1024)[0] == S_OK
        assert rig.read(100, 512)[0] == S_IOERR
    finally:
        rig.close()


def test_blk_chain_without_status_byte_breaks_queue(rig):
    head = rig.ring.add_chain(rig.header(T_FLUSH), [])
    rig.ring.publish(head)
    os.eventfd_write(rig.kick, 1)
    wait_for(lambda: rig.vq.broken)
    assert isinstance(rig.vq.failure, VirtqueueError)
    assert "without status byte on queue 0" in rig.vq.error
    assert rig.vq.stop() == 1


def test_blk_notifies_once_per_batch(rig):
    heads = []
    for i in range(10):
        buf = rig.ram.alloc(512)
        heads.append(rig.ring.add_chain(rig.header(T_OUT, i) + [(buf, 512)], rig.status_buf()))
    rig.ring.publish(*heads)
    os.eventfd_write(rig.kick, 1)
    wait_for(lambda: rig.ring.used_idx == 10)
    assert count_events(rig.call) == 1


def _direct_image(tmp_path) -> int:
    """A copy of DISK opened with O_DIRECT (skips where the file system refuses it)."""
    path = tmp_path / "direct.img"
    path.write_bytes(bytes(DISK))
    try:
        return os.open(path, os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:
        pytest.skip("O_DIRECT not supported here")


def test_blk_direct_engine_aligned_and_misaligned(tmp_path):
    fd = _direct_image(tmp_path)
    rig = BlkRig(fd, direct=True)
    try:
        data = os.urandom(8192)
        buf = rig.ram.alloc(8192 + 3, 4096) + 3  # misaligned guest buffer
        rig.ram.write(buf, data)
        assert rig.submit(rig.header(T_OUT, 8) + [(buf, 8192)], rig.status_buf()) == (S_OK, 1)
        st, used, got = rig.read(8, 8192)
        assert (st, got) == (S_OK, data)
        out = rig.ram.alloc(8192 + 5, 4096) + 5
        st, used = rig.submit(rig.header(T_IN, 8), [(out, 8192)] + rig.status_buf())
        assert st == S_OK and rig.ram.read(out, 8192) == data
    finally:
        rig.close()
        os.close(fd)


def test_blk_engine_validates_config():
    with pytest.raises(ValueError):
        BlkEngine(-1, 10)
    with pytest.raises(ValueError):
        BlkEngine(0, 10, serial=b"x" * 21)
    with pytest.raises(ValueError):
        BlkEngine(0, 10, logical_block_size=1000)


def test_blk_rig_lifecycle_leaks_no_fds(fd_check):
    fd = os.memfd_create("disk", os.MFD_CLOEXEC)
    os.ftruncate(fd, DISK)
    for _ in range(3):
        rig = BlkRig(fd)
        assert rig.write(0, b"q" * 4096)[0] == S_OK
        rig.vq.update_memory(new := rig.ram.memory())
        rig.mem.close()
        rig.mem = new
        assert rig.read(0, 4096)[2] == b"q" * 4096
        rig.close()
    os.close(fd)


# -- the I/O pool (--io-threads): large requests split over C threads -----------------------

def _pool_threads() -> int:
    n = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                n += f.read().strip() == "blk-io"
        except OSError:
            continue
    return n


def _mixed_pieces(rig, gpa: int, n: int) -> list[tuple[int, int]]:
    """Segments of mixed sizes (odd ones too) so cuts at 4 KiB multiples fall inside them."""
    sizes, left = [], n
    for size in (512, 4096 * 3 + 512, 65536 - 512, 100_000, 1, 4095, 262_144 + 7):
        if left <= size:
            break
        sizes.append(size)
        left -= size
    sizes.append(left)
    out, at = [], gpa
    for size in sizes:
        out.append((at, size))
        at += size
    return out


@pytest.mark.parametrize("io_threads", [0, 1, 3])
@pytest.mark.parametrize("length", [MB, MB + 512, 128 * 1024, 3 * MB - 512])
def test_blk_large_requests_match_the_image_with_and_without_the_pool(disk, io_threads, length):
    rig = BlkRig(disk, io_threads=io_threads)
    try:
        data = random.Random(length).randbytes(length)
        buf = rig.ram.alloc(length, 1)
        rig.ram.write(buf, data)
        sector = 17
        st, _ = rig.submit(rig.header(T_OUT, sector) + _mixed_pieces(rig, buf, length), rig.status_buf())
        assert st == S_OK
        assert os.pread(disk, length, sector * 512) == data
        os.pwrite(disk, data[::-1], sector * 512)  # the image changes under the guest: reads see it
        out = rig.ram.alloc_guarded(length)
        st, used = rig.submit(rig.header(T_IN, sector), _mixed_pieces(rig, out, length) + rig.status_buf())
        assert (st, used) == (S_OK, length + 1)
        assert rig.ram.read(out, length) == data[::-1]
        rig.ram.check_guards()
        assert rig.engine.stats["pooled"] == (2 if io_threads else 0)
    finally:
        rig.close()


def test_blk_pool_request_crossing_a_region_boundary(disk):
    rig = BlkRig(disk, io_threads=2)
    try:
        data = os.urandom(MB + 4096)
        buf = 8 * MB - 300_000  # starts in region 0, ends in region 1
        rig.ram.write(buf, data)
        assert rig.submit(rig.header(T_OUT, 8) + [(buf, 300_000), (8 * MB, len(data) - 300_000)],
                          rig.status_buf())[0] == S_OK
        assert os.pread(disk, len(data), 8 * 512) == data
        st, _, got = rig.read(8, len(data), pieces=5)
        assert (st, got) == (S_OK, data)
        assert rig.engine.stats["pooled"] == 2
    finally:
        rig.close()


@pytest.mark.parametrize("io_threads", [0, 3])
def test_blk_short_read_in_one_piece_fails_that_request_only(disk, io_threads):
    """The file shrank under us: the last pieces of a 1 MiB read hit end of file."""
    rig = BlkRig(disk, io_threads=io_threads)
    try:
        os.pwrite(disk, b"k" * MB, 0)
        os.ftruncate(disk, MB + 512 * 1024)      # capacity still says 8 MiB
        bad_buf, good_buf = rig.ram.alloc(MB), rig.ram.alloc(MB)
        bad_st, good_st = rig.status_buf(), rig.status_buf()
        bad = rig.ring.add_chain(rig.header(T_IN, 2048), [(bad_buf, MB)] + bad_st)   # 1..2 MiB
        good = rig.ring.add_chain(rig.header(T_IN, 0), [(good_buf, MB)] + good_st)
        rig.ring.publish(bad, good)                # one batch: the failure must not spill over
        os.eventfd_write(rig.kick, 1)
        got = []
        wait_for(lambda: got.extend(rig.ring.reap()) or len(got) == 2)
        assert rig.ram.read(bad_st[0][0], 1)[0] == S_IOERR
        assert rig.ram.read(good_st[0][0], 1)[0] == S_OK
        assert rig.ram.read(good_buf, MB) == b"k" * MB
        assert rig.engine.stats["io_errors"] == 1 and rig.engine.stats["reads"] == 2
        assert rig.engine.stats["pooled"] == (2 if io_threads else 0)
        assert not rig.vq.broken
        assert rig.read(0, 4096)[0] == S_OK        # and the queue goes on
    finally:
        rig.close()



@pytest.mark.parametrize("io_threads", [0, 2])
def test_blk_batch_of_large_writes_then_flush_then_reads(disk, io_threads):
    """More large requests than one pool job holds, a flush among them, small ones between."""
    rig = BlkRig(disk, io_threads=io_threads, num=128)
    try:
        rng = random.Random(3)
        size = 256 * 1024
        heads, statuses, blobs = [], [], []
        for i in range(11):
            data = rng.randbytes(size if i != 5 else 4096)
            buf = rig.ram.alloc(len(data))
            rig.ram.write(buf, data)
            st = rig.status_buf()
            heads.append(rig.ring.add_chain(rig.header(T_OUT, i * size // 512) + rig.split(buf, len(data), 3), st))
            statuses.append(st[0][0])
            blobs.append(data)
            if i == 6:
                st = rig.status_buf()
                heads.append(rig.ring.add_chain(rig.header(T_FLUSH), st))
                statuses.append(st[0][0])
        rig.ring.publish(*heads)
        os.eventfd_write(rig.kick, 1)
        wait_for(lambda: rig.ring.used_idx == len(heads))
        assert len(rig.ring.reap()) == len(heads)
        assert [rig.ram.read(g, 1)[0] for g in statuses] == [S_OK] * len(heads)
        for i, data in enumerate(blobs):
            assert os.pread(disk, len(data), i * size) == data
        assert rig.engine.stats["pooled"] == (10 if io_threads else 0)
        assert rig.engine.stats["writes"] == 11 and rig.engine.stats["flushes"] == 1
        outs = [rig.ram.alloc(size) for _ in range(10)]
        heads = [rig.ring.add_chain(rig.header(T_IN, i * size // 512), [(o, size)] + rig.status_buf())
                 for i, o in enumerate(outs)]
        rig.ring.publish(*heads)
        os.eventfd_write(rig.kick, 1)
        got = []
        wait_for(lambda: got.extend(rig.ring.reap()) or len(got) == 10)
        assert sorted(used for _, used in got) == [size + 1] * 10
        for i, o in enumerate(outs):
            assert rig.ram.read(o, size) == (blobs[i] if i != 5 else os.pread(disk, size, i * size))
    finally:
        rig.close()

def test_blk_pool_write_error_is_ioerr(tmp_path):
    path = tmp_path / "ro.img"
    path.write_bytes(bytes(DISK))
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # every piece's pwritev fails with EBADF
    rig = BlkRig(fd, io_threads=2)
    try:
        assert rig.write(0, b"w" * MB, pieces=3)[0] == S_IOERR
        assert rig.engine.stats["pooled"] == 1 and rig.engine.stats["io_errors"] == 1
        assert rig.read(0, MB)[0] == S_OK
    finally:
        rig.close()
        os.close(fd)


def test_blk_pool_direct_misaligned_buffers_bounce_per_thread(tmp_path):
    fd = _direct_image(tmp_path)
    rig = BlkRig(fd, direct=True, io_threads=3)
    try:
        data = os.urandom(2 * MB)
        buf = rig.ram.alloc(len(data) + 3, 4096) + 3  # misaligned: every piece bounces
        rig.ram.write(buf, data)
        assert rig.submit(rig.header(T_OUT, 8) + [(buf, len(data))], rig.status_buf())[0] == S_OK
        out = rig.ram.alloc(len(data) + 5, 4096) + 5
        st, _ = rig.submit(rig.header(T_IN, 8), [(out, len(data))] + rig.status_buf())
        assert st == S_OK and rig.ram.read(out, len(data)) == data
        with open(tmp_path / "direct.img", "rb") as f:
            f.seek(8 * 512)
            assert f.read(len(data)) == data
        assert rig.engine.stats["pooled"] == 2
    finally:
        rig.close()
        os.close(fd)


def test_blk_pool_threads_live_from_bind_to_unbind(disk):
    base = _pool_threads()
    rig = BlkRig(disk, io_threads=3)
    try:
        wait_for(lambda: _pool_threads() == base + 3)  # each names itself once running
        assert rig.read(0, MB)[0] == S_OK
        rig.vq.update_memory(new := rig.ram.memory())  # a memory swap between batches
        rig.mem.close()
        rig.mem = new
        assert rig.read(0, MB)[0] == S_OK
        rig.vq.stop()
        # Joined when the queue stopped. A joined thread can still be listed in
        # /proc/self/task for a moment (the kernel wakes the joiner before it
        # unlinks the task), so wait for the listing; a thread that was never
        # told to stop stays blocked on its queue and keeps this from passing.
        wait_for(lambda: _pool_threads() == base)
    finally:
        rig.close()
    wait_for(lambda: _pool_threads() == base)


def test_blk_engine_refuses_too_many_io_threads():
    with pytest.raises(ValueError, match="io_threads"):
        BlkEngine(0, 10, io_threads=17)
    with pytest.raises(ValueError, match="io_threads"):
        BlkEngine(0, 10, io_threads=-1)


# -- reads copied from the image's mapping (map_reads) ----------------------------------

@pytest.fixture
def disk_file(tmp_path):
    """(fd, path) of an 8 MiB image of random data on a disk file system, out of the page cache."""
    if on_ram_fs(str(tmp_path)):
        pytest.fail(f"{tmp_path} is on tmpfs or hugetlbfs: the mapped read path needs a disk file system")
    path = tmp_path / "disk.img"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.pwrite(fd, random.Random(5).randbytes(DISK), 0)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # clean, unmapped pages: dropped
    yield fd, str(path)
    os.close(fd)


def _resident_bytes(path: str) -> int:
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", path],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def test_blk_engine_maps_disk_file_images_but_not_tmpfs_ones(request, disk):
    """tmpfs fills a hole on a read fault through a mapping: those images keep preadv."""
    rig = BlkRig(disk)
    try:
        assert rig.engine.mapped == (request.node.callspec.params["disk"] == "disk-file")
        assert rig.read(0, 4096)[0] == S_OK
        assert rig.engine.stats["mapped_reads"] == int(rig.engine.mapped)
    finally:
        rig.close()
    off = BlkRig(disk, map_reads=False)
    try:
        assert not off.engine.mapped
    finally:
        off.close()


def test_blk_mapped_read_past_a_shrunk_image_is_ioerr_not_a_crash(disk_file):
    """The image shrinks on the host under a running queue: the mapping's pages past the
    new end raise SIGBUS, which fails that read alone; growing the file back reads again."""
    fd, _ = disk_file
    image = os.pread(fd, DISK, 0)
    rig = BlkRig(fd, io_threads=2)
    try:
        assert rig.engine.mapped
        os.ftruncate(fd, 6000)                        # mid page: the page holding 6000 is still there
        assert rig.read(8, 1024)[2] == image[4096:5120]
        assert rig.read(100, 512)[0] == S_IOERR        # a page wholly past the end
        assert rig.read(14, 2048)[0] == S_IOERR        # 7168..9216: the copy faults at 8192
        assert rig.read(1024, MB)[0] == S_IOERR        # large: not resident, preadv's short read
        assert rig.engine.stats["map_faults"] == 2 and rig.engine.stats["io_errors"] == 3
        assert not rig.vq.broken
        os.ftruncate(fd, DISK)
        st, _, got = rig.read(100, 512)
        assert (st, got) == (S_OK, bytes(512))         # the file's new tail reads as zeroes
        assert rig.read(0, 4096)[2] == image[:4096]
    finally:
        rig.close()


def test_blk_cold_random_small_reads_fault_in_only_their_own_pages(disk_file):
    """MADV_RANDOM: a fault on a missing page reads that page, not a read-ahead window."""
    fd, path = disk_file
    assert _resident_bytes(path) == 0
    rig = BlkRig(fd)
    try:
        rng = random.Random(11)
        pages = rng.sample(range(0, DISK // 4096, 2), 40)   # never adjacent: no sequential run
        for p in pages:
            assert rig.read(p * 8, 4096)[0] == S_OK
        assert rig.engine.stats["mapped_reads"] == len(pages)
        # each read brought in its own page (a little slack for the fault path's neighbours)
        assert _resident_bytes(path) <= 2 * len(pages) * 4096
        for p in pages[:5]:
            assert rig.read(p * 8, 4096)[2] == os.pread(fd, 4096, p * 4096)
    finally:
        rig.close()


@pytest.mark.parametrize("io_threads", [0, 2])
def test_blk_cold_reads_that_want_read_ahead_keep_preadv(disk_file, io_threads):
    """A sequential run of small reads, and a large read of pages not in the page cache,
    go through preadv (the kernel's read-ahead); the same large read once cached is copied."""
    fd, path = disk_file
    rig = BlkRig(fd, io_threads=io_threads)
    try:
        for k in range(1, 9):                          # 4 KiB .. 36 KiB, each where the last ended
            assert rig.read(k * 8, 4096)[2] == os.pread(fd, 4096, k * 4096)
        assert rig.engine.stats["mapped_reads"] <= 1   # the first may count as random
        before = rig.engine.stats["mapped_reads"]
        assert rig.read(4 * MB // 512, MB)[2] == os.pread(fd, MB, 4 * MB)
        assert rig.engine.stats["mapped_reads"] == before
        assert _resident_bytes(path) >= MB             # preadv left it in the page cache
        assert rig.read(4 * MB // 512, MB)[2] == os.pread(fd, MB, 4 * MB)
        assert rig.engine.stats["mapped_reads"] == before + 1
    finally:
        rig.close()


def test_blk_mapped_reads_see_writes_at_once(disk_file):
    """pwritev and the mapping share the page cache: a read after a write sees it, small or large."""
    fd, _ = disk_file
    rig = BlkRig(fd, io_threads=2)
    try:
        rng = random.Random(9)
        for n in (512, 4096, 65536, MB):
            sector = rng.randrange(0, CAPACITY - n // 512)
            data = rng.randbytes(n)
            assert rig.read(sector, n)[0] == S_OK      # mapped and cached before the write
            assert rig.write(sector, data)[0] == S_OK
            assert rig.read(sector, n)[2] == data
        assert rig.engine.stats["mapped_reads"] >= 4
    finally:
        rig.close()
