"""The built-in front-end: a minimal VMM without a CPU.

Theory of operation: `GuestRam` owns guest memory as memfd regions (the same
kind of memory QEMU's memory-backend-memfd passes); `Frontend` connects to any
vhost-user back-end socket and negotiates as QEMU does (features, protocol
features, owner, memory table through ADD_MEM_REG when CONFIGURE_MEM_SLOTS is
offered, else SET_MEM_TABLE, then per queue call/num/base/addr/kick/enable);
`DriverQueue` (C, vhost_user.driver_ring) is the guest-side ring. Device driver
models (`vhost_user.drivers`) sit on top. Nothing here knows which back-end it
talks to: tests drive qemu-storage-daemon exactly as they drive ours.

Front-end virtual addresses are synthetic: each region gets a distinct fake
`userspace_addr`, which is all the protocol needs (the back-end only uses
them to translate ring addresses), and it catches back-ends that confuse
guest-physical with front-end addresses.
"""

from __future__ import annotations

import logging
import mmap
import os
import socket
from dataclasses import dataclass, field

from vhost_user.channel import BlockingChannel, close_fds
from vhost_user.driver_ring import DriverQueue, ring_layout
from vhost_user.errors import RemoteProtocolError, VhostUserError
from vhost_user.protocol import (
    VHOST_USER_F_PROTOCOL_FEATURES,
    BackendRequest,
    ConfigSpace,
    Empty,
    FrontendRequest as R,
    InflightDescription,
    MemoryRegion,
    MemoryTable,
    Message,
    MessageDecoder,
    ProtocolFeature as PF,
    SingleMemoryRegion,
    U64,
    VirtioFeature,
    VringAddress,
    VringFdRequest,
    VringState,
    spec_for,
)

__all__ = ["GuestRam", "RamRegion", "Frontend", "FrontendError", "QueueHandle"]

log = logging.getLogger(__name__)

_FAKE_UADDR_BASE = 0x7F00_0000_0000
_PAGE = 4096

# What the built-in front-end understands, like QEMU's vhost-user client.
FRONTEND_PROTOCOL_FEATURES = (
    (1 << PF.MQ) | (1 << PF.REPLY_ACK) | (1 << PF.BACKEND_REQ) | (1 << PF.CONFIG)
    | (1 << PF.INFLIGHT_SHMFD) | (1 << PF.RESET_DEVICE) | (1 << PF.CONFIGURE_MEM_SLOTS)
    | (1 << PF.STATUS)
)


class FrontendError(VhostUserError):
    """The back-end refused or failed a request."""


@dataclass
class RamRegion:
    gpa: int
    size: int
    fd: int
    mem: mmap.mmap
    uaddr: int

    def contains(self, gpa: int, length: int = 1) -> bool:
        return self.gpa <= gpa and gpa + length <= self.gpa + self.size


class GuestRam:
    """Guest memory as memfd regions, with a bump allocator for rings and buffers."""

    def __init__(self, layout: list[tuple[int, int]] | None = None):
        """`layout` is a list of (gpa, size); default one 64 MiB region at GPA 0."""
        self.regions: list[RamRegion] = []
        for i, (gpa, size) in enumerate(layout or [(0, 64 << 20)]):
            if size % _PAGE or gpa % _PAGE:
                raise ValueError("regions must be page aligned")
            fd = os.memfd_create(f"guest-ram-{i}", os.MFD_CLOEXEC)
            os.ftruncate(fd, size)
            mem = mmap.mmap(fd, size, mmap.MAP_SHARED)
            self.regions.append(RamRegion(gpa, size, fd, mem, _FAKE_UADDR_BASE + (i << 40) + gpa))
        self._next = {id(r): 0 for r in self.regions}

    def region_of(self, gpa: int, length: int = 1) -> RamRegion:
        for r in self.regions:
            if r.contains(gpa, length):
                return r
        raise ValueError(f"GPA range {gpa:#x}+{length} is not inside one RAM region")

    def uaddr(self, gpa: int) -> int:
        r = self.region_of(gpa)
        return r.uaddr + gpa - r.gpa

    def alloc(self, size: int, align: int = 64, region: int = 0) -> int:
        """Allocate `size` bytes in region `region`; returns the GPA."""
        r = self.regions[region]
        off = -(-self._next[id(r)] // align) * align
        if off + size > r.size:
            raise MemoryError(f"guest RAM region {region} exhausted")
        self._next[id(r)] = off + size
        return r.gpa + off

    def read(self, gpa: int, length: int) -> bytes:
        r = self.region_of(gpa, length)
        off = gpa - r.gpa
        return r.mem[off: off + length]

    def write(self, gpa: int, data: bytes) -> None:
        r = self.region_of(gpa, len(data))
        off = gpa - r.gpa
        r.mem[off: off + len(data)] = data

    def memory_regions(self) -> list[MemoryRegion]:
        return [MemoryRegion(r.gpa, r.size, r.uaddr, 0) for r in self.regions]

    def close(self) -> None:
        for r in self.regions:
            r.mem.close()
            os.close(r.fd)
        self.regions = []


@dataclass
class QueueHandle:
    """A started queue as the driver sees it."""

    index: int
    size: int
    ring: DriverQueue
    kick_fd: int
    call_fd: int
    err_fd: int
    region: int = 0
    extra: dict = field(default_factory=dict)


class Frontend:
    """Connects to one back-end socket and drives it like QEMU's vhost-user client."""

    def __init__(self, path: "str | socket.socket", ram: GuestRam | None = None, *,
                 ram_size: int = 64 << 20, timeout: float = 30.0):
        """Connect to `path`, or drive an already connected socket (one end of a
        socket pair whose other end the back-end got as `--fd`; the front-end
        owns it from now on). Without `ram`, one region of `ram_size` bytes at
        GPA 0 is made here and closed with the front-end; a given `ram` stays
        the caller's. A failed connect names `path`."""
        self._owns_ram = ram is None
        self.ram = GuestRam([(0, ram_size)]) if ram is None else ram
        if isinstance(path, socket.socket):
            sock = path
        else:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(path)
            except OSError as exc:
                sock.close()
                if self._owns_ram:
                    self.ram.close()
                raise OSError(exc.errno, exc.strerror, path) from None
        decoder = MessageDecoder(incoming_requests=BackendRequest, replies_to=R)
        self.channel = BlockingChannel(sock, decoder, timeout)
        self.features = 0
        self.backend_features = 0
        self.protocol_features = 0
        self.backend_protocol_features = 0
        self.num_queues = 1
        self.max_mem_slots = 0
        self.queues: dict[int, QueueHandle] = {}
        self._backend_req: socket.socket | None = None
        self.inflight: tuple[int, InflightDescription] | None = None

    # -- plumbing -----------------------------------------------------------
    def has_protocol_feature(self, bit: int) -> bool:
        return bool(self.protocol_features & (1 << bit))

    def call(self, request: R, payload=None, *, fds=(), ack: bool = True):
        """Send one request; return the reply payload (or None for acked/unacked sets).

        Set-type requests ask for REPLY_ACK when it was negotiated, so a
        back-end's refusal becomes a FrontendError right here.
        """
        spec = spec_for(request)
        want_ack = ack and spec.reply is None and self.has_protocol_feature(PF.REPLY_ACK)
        msg = Message.make(request, payload if payload is not None else Empty(), fds=tuple(fds),
                           need_reply=want_ack)
        self.channel.send(msg)
        if spec.reply is None and not want_ack:
            return None
        reply = self._receive_reply(request)
        if spec.reply is None:
            if reply.payload.value != 0:
                raise FrontendError(f"back-end NACKed {request.name} ({reply.payload.value:#x})")
            return None
        return reply

    def _receive_reply(self, request: R) -> Message:
        msg = self.channel.receive()
        if msg is None:
            raise FrontendError(f"back-end closed the connection awaiting {request.name}")
        if not msg.is_reply or msg.request != request:
            close_fds(msg.fds)
            raise RemoteProtocolError(f"expected a reply to {request.name}, got {msg.request!r}")
        return msg

    def _value(self, request: R, payload=None) -> int:
        return self.call(request, payload).payload.value

    # -- negotiation --------------------------------------------------------------
    def negotiate(self, driver_features: int, *, protocol_features: int = FRONTEND_PROTOCOL_FEATURES,
                  use_mem_slots: bool = True) -> None:
        """The opening QEMU sends, up to SET_OWNER and SET_FEATURES."""
        self.backend_features = self._value(R.GET_FEATURES)
        if self.backend_features & (1 << VHOST_USER_F_PROTOCOL_FEATURES):
            self.backend_protocol_features = self._value(R.GET_PROTOCOL_FEATURES)
            wanted = protocol_features
            if not use_mem_slots:
                wanted &= ~(1 << PF.CONFIGURE_MEM_SLOTS)
            agreed = self.backend_protocol_features & wanted
            self.call(R.SET_PROTOCOL_FEATURES, U64(agreed), ack=False)
            self.protocol_features = agreed
        if self.has_protocol_feature(PF.MQ):
            self.num_queues = self._value(R.GET_QUEUE_NUM)
        if self.has_protocol_feature(PF.CONFIGURE_MEM_SLOTS):
            self.max_mem_slots = self._value(R.GET_MAX_MEM_SLOTS)
        if self.has_protocol_feature(PF.BACKEND_REQ):
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.call(R.SET_BACKEND_REQ_FD, fds=(theirs.fileno(),))
            finally:
                theirs.close()
            self._backend_req = ours
        self.call(R.SET_OWNER)
        features = driver_features & self.backend_features
        features |= self.backend_features & (1 << VHOST_USER_F_PROTOCOL_FEATURES)
        self.call(R.SET_FEATURES, U64(features))
        self.features = features

    def has_feature(self, bit: int) -> bool:
        return bool(self.features & (1 << bit))

    def get_config(self, size: int, offset: int = 0) -> bytes:
        reply = self.call(R.GET_CONFIG, ConfigSpace(offset, size, 0, bytes(size)))
        if reply.payload.size == 0:
            raise FrontendError("back-end refused GET_CONFIG")
        return reply.payload.payload

    def set_mem_table(self) -> None:
        """Announce guest RAM: ADD_MEM_REG per region (QEMU 10's way) or SET_MEM_TABLE."""
        regions = self.ram.memory_regions()
        if self.has_protocol_feature(PF.CONFIGURE_MEM_SLOTS):
            for region, ram in zip(regions, self.ram.regions):
                self.call(R.ADD_MEM_REG, SingleMemoryRegion(region), fds=(ram.fd,))
        else:
            self.call(R.SET_MEM_TABLE, MemoryTable(tuple(regions)),
                      fds=tuple(r.fd for r in self.ram.regions))

    def get_inflight_fd(self, queue_size: int) -> InflightDescription:
        """Ask the back-end for an inflight region (kept for a later reconnect)."""
        reply = self.call(R.GET_INFLIGHT_FD, InflightDescription(0, 0, self.num_queues, queue_size))
        if len(reply.fds) != 1 or reply.payload.mmap_size == 0:
            close_fds(reply.fds)
            raise FrontendError("back-end gave no inflight region")
        self.inflight = (reply.fds[0], reply.payload)
        return reply.payload

    def set_inflight_fd(self, fd: int, desc: InflightDescription) -> None:
        self.call(R.SET_INFLIGHT_FD, desc, fds=(fd,))

    # -- queues -------------------------------------------------------------------
    def setup_queue(self, index: int, size: int, *, region: int = 0) -> QueueHandle:
        """Lay out a split ring in guest RAM and hand it to the back-end, enabled."""
        desc_off, avail_off, used_off, total = ring_layout(size)
        gpa = self.ram.alloc(total, align=_PAGE, region=region)
        ram_region = self.ram.region_of(gpa, total)
        kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        err = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        base = gpa - ram_region.gpa
        ring = DriverQueue(
            ram_region.mem, ram_region.gpa, size,
            desc_offset=base + desc_off, avail_offset=base + avail_off, used_offset=base + used_off,
            kick_fd=kick, call_fd=call,
            event_idx=self.has_feature(VirtioFeature.VIRTIO_RING_F_EVENT_IDX),
        )
        handle = QueueHandle(index, size, ring, kick, call, err, region)
        self.queues[index] = handle
        self.call(R.SET_VRING_CALL, VringFdRequest.for_queue(index), fds=(call,))
        self.call(R.SET_VRING_ERR, VringFdRequest.for_queue(index), fds=(err,))
        self.call(R.SET_VRING_NUM, VringState(index, size))
        self.call(R.SET_VRING_BASE, VringState(index, 0))
        self.call(R.SET_VRING_ADDR, VringAddress(
            index, 0, self.ram.uaddr(ring.desc_gpa), self.ram.uaddr(ring.used_gpa),
            self.ram.uaddr(ring.avail_gpa), 0))
        self.call(R.SET_VRING_KICK, VringFdRequest.for_queue(index), fds=(kick,))
        if self.features & (1 << VHOST_USER_F_PROTOCOL_FEATURES):
            self.call(R.SET_VRING_ENABLE, VringState(index, 1))
        return handle

    def stop_queue(self, index: int) -> int:
        """GET_VRING_BASE: the back-end stops the ring and tells where it was."""
        reply = self.call(R.GET_VRING_BASE, VringState(index, 0))
        return reply.payload.num

    def reset_device(self) -> None:
        self.call(R.RESET_DEVICE)

    # -- teardown -------------------------------------------------------------------
    def close(self) -> None:
        for q in self.queues.values():
            q.ring.close()
            close_fds((q.kick_fd, q.call_fd, q.err_fd))
        self.queues.clear()
        if self._backend_req is not None:
            self._backend_req.close()
            self._backend_req = None
        if self.inflight is not None:
            close_fds((self.inflight[0],))
            self.inflight = None
        self.channel.close()
        if self._owns_ram:
            self.ram.close()

    def __enter__(self) -> "Frontend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
