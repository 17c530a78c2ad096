"""Guest memory: an immutable table of mapped front-end regions.

Theory of operation
-------------------
The front-end shares guest RAM as file descriptors (SET_MEM_TABLE,
ADD_MEM_REG).  Each region is mapped once, MAP_SHARED, from file offset 0
for ``mmap_offset + memory_size`` bytes; guest physical address ``gpa``
lives at ``mapping[mmap_offset + (gpa - region.gpa)]``.  The fd is closed
right after mapping (the mapping survives it).

A `GuestMemory` is never mutated: `with_region`, `without_region` and
`from_table` return a new table, which the session swaps in.  Tables share
mappings, so lifetime is reference counted at two levels:

* each `_Mapping` counts the tables that contain it and is unmapped when
  the last such table is closed;
* each table counts its users (queues, through `acquire`/`release`).
  `close()` on a table still used by a running queue only marks it; the
  unmapping happens when the last queue releases it.

So the owner's rule is simple: swap the new table into every queue
(`Virtqueue.update_memory`), then call `close()` on the old one.

On Python < 3.13 the mmap module keeps a private duplicate of the fd until
the mapping is closed; 3.13+ is asked not to (``trackfd=False``).

This module does no cffi: `virtqueue.py` builds the native table from
`Region.mmap`.
"""
from __future__ import annotations

import mmap
import os
import sys
import threading
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from vhost_user.errors import GuestMemoryError

__all__ = ["GuestMemory", "Region", "MAX_REGIONS"]

MAX_REGIONS = 32
_U64 = (1 << 64) - 1


class _Mapping:
    """One mmap of a region fd, shared by every table that contains it."""

    __slots__ = ("mm", "refs", "lock")

    def __init__(self, mm: mmap.mmap) -> None:
        self.mm = mm
        self.refs = 0
        self.lock = threading.Lock()

    def incref(self) -> None:
        with self.lock:
            self.refs += 1

    def decref(self) -> None:
        with self.lock:
            self.refs -= 1
            last = self.refs == 0
        if last:
            self.mm.close()


@dataclass(frozen=True, eq=False)
class Region:
    """One guest memory region: [gpa, gpa+size) at front-end address uaddr."""

    gpa: int
    size: int
    uaddr: int
    mmap_offset: int
    _mapping: _Mapping

    @property
    def mmap(self) -> mmap.mmap:
        """The whole mapping (read-only property); region byte 0 is at mmap_offset."""
        return self._mapping.mm

    def read(self, offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length) of the region (bounds-checked)."""
        _check_span(offset, length, self.size)
        start = self.mmap_offset + offset
        return self._mapping.mm[start:start + length]

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write data at offset within the region (bounds-checked)."""
        _check_span(offset, len(data), self.size)
        start = self.mmap_offset + offset
        self._mapping.mm[start:start + len(data)] = data

    def contains_gpa(self, gpa: int) -> bool:
        return self.gpa <= gpa < self.gpa + self.size


def _check_span(offset: int, length: int, size: int) -> None:
    if offset < 0 or length < 0 or offset + length > size:
        raise GuestMemoryError(f"span {offset:#x}+{length:#x} outside region of size {size:#x}")


def _overlaps(a0: int, alen: int, b0: int, blen: int) -> bool:
    return a0 < b0 + blen and b0 < a0 + alen


def _region_fields(r: Any) -> tuple[int, int, int, int]:
    """(gpa, size, uaddr, mmap_offset) from a 4-tuple or a protocol payload."""
    if isinstance(r, (tuple, list)):
        gpa, size, uaddr, off = r
        return int(gpa), int(size), int(uaddr), int(off)
    return (int(r.guest_phys_addr), int(r.memory_size), int(r.userspace_addr), int(r.mmap_offset))


def _map_fd(fd: int, size: int, mmap_offset: int) -> _Mapping:
    """Map [0, mmap_offset+size) of fd after checking the fd is big enough."""
    if size <= 0:
        raise GuestMemoryError("memory region has zero size")
    if mmap_offset < 0 or size + mmap_offset > _U64:
        raise GuestMemoryError(f"mmap_offset {mmap_offset:#x} + size {size:#x} overflows")
    try:
        st = os.fstat(fd)
    except OSError as e:
        raise GuestMemoryError(f"cannot stat region fd {fd}: {e}") from None
    total = mmap_offset + size
    if st.st_size and total > st.st_size:
        raise GuestMemoryError(
            f"region needs {total:#x} bytes but its fd is only {st.st_size:#x} bytes"
        )
    kwargs = {"trackfd": False} if sys.version_info >= (3, 13) else {}
    try:
        mm = mmap.mmap(fd, total, flags=mmap.MAP_SHARED,
                       prot=mmap.PROT_READ | mmap.PROT_WRITE, **kwargs)
    except (OSError, ValueError, OverflowError) as e:
        raise GuestMemoryError(f"cannot map region of {total:#x} bytes: {e}") from None
    return _Mapping(mm)


class GuestMemory:
    """An immutable table of up to 32 mapped guest memory regions."""

    def __init__(self, regions: Sequence[Region] = ()) -> None:
        self._regions: tuple[Region, ...] = tuple(regions)
        for r in self._regions:
            r._mapping.incref()
        self._lock = threading.Lock()
        self._users = 0
        self._closing = False
        self._closed = False

    # -- construction ---------------------------------------------------------
    @classmethod
    def empty(cls) -> GuestMemory:
        """A table with no regions."""
        return cls(())

    @classmethod
    def from_table(cls, fds: Sequence[int], regions: Sequence[Any]) -> GuestMemory:
        """The table for SET_MEM_TABLE: maps every (fd, region) pair.

        regions items are (gpa, size, uaddr, mmap_offset) tuples or objects
        with guest_phys_addr, memory_size, userspace_addr, mmap_offset.
        All fds are closed, whether or not this succeeds.
        """
        fds = list(fds)
        try:
            if len(fds) != len(regions):
                raise GuestMemoryError(f"{len(regions)} regions but {len(fds)} fds")
            if len(regions) > MAX_REGIONS:
                raise GuestMemoryError(f"{len(regions)} regions exceed the maximum of {MAX_REGIONS}")
            fields = [_region_fields(r) for r in regions]
            for i, (gpa, size, uaddr, off) in enumerate(fields):
                _validate_new(gpa, size, uaddr, fields[:i])
            built: list[Region] = []
            try:
                for fd, (gpa, size, uaddr, off) in zip(fds, fields):
                    built.append(Region(gpa, size, uaddr, off, _map_fd(fd, size, off)))
            except BaseException:
                for r in built:
                    r._mapping.mm.close()
                raise
            return cls(built)
        finally:
            for fd in fds:
                _close_quietly(fd)

    def with_region(self, fd: int, guest_phys_addr: int, memory_size: int,
                    userspace_addr: int, mmap_offset: int) -> GuestMemory:
        """A new table with one more region (ADD_MEM_REG); closes fd."""
        try:
            self._check_open()
            if len(self._regions) >= MAX_REGIONS:
                raise GuestMemoryError(f"no free memory slot (maximum {MAX_REGIONS} regions)")
            existing = [(r.gpa, r.size, r.uaddr, r.mmap_offset) for r in self._regions]
            _validate_new(guest_phys_addr, memory_size, userspace_addr, existing)
            mapping = _map_fd(fd, memory_size, mmap_offset)
        finally:
            _close_quietly(fd)
        region = Region(guest_phys_addr, memory_size, userspace_addr, mmap_offset, mapping)
        return GuestMemory(self._regions + (region,))

    def without_region(self, guest_phys_addr: int, memory_size: int,
                       userspace_addr: int) -> GuestMemory:
        """A new table without the region matching all three values (REM_MEM_REG)."""
        self._check_open()
        keep = [r for r in self._regions
                if not (r.gpa == guest_phys_addr and r.size == memory_size
                        and r.uaddr == userspace_addr)]
        if len(keep) == len(self._regions):
            raise GuestMemoryError(
                f"no region at gpa {guest_phys_addr:#x} size {memory_size:#x} uaddr {userspace_addr:#x}"
            )
        return GuestMemory(keep)

    # -- lookup -----------------------------------------------------------------
    @property
    def regions(self) -> tuple[Region, ...]:
        return self._regions

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        return len(self._regions)

    def translate(self, gpa: int, length: int) -> list[tuple[int, int, int]]:
        """[(region_index, offset, length)] covering [gpa, gpa+length), split at region ends.

        Raises GuestMemoryError if any byte is unmapped or gpa+length overflows 64 bits.
        """
        if gpa < 0 or length < 0 or gpa > _U64 or length > _U64:
            raise GuestMemoryError(f"bad guest range {gpa:#x}+{length:#x}")
        if length and gpa + length - 1 > _U64:
            raise GuestMemoryError(f"guest range {gpa:#x}+{length:#x} overflows 64 bits")
        out = []
        while length > 0:
            for i, r in enumerate(self._regions):
                if r.contains_gpa(gpa):
                    off = gpa - r.gpa
                    n = min(length, r.size - off)
                    out.append((i, off, n))
                    gpa += n
                    length -= n
                    break
            else:
                raise GuestMemoryError(f"guest address {gpa:#x} is outside every region")
        return out

    def uva_to_gpa(self, uaddr: int) -> int:
        """The guest physical address of a front-end virtual address."""
        for r in self._regions:
            if r.uaddr <= uaddr < r.uaddr + r.size:
                return r.gpa + (uaddr - r.uaddr)
        raise GuestMemoryError(f"front-end address {uaddr:#x} is outside every region")

    def read(self, gpa: int, length: int) -> bytes:
        """Copy guest bytes (slow path: tests, control plane, Python handlers)."""
        return b"".join(self._regions[i].read(off, n) for i, off, n in self.translate(gpa, length))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Copy bytes into guest memory (slow path)."""
        view = memoryview(data).cast("B")
        pos = 0
        for i, off, n in self.translate(gpa, len(view)):
            self._regions[i].write(off, view[pos:pos + n])
            pos += n

    # -- lifetime -----------------------------------------------------------------
    def acquire(self) -> None:
        """A queue starts using this table: defer unmapping until release()."""
        with self._lock:
            self._check_open()
            self._users += 1

    def release(self) -> None:
        """A queue stopped using this table; unmap now if close() was deferred."""
        with self._lock:
            self._users -= 1
            now = self._closing and self._users == 0
        if now:
            self._unmap()

    def close(self) -> None:
        """Drop this table's mappings (deferred while a queue still uses it). Idempotent."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            now = self._users == 0
        if now:
            self._unmap()

    def _unmap(self) -> None:
        self._closed = True
        for r in self._regions:
            r._mapping.decref()

    def _check_open(self) -> None:
        if self._closing:
            raise GuestMemoryError("guest memory table is closed")

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        rs = ", ".join(f"{r.gpa:#x}+{r.size:#x}@{r.uaddr:#x}" for r in self._regions)
        return f"GuestMemory([{rs}])"


def _validate_new(gpa: int, size: int, uaddr: int,
                  existing: Iterable[tuple[int, int, int, int]]) -> None:
    if size <= 0:
        raise GuestMemoryError("memory region has zero size")
    if gpa < 0 or uaddr < 0 or gpa + size - 1 > _U64 or uaddr + size - 1 > _U64:
        raise GuestMemoryError(f"region {gpa:#x}+{size:#x} (uaddr {uaddr:#x}) overflows 64 bits")
    for egpa, esize, euaddr, _ in existing:
        if _overlaps(gpa, size, egpa, esize):
            raise GuestMemoryError(
                f"region {gpa:#x}+{size:#x} overlaps guest range {egpa:#x}+{esize:#x}"
            )
        if _overlaps(uaddr, size, euaddr, esize):
            raise GuestMemoryError(
                f"region uaddr {uaddr:#x}+{size:#x} overlaps {euaddr:#x}+{esize:#x}"
            )


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
