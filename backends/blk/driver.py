"""A virtio-blk driver model: what a guest's virtio_blk does, minus the CPU.

Each queue has a fixed set of request slots in guest RAM (header, data
buffer, status byte). Requests go out as descriptor chains through the C
driver ring; many may be in flight at once (`submit` / `complete`), and the
simple calls (`read`, `write`, ...) are one request each. Works against any
vhost-user-blk back-end.
"""

from __future__ import annotations

from dataclasses import dataclass

from vhost_user.backends.blk.config import BlkConfig, CONFIG_SPACE_SIZE
from vhost_user.backends.blk.request import (
    ID_BYTES,
    WRITE_ZEROES_FLAG_UNMAP,
    BlkFeature,
    DiscardSegment,
    RequestHeader,
    RequestType,
    Status,
)
from vhost_user.errors import VhostUserError
from vhost_user.frontend import QEMU, Frontend, Profile, QueueHandle
from vhost_user.frontend.driver import Driver, split_buffer
from vhost_user.protocol import ProtocolFeature as PF, VirtioFeature

__all__ = ["BlkDriver", "BlkIOError", "BlkRequest", "DRIVER_FEATURES"]

DRIVER_FEATURES = (
    (1 << VirtioFeature.VIRTIO_F_VERSION_1)
    | (1 << VirtioFeature.VIRTIO_RING_F_EVENT_IDX)
    | (1 << VirtioFeature.VIRTIO_RING_F_INDIRECT_DESC)
    | sum(1 << b for b in BlkFeature)
)


class BlkIOError(VhostUserError):
    """A request completed with a status other than OK."""

    def __init__(self, status: int, what: str):
        super().__init__(f"{what}: status {Status(status).name if status in (0, 1, 2) else status}")
        self.status = status


@dataclass
class BlkRequest:
    """One request to submit: type, sector, data to write or bytes to read."""

    type: int
    sector: int = 0
    data: bytes = b""
    read_len: int = 0
    split: int = 1  # number of descriptors the data buffer is cut into


@dataclass
class _Slot:
    header: int
    status: int
    data: int


class BlkDriver(Driver):
    """Drives one vhost-user-blk back-end through the built-in front-end."""

    def __init__(self, frontend: Frontend, *, num_queues: int = 1, queue_size: int = 128,
                 max_io: int = 1 << 20, slots_per_queue: int = 16):
        self.fe = frontend
        self.config = BlkConfig.unpack(frontend.get_config(CONFIG_SPACE_SIZE)) \
            if frontend.has_protocol_feature(PF.CONFIG) else None
        frontend.set_mem_table()
        self.max_io = max_io
        self.queues: list[QueueHandle] = []
        self._slots: list[list[_Slot]] = []
        self._free: list[list[int]] = []
        self._inflight: list[dict[int, tuple[int, BlkRequest]]] = []
        for q in range(num_queues):
            self.queues.append(frontend.setup_queue(q, queue_size))
            slots = []
            for _ in range(slots_per_queue):
                slots.append(_Slot(
                    header=frontend.ram.alloc(RequestHeader.SIZE, 16),
                    status=frontend.ram.alloc(1, 1),
                    data=frontend.ram.alloc(max_io, 4096),
                ))
            self._slots.append(slots)
            self._free.append(list(range(slots_per_queue)))
            self._inflight.append({})

    @classmethod
    def connect(cls, path: str, *, num_queues: int = 1, queue_size: int = 128,
                ram_size: int = 256 << 20, max_io: int = 1 << 20, slots_per_queue: int = 16,
                features: int = DRIVER_FEATURES, use_mem_slots: bool = True,
                profile: Profile = QEMU) -> "BlkDriver":
        fe = Frontend(path, ram_size=ram_size, profile=profile)
        try:
            fe.negotiate(features, use_mem_slots=use_mem_slots)
            return cls(fe, num_queues=num_queues, queue_size=queue_size, max_io=max_io,
                       slots_per_queue=slots_per_queue)
        except BaseException:
            fe.close()
            raise

    def slot_addresses(self, queue: int = 0) -> list[tuple[int, int, int]]:
        """(header, status, data) guest addresses of each request slot of `queue`
        (what a dirty-log test expects a back-end to mark)."""
        return [(s.header, s.status, s.data) for s in self._slots[queue]]

    @property
    def read_only(self) -> bool:
        return self.fe.has_feature(BlkFeature.RO)

    # -- asynchronous interface -------------------------------------------------
    def submit(self, req: BlkRequest, queue: int = 0) -> int:
        """Post one request; returns its head index (the completion token)."""
        if not self._free[queue]:
            raise RuntimeError(f"queue {queue}: all request slots are in flight")
        length = len(req.data) if req.data else req.read_len
        if length > self.max_io:
            raise ValueError(f"request of {length} bytes exceeds max_io {self.max_io}")
        slot_no = self._free[queue].pop()
        slot = self._slots[queue][slot_no]
        ram = self.fe.ram
        ram.write(slot.header, RequestHeader(req.type, req.sector).pack())
        ram.write(slot.status, b"\xff")
        segments = [(slot.header, RequestHeader.SIZE, False)]
        if req.data:
            ram.write(slot.data, req.data)
        segments += split_buffer(slot.data, length, req.split, writable=not req.data)
        segments.append((slot.status, 1, True))
        handle = self.queues[queue]
        head = handle.ring.add(segments)
        handle.ring.kick()
        self._inflight[queue][head] = (slot_no, req)
        return head

    def complete(self, queue: int = 0, timeout: float = 10.0) -> list[tuple[int, int, bytes]]:
        """Wait for at least one completion; returns [(head, status, data read)]."""
        ring = self.queues[queue].ring
        done = ring.reap()
        while not done:
            if not ring.wait(timeout):
                raise TimeoutError(f"queue {queue}: no completion within {timeout} s")
            done = ring.reap()
        out = []
        for head, used_len in done:
            slot_no, req = self._inflight[queue].pop(head)
            slot = self._slots[queue][slot_no]
            status = self.fe.ram.read(slot.status, 1)[0]
            data = b""
            if req.read_len and status == Status.OK:
                data = self.fe.ram.read(slot.data, req.read_len)
            self._free[queue].append(slot_no)
            out.append((head, status, data))
        return out

    def run(self, requests: list[BlkRequest], queue: int = 0) -> list[tuple[int, bytes]]:
        """Submit many (as many in flight as slots allow); results in request order."""
        results: dict[int, tuple[int, bytes]] = {}
        token_to_index: dict[int, int] = {}
        pending = list(enumerate(requests))
        while pending or token_to_index:
            while pending and self._free[queue]:
                i, req = pending.pop(0)
                token_to_index[self.submit(req, queue)] = i
            for head, status, data in self.complete(queue):
                results[token_to_index.pop(head)] = (status, data)
        return [results[i] for i in range(len(requests))]

    # -- one-request helpers --------------------------------------------------------
    def _one(self, req: BlkRequest, queue: int, what: str) -> bytes:
        status, data = self.run([req], queue)[0]
        if status != Status.OK:
            raise BlkIOError(status, what)
        return data

    def read(self, sector: int, length: int, *, queue: int = 0, split: int = 1) -> bytes:
        return self._one(BlkRequest(RequestType.IN, sector, read_len=length, split=split),
                         queue, f"read {length} at sector {sector}")

    def write(self, sector: int, data: bytes, *, queue: int = 0, split: int = 1) -> None:
        self._one(BlkRequest(RequestType.OUT, sector, data=data, split=split),
                  queue, f"write {len(data)} at sector {sector}")

    def flush(self, *, queue: int = 0) -> None:
        self._one(BlkRequest(RequestType.FLUSH), queue, "flush")

    def get_id(self, *, queue: int = 0) -> bytes:
        return self._one(BlkRequest(RequestType.GET_ID, read_len=ID_BYTES), queue, "get-id")

    def discard(self, sector: int, num_sectors: int, *, queue: int = 0) -> None:
        seg = DiscardSegment(sector, num_sectors).pack()
        self._one(BlkRequest(RequestType.DISCARD, data=seg), queue, "discard")

    def write_zeroes(self, sector: int, num_sectors: int, *, unmap: bool = False, queue: int = 0) -> None:
        seg = DiscardSegment(sector, num_sectors, WRITE_ZEROES_FLAG_UNMAP if unmap else 0).pack()
        self._one(BlkRequest(RequestType.WRITE_ZEROES, data=seg), queue, "write-zeroes")
