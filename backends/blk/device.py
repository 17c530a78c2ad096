"""The virtio-blk device: a disk image (or an in-memory disk) behind vhost-user.

Device semantics only: which features to offer, the config space, and a
native request engine per queue. Requests never pass through Python: each
queue's worker thread runs the C engine (csrc/blk.c) over the image fd.
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
from vhost_user.protocol import ProtocolFeature
from .engine import MAX_IO_THREADS, BlkEngine

from .config import BlkConfig
from .request import ID_BYTES, SECTOR_SIZE, BlkFeature
from . import sandbox as _sandbox  # noqa: F401 (registers the seccomp profile)

__all__ = ["BlkDevice", "BlkOptions", "CAPABILITIES", "default_io_threads", "open_backing"]

log = logging.getLogger(__name__)

_BLKGETSIZE64 = 0x80081272
_BLKDISCARDZEROES = 0x127C
# Discard and write-zeroes limits advertised to the driver.
_MAX_DISCARD_SECTORS = (1 << 32) - 1 >> 9 << 9  # keep it 4 KiB aligned
_MAX_DISCARD_SEG = 1
_DEFAULT_SIZE = 1 << 30

# docs/interop/vhost-user.json: VHostUserBackendCapabilitiesBlock
CAPABILITIES = {"type": "block", "features": ["read-only", "blk-file"]}


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
        st = os.fstat(fd)
        if stat.S_ISBLK(st.st_mode):
            buf = fcntl.ioctl(fd, _BLKGETSIZE64, b"\0" * 8)
            size = struct.unpack("<Q", buf)[0]
        elif stat.S_ISREG(st.st_mode):
            size = st.st_size
        else:
            raise DeviceError(f"{opts.image}: neither a regular file nor a block device")
    except BaseException:
        os.close(fd)
        raise
    if size < SECTOR_SIZE:
        os.close(fd)
        raise DeviceError(f"{opts.image}: smaller than one sector ({size} bytes)")
    return fd, size


class BlkDevice(VirtioDevice):
    device_type = "blk"
    virtio_id = 2

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
        self._engines: dict[int, BlkEngine] = {}
        bits = [BlkFeature.SEG_MAX, BlkFeature.BLK_SIZE, BlkFeature.FLUSH,
                BlkFeature.TOPOLOGY, BlkFeature.MQ]
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
            io_threads=self.opts.io_threads,
        )
        self._engines[index] = engine
        return engine

    def queue_stopped(self, index: int) -> None:
        self._engines.pop(index, None)

    def reset(self) -> None:
        super().reset()
        self._engines.clear()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def capabilities(self) -> dict:
        return CAPABILITIES
