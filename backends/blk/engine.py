"""The native virtio-blk request engine (backends/blk/blk.c) as a queue engine.

`BlkEngine` holds the request limits of one disk; bound to a started
queue (vhost_user.engine protocol) it allocates a C context and the
queue's worker runs `vr_blk_handle` on every kick: whole requests
(read, write, flush, discard, write-zeroes, get-id) are done in C with
the GIL released, so Python never sees them. `set_mode` changes the
capacity (online resize) and the cache mode (writeback / writethrough) of a
running queue between two batches, with the queue's worker parked. With
`io_threads` > 0 the context also owns that many C I/O threads
(blk_pool.c), started at bind and joined at unbind, which share the
transfer of large reads and writes. With `map_reads` (and not `direct`)
the context maps the image read-only and serves reads by copying from the
mapping (no system call per read); a read of pages the file no longer has
fails with IOERR (`map_faults`) instead of ending the process.
"""
from __future__ import annotations

from vhost_user._native import ffi, lib
from vhost_user.engine import Engine

__all__ = ["BlkEngine", "MAX_IO_THREADS"]

#: most I/O pool threads per queue (VR_POOL_MAX_THREADS in blk_pool.h)
MAX_IO_THREADS = 16


class BlkEngine(Engine):
    """Native virtio-blk request engine for one queue (the fd stays the caller's)."""

    def __init__(self, fd: int, capacity_sectors: int, *, read_only: bool = False,
                 serial: bytes | str = b"", logical_block_size: int = 512,
                 max_discard_sectors: int = 0, max_discard_seg: int = 1,
                 max_write_zeroes_sectors: int = 0, max_write_zeroes_seg: int = 1,
                 direct: bool = False, writethrough: bool = False, io_threads: int = 0,
                 map_reads: bool = False) -> None:
        if isinstance(serial, str):
            serial = serial.encode()
        if fd < 0:
            raise ValueError("BlkEngine needs an open fd")
        _check_capacity(capacity_sectors)
        if len(serial) > 20:
            raise ValueError("serial is at most 20 bytes")
        lbs = logical_block_size
        if lbs < 512 or lbs & (lbs - 1):
            raise ValueError(f"logical block size {lbs} is not a power of two >= 512")
        for name, v in (("max_discard_sectors", max_discard_sectors),
                        ("max_discard_seg", max_discard_seg),
                        ("max_write_zeroes_sectors", max_write_zeroes_sectors),
                        ("max_write_zeroes_seg", max_write_zeroes_seg)):
            if not 0 <= v <= 0xFFFFFFFF:
                raise ValueError(f"{name} {v} out of range")
        if not 0 <= io_threads <= MAX_IO_THREADS:
            raise ValueError(f"io_threads {io_threads} is not in 0..{MAX_IO_THREADS}")
        cfg = ffi.new("struct vr_blk_config *")
        cfg.fd = fd
        cfg.read_only = int(read_only)
        cfg.direct = int(direct)
        cfg.writethrough = int(writethrough)
        cfg.capacity = capacity_sectors
        cfg.logical_block_size = lbs
        cfg.max_discard_sectors = max_discard_sectors
        cfg.max_discard_seg = max_discard_seg
        cfg.max_write_zeroes_sectors = max_write_zeroes_sectors
        cfg.max_write_zeroes_seg = max_write_zeroes_seg
        cfg.io_threads = io_threads
        cfg.map_reads = int(map_reads and not direct)
        ffi.memmove(cfg.serial, serial.ljust(20, b"\0"), 20)
        self._cfg = cfg
        self._ctx = None
        self._vq = None
        self._totals = dict.fromkeys(_BLK_STATS, 0)

    # Engine protocol: called by Virtqueue.start/stop only.
    def bind(self, vq):
        """A fresh native context per run; its worker function is vr_blk_handle."""
        if self._ctx is not None:
            raise ValueError("a BlkEngine serves one queue at a time")
        ctx = lib.vr_blk_new(self._cfg)
        if ctx == ffi.NULL:
            raise MemoryError("cannot allocate the virtio-blk engine"
                              + (f" or start its {self._cfg.io_threads} I/O threads"
                                 if self._cfg.io_threads else ""))
        self._ctx = ctx
        self._vq = vq
        return ffi.addressof(lib, "vr_blk_handle"), ctx

    def set_mode(self, capacity_sectors: int, writethrough: bool) -> None:
        """New capacity and cache mode, for this run and the next ones.

        On a running queue the worker is parked first (the pause every
        control-plane change of a queue uses), so the requests already popped
        have completed under the old values and every later one sees the new.
        """
        _check_capacity(capacity_sectors)
        self._cfg.capacity = capacity_sectors
        self._cfg.writethrough = int(writethrough)
        if self._ctx is None:
            return
        with self._vq.paused():
            lib.vr_blk_set_mode(self._ctx, capacity_sectors, int(writethrough))

    def unbind(self) -> None:
        if self._ctx is not None:
            for k, v in self._native_stats().items():
                self._totals[k] += v
            lib.vr_blk_free(self._ctx)
            self._ctx = None
            self._vq = None

    def _native_stats(self) -> dict[str, int]:
        if self._ctx is None:
            return dict.fromkeys(_BLK_STATS, 0)
        s = ffi.new("struct vr_blk_stats *")
        lib.vr_blk_get_stats(self._ctx, s)
        return {k: getattr(s, k) for k in _BLK_STATS}

    @property
    def mapped(self) -> bool:
        """True while the bound context reads from a mapping of the image."""
        return self._ctx is not None and bool(lib.vr_blk_mapped(self._ctx))

    @property
    def stats(self) -> dict[str, int]:
        """Request and byte counters (reads, writes, flushes, ..., bytes_read, bytes_written)."""
        cur = self._native_stats()
        return {k: self._totals[k] + cur[k] for k in _BLK_STATS}


def _check_capacity(sectors: int) -> None:
    if not 0 <= sectors < 1 << 55:
        raise ValueError(f"bad capacity {sectors}")


_BLK_STATS = ("reads", "writes", "flushes", "discards", "write_zeroes", "get_ids",
              "unsupported", "io_errors", "bytes_read", "bytes_written", "pooled",
              "mapped_reads", "map_faults")
