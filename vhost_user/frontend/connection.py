"""The built-in front-end: a minimal VMM without a CPU.

Theory of operation: `GuestRam` owns guest memory as memfd regions (the same
kind of memory QEMU's memory-backend-memfd passes, or crosvm's one memfd with
every region at its own offset); `Frontend` connects to any vhost-user
back-end socket and speaks as one VMM does, following a `Profile`
(`vhost_user.frontend.profiles`: QEMU by default, or CROSVM): which messages, in which
order, with or without NEED_REPLY, the memory table's shape, the queue set-up
order and size. `DriverQueue` (C, vhost_user.frontend.driver_ring) is the guest-side
ring. Device driver models (`vhost_user.backends.<dev>.driver`) sit on top and run unchanged
under every profile. Nothing here knows which back-end it talks to: tests
drive qemu-storage-daemon exactly as they drive ours.

`GuestRam` itself lives in vhost_user.frontend.guestram (tests and the fuzz
targets build on the same model).
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field

from vhost_user.channel import BlockingChannel, close_fds
from vhost_user.frontend.driver_ring import PACKED_BASE, DriverQueue, packed_layout, ring_layout
from vhost_user.frontend.guestram import GuestRam, RamRegion
from vhost_user.errors import LocalProtocolError, RemoteProtocolError, VhostUserError
from vhost_user.frontend.profiles import CROSVM, QEMU, Profile, crosvm_ram_layout
from vhost_user.protocol import (
    VHOST_USER_F_PROTOCOL_FEATURES,
    BackendRequest,
    ConfigSpace,
    Empty,
    FrontendRequest as R,
    InflightDescription,
    LogDescription,
    MemoryTable,
    Message,
    MessageDecoder,
    ProtocolFeature as PF,
    ReplyKind,
    SingleMemoryRegion,
    U64,
    VirtioFeature,
    VringAddress,
    VringFdRequest,
    VringState,
    reply_kind,
    spec_for,
)

__all__ = ["GuestRam", "RamRegion", "Frontend", "FrontendError", "QueueHandle", "Profile", "QEMU", "CROSVM"]

log = logging.getLogger(__name__)

_PAGE = 4096

# What the built-in front-end asks for by default, like QEMU's vhost-user client.
FRONTEND_PROTOCOL_FEATURES = QEMU.protocol_features


class FrontendError(VhostUserError):
    """The back-end refused or failed a request."""


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
    base: int = 0      # the avail index SET_VRING_BASE hands over (non-zero on a resume)


class Frontend:
    """Connects to one back-end socket and drives it as one VMM does (`profile`)."""

    def __init__(self, path: "str | socket.socket", ram: GuestRam | None = None, *,
                 ram_size: int = 64 << 20, timeout: float = 30.0, profile: Profile = QEMU):
        """Connect to `path`, or drive an already connected socket (one end of a
        socket pair whose other end the back-end got as `--fd`; the front-end
        owns it from now on). Without `ram`, guest RAM of `ram_size` bytes is
        made here as the profile's VMM lays it out (QEMU: one region at GPA 0;
        crosvm: its x86-64 regions in one memfd) and closed with the
        front-end; a given `ram` stays the caller's. A failed connect names
        `path`."""
        self.profile = profile
        self._owns_ram = ram is None
        self.ram = _default_ram(profile, ram_size) if ram is None else ram
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
        self.shmem_config = None
        self.queues: dict[int, QueueHandle] = {}
        self._backend_req: socket.socket | None = None
        self._backend_channel: BlockingChannel | None = None
        self.inflight: tuple[int, InflightDescription] | None = None
        self._driver_features = 0
        self._wanted_protocol = profile.protocol_features
        self._sent_features: int | None = None

    # -- plumbing -----------------------------------------------------------
    def has_protocol_feature(self, bit: int) -> bool:
        return bool(self.protocol_features & (1 << bit))

    def call(self, request: R, payload=None, *, fds=(), ack: bool = True):
        """Send one request; return the reply payload (or None for acked/unacked sets).

        Set-type requests ask for REPLY_ACK when it was negotiated and the
        profile's VMM does so (QEMU; crosvm never does), so a back-end's
        refusal becomes a FrontendError right here. A request the profile's
        VMM never sends is a LocalProtocolError: the test would not be faithful.
        """
        if self.profile.sends is not None and request not in self.profile.sends:
            raise LocalProtocolError(f"{self.profile.name} never sends {request.name}")
        spec = spec_for(request)
        want_ack = (ack and self.profile.need_reply and spec.reply is None
                    and self.has_protocol_feature(PF.REPLY_ACK))
        msg = Message.make(request, payload if payload is not None else Empty(), fds=tuple(fds),
                           need_reply=want_ack)
        self.channel.send(msg)
        kind = reply_kind(request, msg.flags, reply_ack=self.has_protocol_feature(PF.REPLY_ACK))
        if kind is ReplyKind.NONE:
            return None
        reply = self._receive_reply(request)
        if kind is ReplyKind.ACK:
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
    def negotiate(self, driver_features: int, *, protocol_features: int | None = None,
                  use_mem_slots: bool = True) -> None:
        """The profile's opening, up to the point the guest could run.

        `driver_features` are what the guest driver would ack; the profile's
        feature mask and the back-end's offer cut them down. QEMU sends
        SET_FEATURES here; crosvm only at activation (`set_mem_table`).
        `protocol_features` overrides what the profile asks for.
        """
        self._driver_features = driver_features
        wanted = self.profile.protocol_features if protocol_features is None else protocol_features
        if not use_mem_slots:
            wanted &= ~(1 << PF.CONFIGURE_MEM_SLOTS)
        self._wanted_protocol = wanted
        for step in self.profile.opening:
            _OPENING[step](self)
        if self.profile.defer_set_features:
            self.features = self._guest_features()

    def _guest_features(self) -> int:
        offered = self.backend_features
        if self.profile.feature_mask is not None:
            offered &= self.profile.feature_mask
        return (self._driver_features & offered) | (offered & (1 << VHOST_USER_F_PROTOCOL_FEATURES))

    def _open_owner(self) -> None:
        self.call(R.SET_OWNER)

    def _open_features(self) -> None:
        self.backend_features = self._value(R.GET_FEATURES)
        # crosvm acks bit 30 at once, so its first SET_FEATURES is "a change"
        # only when the guest acked something.
        self._sent_features = self.backend_features & (1 << VHOST_USER_F_PROTOCOL_FEATURES)

    def _open_protocol_features(self) -> None:
        if self.backend_features & (1 << VHOST_USER_F_PROTOCOL_FEATURES):
            self.backend_protocol_features = self._value(R.GET_PROTOCOL_FEATURES)
            agreed = self.backend_protocol_features & self._wanted_protocol
            self.call(R.SET_PROTOCOL_FEATURES, U64(agreed), ack=False)
            self.protocol_features = agreed

    def _open_queue_num(self) -> None:
        if self.has_protocol_feature(PF.MQ):
            self.num_queues = self._value(R.GET_QUEUE_NUM)

    def _open_max_mem_slots(self) -> None:
        if self.has_protocol_feature(PF.CONFIGURE_MEM_SLOTS):
            self.max_mem_slots = self._value(R.GET_MAX_MEM_SLOTS)

    def _open_backend_req(self) -> None:
        if self.has_protocol_feature(PF.BACKEND_REQ):
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.call(R.SET_BACKEND_REQ_FD, fds=(theirs.fileno(),))
            finally:
                theirs.close()
            self._backend_req = ours

    def _open_shmem_config(self) -> None:
        if self.has_protocol_feature(PF.SHMEM):
            self.shmem_config = self.call(R.GET_SHMEM_CONFIG).payload

    def _open_set_features(self) -> None:
        self.features = self._guest_features()
        self.call(R.SET_FEATURES, U64(self.features))
        self._sent_features = self.features

    def has_feature(self, bit: int) -> bool:
        return bool(self.features & (1 << bit))

    def get_config(self, size: int, offset: int = 0) -> bytes:
        """Read config space as the profile's VMM does (crosvm: in 4-byte pieces)."""
        piece = self.profile.config_piece or size
        out = b""
        for off in range(offset, offset + size, piece):
            n = min(piece, offset + size - off)
            reply = self.call(R.GET_CONFIG, ConfigSpace(off, n, self.profile.config_flags, bytes(n)))
            p = reply.payload
            if p.size == 0:
                raise FrontendError("back-end refused GET_CONFIG")
            if self.profile.config_piece and (p.size != n or p.offset != off or len(p.payload) != n):
                # vmm_vhost's get_config takes nothing else (crosvm logs and the guest reads zeros)
                raise FrontendError(f"GET_CONFIG reply for {p.size} bytes at {p.offset}, asked {n} at {off}")
            out += p.payload
        return out

    def set_config(self, offset: int, data: bytes) -> None:
        """A guest's config write (flags 0 on both VMMs: crosvm's empty set, QEMU's FRONTEND)."""
        self.call(R.SET_CONFIG, ConfigSpace(offset, len(data), 0, bytes(data)))

    def set_mem_table(self) -> None:
        """Announce guest RAM: ADD_MEM_REG per region (QEMU 10's way) or SET_MEM_TABLE.

        Under a profile that defers SET_FEATURES (crosvm's `activate`), this
        is the device's activation: SET_FEATURES first, if the acked set
        changed since it was last sent.
        """
        if self.profile.defer_set_features and self.features != self._sent_features:
            self.call(R.SET_FEATURES, U64(self.features))
            self._sent_features = self.features
        regions = self.ram.memory_regions()
        if self.profile.mem_slots and self.has_protocol_feature(PF.CONFIGURE_MEM_SLOTS):
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
    def setup_queue(self, index: int, size: int, *, region: int | None = None) -> QueueHandle:
        """Lay out a ring in guest RAM (packed when VIRTIO_F_RING_PACKED was acked, else
        split) and hand it to the back-end, enabled.

        The profile fixes the order of the messages and may fix the size
        (crosvm offers 32768 and a Linux guest takes it, whatever the driver
        model would have chosen). A queue set up again (after a stop) gets a
        new ring.
        """
        size = self.profile.queue_size or size
        packed = self.has_feature(VirtioFeature.VIRTIO_F_RING_PACKED)
        desc_off, avail_off, used_off, total = (packed_layout if packed else ring_layout)(size)
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
            event_idx=self.has_feature(VirtioFeature.VIRTIO_RING_F_EVENT_IDX), packed=packed,
        )
        old = self.queues.pop(index, None)
        if old is not None:
            old.ring.close()
            close_fds((old.kick_fd, old.call_fd, old.err_fd))
        handle = QueueHandle(index, size, ring, kick, call, err, _region_index(self.ram, ram_region),
                             base=PACKED_BASE if packed else 0)
        self.queues[index] = handle
        for step in self.profile.vring_setup:
            _VRING_STEPS[step](self, handle)
        return handle

    def _vring_call(self, q: QueueHandle) -> None:
        self.call(R.SET_VRING_CALL, VringFdRequest.for_queue(q.index), fds=(q.call_fd,))

    def _vring_err(self, q: QueueHandle) -> None:
        self.call(R.SET_VRING_ERR, VringFdRequest.for_queue(q.index), fds=(q.err_fd,))

    def _vring_num(self, q: QueueHandle) -> None:
        self.call(R.SET_VRING_NUM, VringState(q.index, q.size))

    def _vring_base(self, q: QueueHandle) -> None:
        self.call(R.SET_VRING_BASE, VringState(q.index, q.base))

    def _vring_addr(self, q: QueueHandle) -> None:
        ring = q.ring
        self.call(R.SET_VRING_ADDR, VringAddress(
            q.index, 0, self.ram.uaddr(ring.desc_gpa), self.ram.uaddr(ring.used_gpa),
            self.ram.uaddr(ring.avail_gpa), 0))

    def _vring_kick(self, q: QueueHandle) -> None:
        self.call(R.SET_VRING_KICK, VringFdRequest.for_queue(q.index), fds=(q.kick_fd,))

    def _vring_enable(self, q: QueueHandle) -> None:
        if self.features & (1 << VHOST_USER_F_PROTOCOL_FEATURES):
            self.call(R.SET_VRING_ENABLE, VringState(q.index, 1))

    def stop_queue(self, index: int) -> int:
        """GET_VRING_BASE: the back-end stops the ring and tells where it was.

        crosvm (`deactivate_vring`) disables the ring first when bit 30 was acked.
        """
        if self.profile.disable_before_stop and self.features & (1 << VHOST_USER_F_PROTOCOL_FEATURES):
            self.call(R.SET_VRING_ENABLE, VringState(index, 0))
        reply = self.call(R.GET_VRING_BASE, VringState(index, 0))
        return reply.payload.num

    def suspend(self) -> dict[int, int]:
        """Stop every queue (crosvm's `virtio_sleep` and `reset`); returns each base."""
        return {i: self.stop_queue(i) for i in sorted(self.queues)}

    def resume(self, bases: dict[int, int], *, mem_table: bool = True) -> None:
        """Activate again with the same rings from `bases` (crosvm's `virtio_wake`):
        SET_FEATURES if changed, the memory table, then each queue's set-up.
        `mem_table=False` is QEMU's restart after a stop: its memory slots did
        not change, so it sends none."""
        if mem_table:
            self.set_mem_table()
        for index, base in sorted(bases.items()):
            q = self.queues[index]
            q.base = base
            for step in self.profile.vring_setup:
                _VRING_STEPS[step](self, q)

    def reset_device(self) -> None:
        self.call(R.RESET_DEVICE)

    def set_log_base(self, fd: int | None, size: int, offset: int = 0) -> int:
        """SET_LOG_BASE with the log memfd, as QEMU sends it (no NEED_REPLY; with
        LOG_SHMFD the back-end answers with a u64, whose meaning the spec leaves
        open: QEMU ignores it); returns that value.
        `fd` None sends none (a hostile front-end)."""
        self.call(R.SET_LOG_BASE, LogDescription(size, offset), fds=() if fd is None else (fd,),
                  ack=False)
        if not self.has_protocol_feature(PF.LOG_SHMFD):
            return 0
        return self._receive_reply(R.SET_LOG_BASE).payload.value

    # -- the back-end's requests (SET_BACKEND_REQ_FD) ---------------------------------
    def backend_request(self, timeout: float = 10.0) -> Message | None:
        """Wait up to `timeout` s for one request on the back-end channel; None if
        none came. A request asking for an ack (NEED_REPLY) is acked with 0, as
        QEMU does once it handled it; its fds are the caller's."""
        if self._backend_req is None:
            raise LocalProtocolError("no back-end channel (BACKEND_REQ not negotiated)")
        if self._backend_channel is None:
            self._backend_channel = BlockingChannel(self._backend_req, MessageDecoder.for_frontend(), timeout)
        self._backend_req.settimeout(timeout)
        try:
            msg = self._backend_channel.receive()
        except TimeoutError:
            return None
        if msg is not None and msg.need_reply:
            self._backend_channel.send(msg.ack(True))
        return msg

    # -- teardown -------------------------------------------------------------------
    def close(self) -> None:
        for q in self.queues.values():
            q.ring.close()
            close_fds((q.kick_fd, q.call_fd, q.err_fd))
        self.queues.clear()
        if self._backend_req is not None:
            self._backend_req.close()
            self._backend_req = None
            self._backend_channel = None
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


_OPENING = {
    "owner": Frontend._open_owner,
    "features": Frontend._open_features,
    "protocol_features": Frontend._open_protocol_features,
    "queue_num": Frontend._open_queue_num,
    "max_mem_slots": Frontend._open_max_mem_slots,
    "backend_req": Frontend._open_backend_req,
    "shmem_config": Frontend._open_shmem_config,
    "set_features": Frontend._open_set_features,
}

_VRING_STEPS = {
    "call": Frontend._vring_call,
    "err": Frontend._vring_err,
    "num": Frontend._vring_num,
    "base": Frontend._vring_base,
    "addr": Frontend._vring_addr,
    "kick": Frontend._vring_kick,
    "enable": Frontend._vring_enable,
}


def _region_index(ram: GuestRam, region: RamRegion) -> int:
    """The index of `region` in `ram` (for QueueHandle.region)."""
    return next(i for i, r in enumerate(ram.regions) if r is region)


def _default_ram(profile: Profile, size: int) -> GuestRam:
    """Guest RAM as the profile's VMM makes it; allocations go to the largest region."""
    if not profile.single_memfd:
        return GuestRam([(0, size)])
    layout = crosvm_ram_layout(size)
    largest = max(range(len(layout)), key=lambda i: layout[i][1])
    return GuestRam(layout, single_fd=True, alloc_region=largest)
