"""Dirty page logging (live migration): which guest pages a back-end marks.

The built-in front-end does what QEMU does when a migration starts
(vhost_user.frontend.migration): a memfd bitmap through SET_LOG_BASE,
VHOST_F_LOG_ALL in SET_FEATURES and VHOST_VRING_F_LOG on the running rings.
The same checks run against qemu-storage-daemon, whose libvhost-user logs
the same pages, so the expectations are the protocol's, not ours.
"""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager

import pytest

from backends_proc import start_blk, start_qsd_blk
from vhost_user._native import ffi, lib
from vhost_user.backends.blk.driver import DRIVER_FEATURES as BLK_FEATURES, BlkDriver
from vhost_user.frontend.migration import DirtyLog, qemu_log_size
from vhost_user.protocol import VirtioFeature

MiB = 1 << 20
PAGE = 4096
IO = 64 * 1024
PACKED = 1 << VirtioFeature.VIRTIO_F_RING_PACKED


@pytest.fixture(params=["ours", "qsd"])
def blk_sock(request, sockdir, shm_image):
    image = shm_image(16 * MiB)
    with open(image, "r+b") as f:
        f.write(os.urandom(2 * MiB))
    if request.param == "ours":
        bp = start_blk(sockdir, image=image)
    else:
        bp = start_qsd_blk(sockdir, image)
    yield bp
    bp.stop()


def _pages(gpa: int, length: int) -> set[int]:
    return set(range(gpa // PAGE, (gpa + length - 1) // PAGE + 1))


def _used_ring_pages(drv: BlkDriver) -> set[int]:
    ring = drv.queues[0].ring
    return _pages(ring.used_gpa, 4 + 8 * drv.queues[0].size)


@contextmanager
def _logging(drv: BlkDriver):
    """A migration started on `drv`'s connection, its bitmap cleared: the DirtyLog."""
    dirty = DirtyLog(drv.fe)
    try:
        dirty.start()
        dirty.clear()
        yield dirty
    finally:
        dirty.close()


def test_dirty_log_marks_read_buffers_status_and_used_ring(blk_sock):
    with BlkDriver.connect(blk_sock.socket, slots_per_queue=1, max_io=IO) as drv:
        header, status, data = drv.slot_addresses()[0]
        with _logging(drv) as dirty:
            drv.read(0, IO)
            marked = dirty.pages()
        assert _pages(data, IO) <= marked
        assert status // PAGE in marked
        assert marked & _used_ring_pages(drv)
        # Nothing far from what was written: data, status (+header), used ring.
        allowed = _pages(data, IO) | {status // PAGE, header // PAGE} | _used_ring_pages(drv)
        assert marked <= allowed, sorted(marked - allowed)


def test_dirty_log_leaves_buffers_the_device_only_read(blk_sock):
    with BlkDriver.connect(blk_sock.socket, slots_per_queue=1, max_io=IO) as drv:
        _, status, data = drv.slot_addresses()[0]
        with _logging(drv) as dirty:
            drv.write(8, os.urandom(IO))
            marked = dirty.pages()
        assert status // PAGE in marked
        # The write's data pages were only read by the device.
        assert not marked & _pages(data + PAGE, IO - 2 * PAGE)


def test_dirty_log_stops_with_log_all_off_and_io_goes_on(blk_sock):
    with BlkDriver.connect(blk_sock.socket, slots_per_queue=1, max_io=IO) as drv:
        dirty = DirtyLog(drv.fe)
        try:
            dirty.start()
            first = drv.read(0, IO)
            dirty.stop()
            dirty.clear()
            assert drv.read(0, IO) == first
            assert dirty.pages() == set()
            # A second migration on the same connection logs again.
            dirty.start()
            dirty.clear()
            drv.read(0, IO)
            assert dirty.pages()
        finally:
            dirty.close()


def test_dirty_log_on_packed_rings_marks_read_buffers_status_and_used_descriptors(sockdir, shm_image):
    """The same read over a packed ring (qsd's libvhost-user has none): the used
    descriptor lands in the descriptor ring, which is logged at its own address."""
    image = shm_image(16 * MiB)
    bp = start_blk(sockdir, image=image)
    try:
        with BlkDriver.connect(bp.socket, features=BLK_FEATURES | PACKED, slots_per_queue=1,
                               max_io=IO) as drv:
            assert drv.queues[0].ring.packed
            header, status, data = drv.slot_addresses()[0]
            ring = drv.queues[0].ring
            with _logging(drv) as dirty:
                for _ in range(3):
                    drv.read(0, IO)
                marked = dirty.pages()
            assert _pages(data, IO) <= marked
            assert status // PAGE in marked
            desc_ring = _pages(ring.desc_gpa, 16 * drv.queues[0].size)
            assert marked & desc_ring
            allowed = (_pages(data, IO) | {status // PAGE, header // PAGE} | desc_ring
                       | _pages(ring.used_gpa, 4))
            assert marked <= allowed, sorted(marked - allowed)
    finally:
        bp.stop()


def _refused(drv: BlkDriver, fd: int | None, size: int, offset: int = 0) -> None:
    """A bad SET_LOG_BASE is answered non-zero, and I/O goes on unlogged."""
    assert drv.fe.set_log_base(fd, size, offset) != 0
    assert drv.read(0, IO)


def test_dirty_log_refuses_bad_log_regions(sockdir, shm_image):
    bp = start_blk(sockdir, image=shm_image(16 * MiB))
    try:
        with BlkDriver.connect(bp.socket, slots_per_queue=1, max_io=IO) as drv:
            need = qemu_log_size(drv.fe.ram)
            small = os.memfd_create("small-log")
            os.ftruncate(small, need // 2)
            efd = os.eventfd(0)
            a, b = socket.socketpair()
            try:
                _refused(drv, small, need // 2)           # smaller than guest memory
                _refused(drv, small, need)                # beyond the fd's end
                _refused(drv, small, need // 2, 4096)     # offset past the end
                _refused(drv, efd, need)                  # not a memfd
                _refused(drv, a.fileno(), need)           # a socket
                _refused(drv, None, need)                 # no fd at all
            finally:
                for fd in (small, efd):
                    os.close(fd)
                a.close()
                b.close()
            # A good log after all that still works.
            with _logging(drv) as dirty:
                drv.read(0, IO)
                assert dirty.pages()
        assert bp.running
        log = bp.log_tail(100)
        for reason in ("smaller than the", "beyond the fd", "not a memfd", "carries no fd"):
            assert reason in log, log
    finally:
        bp.stop()


def test_log_write_never_marks_past_the_bitmap():
    bitmap = bytearray(2)  # 16 pages
    buf = ffi.from_buffer("uint8_t[]", bitmap, require_writable=True)
    log = ffi.new("struct vr_log *", {"base": buf, "size": 2, "call_fd": -1})
    assert lib.vr_log_write(log, 15 * PAGE + 100, 3 * PAGE) == 3  # pages 16-18
    assert bitmap == bytes([0, 0x80])
    assert lib.vr_log_write(log, 0, 1) == 0 and bitmap[0] == 1
    assert lib.vr_log_write(log, 2**64 - PAGE, 10 * PAGE) == 1  # wraps: clamped, counted
    assert lib.vr_log_write(log, 5 * PAGE, 0) == 0
    assert bitmap == bytes([1, 0x80])
