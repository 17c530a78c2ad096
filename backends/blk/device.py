"""The virtio-blk device: a disk image (or an in-memory disk) behind vhost-user.

Device semantics only: which features to offer, the config space, and a
native request engine per queue. Requests never pass through Python: each
queue's worker thread runs the C engine (backends/blk/blk.c) over the image fd.

Online resize: `resize()` (SIGHUP in `vhost-user-blk`) reads the image's
size again, gives every running engine the new capacity with its worker
parked (so nothing popped after it can pass the new end, and nothing popped
before it is still running), and tells the front-end with
BACKEND_CONFIG_CHANGE_MSG; QEMU then reads config space and raises the
guest's config interrupt. Cache mode (VIRTIO_BLK_F_CONFIG_WCE): the driver
writes the `writeback` byte; 0 makes the engines fdatasync every write before
completing it.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import struct
from dataclasses import dataclass

from vhost_user.device import VirtioDevice, queue_size_problem
from vhost_user.errors import DeviceError
from vhost_user.protocol import BackendRequest, Message, ProtocolFeature
from .engine import MAX_IO_THREADS, BlkEngine

from .config import BlkConfig
from .request import ID_BYTES, SECTOR_SIZE, BlkFeature
from . import sandbox as _sandbox  # noqa: F401 (registers the seccomp profile)
from .spec import SPEC

__all__ = ["BlkDevice", "BlkOptions", "CAPABILITIES", "default_io_threads", "open_backing"]

log = logging.getLogger(__name__)

_BLKGETSIZE64 = 0x80081272
_BLKDISCARDZEROES = 0x127C
# Discard and write-zeroes limits advertised to the driver.
_MAX_DISCARD_SECTORS = (1 << 32) - 1 >> 9 << 9  # keep it 4 KiB aligned
_MAX_DISCARD_SEG = 1
_DEFAULT_SIZE = 1 << 30
# virtio 1.2, 5.2.4: offset of the u8 `writeback` in struct virtio_blk_config
_WRITEBACK_OFFSET = 32

# docs/interop/vhost-user.json: VHostUserBackendCapabilitiesBlock
CAPABILITIES = SPEC.capabilities()  # static; the program may add run-time probes


@dataclass
class BlkOptions:
    image: str | None = None
    size: int = _DEFAULT_SIZE
    num_queues: int = 1
    queue_size: int = 32768
    read_only: bool = False
    serial: str = ""
    logical_block_size: int = 512
    direct: bool = False
    io_threads: int = 0
    map_reads: bool = True


def default_io_threads() -> int:
    """The --io-threads default: min(4, the CPUs this process may run on)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except OSError:
        cpus = os.cpu_count() or 1
    return min(4, cpus)


def open_backing(opts: BlkOptions) -> tuple[int, int]:
    """Open the image (or create the in-memory disk); return (fd, size in bytes).

    Raises DeviceError with a message a user can act on.
    """
    if opts.image is None:
        if opts.direct:
            raise DeviceError("--direct needs --image: the in-memory disk has no O_DIRECT")
        fd = os.memfd_create("vhost-user-blk-disk", os.MFD_CLOEXEC)
        os.ftruncate(fd, opts.size)
        return fd, opts.size
    flags = (os.O_RDONLY if opts.read_only else os.O_RDWR) | os.O_CLOEXEC
    if opts.direct:
        flags |= os.O_DIRECT
    try:
        fd = os.open(opts.image, flags)
    except OSError as exc:
        if opts.direct and exc.errno == errno.EINVAL:
            raise DeviceError(
                f"{opts.image}: the file system does not support O_DIRECT (--direct)"
            ) from None
        raise DeviceError(f"{opts.image}: cannot open image: {exc.strerror}") from None
    try:
        size = backing_size(fd, opts.image)
    except BaseException:
        os.close(fd)
        raise
    if size < SECTOR_SIZE:
        os.close(fd)
        raise DeviceError(f"{opts.image}: smaller than one sector ({size} bytes)")
    return fd, size


def backing_size(fd: int, name: str) -> int:
    """The size in bytes of an open image: a regular file or a block device."""
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        buf = fcntl.ioctl(fd, _BLKGETSIZE64, b"\0" * 8)
        return struct.unpack("<Q", buf)[0]
    if stat.S_ISREG(st.st_mode):
        return st.st_size
    raise DeviceError(f"{name}: neither a regular file nor a block device")


class BlkDevice(VirtioDevice):
    device_type = SPEC.name
    virtio_id = SPEC.virtio_id

    def __init__(self, opts: BlkOptions):
        super().__init__()
        lbs = opts.logical_block_size
        if lbs < SECTOR_SIZE or lbs & (lbs - 1) or lbs > 65536:
            raise DeviceError(f"logical block size {lbs} must be a power of two from 512 to 65536")
        if not 1 <= opts.num_queues <= 256:
            raise DeviceError(f"--num-queues {opts.num_queues} must be 1..256")
        if (problem := queue_size_problem(opts.queue_size)) is not None:
            raise DeviceError(problem)
        if not 0 <= opts.io_threads <= MAX_IO_THREADS:
            raise DeviceError(f"--io-threads {opts.io_threads} must be 0..{MAX_IO_THREADS}")
        if len(opts.serial.encode()) > ID_BYTES:
            raise DeviceError(f"--serial is longer than {ID_BYTES} bytes")
        self.opts = opts
        self.num_queues = opts.num_queues
        self.max_queue_size = opts.queue_size
        self.fd, self.size = open_backing(opts)
        self.capacity = self.size // SECTOR_SIZE
        self.writeback = 1
        self._engines: dict[int, BlkEngine] = {}
        self._backend_channel = None
        bits = [BlkFeature.SEG_MAX, BlkFeature.BLK_SIZE, BlkFeature.FLUSH,
                BlkFeature.TOPOLOGY, BlkFeature.CONFIG_WCE, BlkFeature.MQ]
        if opts.read_only:
            bits.append(BlkFeature.RO)
        else:
            bits += [BlkFeature.DISCARD, BlkFeature.WRITE_ZEROES]
        self.device_features = sum(1 << b for b in bits)
        self.device_protocol_features = 1 << ProtocolFeature.CONFIG
        log.info(
            "disk %s: %d bytes, %d queue(s) of %d, %s",
            opts.image or "(in memory)", self.size, self.num_queues, self.max_queue_size,
            "read-only" if opts.read_only else "read-write",
        )

    def config(self) -> BlkConfig:
        lbs = self.opts.logical_block_size
        sectors_per_block = lbs // SECTOR_SIZE
        writable = not self.opts.read_only
        return BlkConfig(
            capacity=self.capacity,
            seg_max=min(self.max_queue_size, 256) - 2,  # what QEMU's default queues carry
            blk_size=lbs,
            num_queues=self.num_queues,
            writeback=self.writeback,
            min_io_size=1,
            opt_io_size=0,
            max_discard_sectors=_MAX_DISCARD_SECTORS if writable else 0,
            max_discard_seg=_MAX_DISCARD_SEG if writable else 0,
            discard_sector_alignment=max(sectors_per_block, 8) if writable else 0,
            max_write_zeroes_sectors=_MAX_DISCARD_SECTORS if writable else 0,
            max_write_zeroes_seg=_MAX_DISCARD_SEG if writable else 0,
            write_zeroes_may_unmap=1 if writable else 0,
        )

    def get_config(self, offset: int, size: int) -> bytes:
        space = self.config().pack()
        if offset + size > len(space):
            raise DeviceError(f"config read {offset}+{size} beyond {len(space)} bytes")
        return space[offset: offset + size]

    def set_config(self, offset: int, data: bytes, flags: int) -> None:
        """The driver's config write: only the `writeback` byte is writable (5.2.4)."""
        if offset != _WRITEBACK_OFFSET or len(data) != 1:
            raise DeviceError(f"config write {offset}+{len(data)}: only the writeback byte "
                              f"({_WRITEBACK_OFFSET}+1) is writable")
        if not self.has_feature(BlkFeature.CONFIG_WCE):
            raise DeviceError("config write of writeback without VIRTIO_BLK_F_CONFIG_WCE")
        if data[0] not in (0, 1):
            raise DeviceError(f"writeback {data[0]}: must be 0 (writethrough) or 1 (writeback)")
        if data[0] != self.writeback:
            self.writeback = data[0]
            log.info("cache mode: %s", "writeback" if self.writeback else "writethrough")
            self._update_engines()

    def set_backend_channel(self, channel) -> None:
        self._backend_channel = channel

    def resize(self) -> bool:
        """Read the image's size again and serve the new capacity (SIGHUP).

        Returns True when the capacity changed. The front-end hears of it
        through BACKEND_CONFIG_CHANGE_MSG when it negotiated CONFIG and
        BACKEND_REQ. Problems are logged, never raised: the disk goes on.
        """
        name = self.opts.image
        if name is None:
            log.warning("resize: the in-memory disk has a fixed size (--size); nothing to re-read")
            return False
        try:
            size = backing_size(self.fd, name)
        except (OSError, DeviceError) as exc:
            log.warning("resize: %s: %s", name, getattr(exc, "strerror", None) or exc)
            return False
        capacity = size // SECTOR_SIZE
        if capacity == 0:
            log.warning("resize: %s: smaller than one sector (%d bytes); keeping %d sectors",
                        name, size, self.capacity)
            return False
        if capacity == self.capacity:
            log.info("resize: %s: still %d sectors", name, capacity)
            return False
        old, self.capacity, self.size = self.capacity, capacity, size
        self._update_engines()
        log.info("resize: %s: %d -> %d sectors", name, old, capacity)
        self._notify_config_change()
        return True

    def _update_engines(self) -> None:
        for engine in self._engines.values():
            engine.set_mode(self.capacity, writethrough=not self.writeback)

    def _notify_config_change(self) -> None:
        channel = self._backend_channel
        if channel is None or not self.acked_protocol_features & (1 << ProtocolFeature.CONFIG):
            log.info("resize: the front-end gets no config-change message "
                     "(needs protocol features CONFIG and BACKEND_REQ)")
            return
        try:
            channel.send(Message.make(BackendRequest.BACKEND_CONFIG_CHANGE_MSG))
        except OSError as exc:
            log.warning("resize: cannot send BACKEND_CONFIG_CHANGE_MSG: %s", exc.strerror or exc)

    def queue_handler(self, index: int) -> BlkEngine:
        engine = BlkEngine(
            self.fd,
            self.capacity,
            read_only=self.opts.read_only,
            serial=self.opts.serial.encode(),
            logical_block_size=self.opts.logical_block_size,
            max_discard_sectors=_MAX_DISCARD_SECTORS,
            max_discard_seg=_MAX_DISCARD_SEG,
            max_write_zeroes_sectors=_MAX_DISCARD_SECTORS,
            max_write_zeroes_seg=_MAX_DISCARD_SEG,
            direct=self.opts.direct,
            writethrough=not self.writeback,
            io_threads=self.opts.io_threads,
            map_reads=self.opts.map_reads,
        )
        self._engines[index] = engine
        return engine

    def queue_stopped(self, index: int) -> None:
        self._engines.pop(index, None)

    def reset(self) -> None:
        super().reset()
        self._engines.clear()
        self.writeback = 1  # 5.2.5: the device starts in writeback mode (FLUSH offered)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def capabilities(self) -> dict:
        return CAPABILITIES
