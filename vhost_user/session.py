"""One front-end connection: the back-end side of the vhost-user protocol.

Theory of operation: the session receives decoded messages from the channel
and dispatches them through one table (`_HANDLERS`). Before a handler runs,
`_check_allowed` applies the two legality rules in one place: some requests
need SET_OWNER first (`_NEEDS_OWNER`) and some need a negotiated protocol
feature (from the codec's request table). Every fd a message carries is owned
by an `FdBag` that closes whatever the handler did not take, so no path leaks.
A handler that fails logs one line; with REPLY_ACK the front-end gets a NACK,
and requests with a reply of their own get an error-shaped reply, so the
front-end never waits forever.

Queues run in worker threads (see `vhost_user.virtqueue`); the session only
changes their state. A queue runs while it has a kick fd, ring addresses,
guest memory and is enabled; GET_VRING_BASE stops it.
"""

from __future__ import annotations

import logging
import mmap
import os
import socket
from typing import Callable

from vhost_user.channel import AsyncChannel, BackendChannel, close_fds
from vhost_user.device import VirtioDevice
from vhost_user.devicestate import LOAD, SAVE, STOPPED, StateTransfer
from vhost_user.dirtylog import DirtyLogs
from vhost_user.errors import GuestMemoryError, RemoteProtocolError, UnsupportedRequest, VhostUserError
from vhost_user.memory import GuestMemory
from vhost_user.protocol import (
    VHOST_F_LOG_ALL,
    VHOST_USER_F_PROTOCOL_FEATURES,
    ConfigSpace,
    Empty,
    FrontendRequest as R,
    InflightDescription,
    Message,
    ProtocolFeature as PF,
    ReplyKind,
    U64,
    VirtioFeature,
    VringState,
    reply_kind,
    spec_for,
)
from vhost_user.virtqueue import Virtqueue, inflight_queue_size

__all__ = ["Session", "SERVER_PROTOCOL_FEATURES", "MAX_MEM_SLOTS"]

log = logging.getLogger(__name__)

MAX_MEM_SLOTS = 32

# Protocol features the core implements for every device.
SERVER_PROTOCOL_FEATURES = (
    (1 << PF.MQ)
    | (1 << PF.REPLY_ACK)
    | (1 << PF.BACKEND_REQ)
    | (1 << PF.RESET_DEVICE)
    | (1 << PF.CONFIGURE_MEM_SLOTS)
    | (1 << PF.STATUS)
    | (1 << PF.DEVICE_STATE)
)

_NEEDS_OWNER = frozenset({
    R.SET_FEATURES, R.SET_MEM_TABLE, R.ADD_MEM_REG, R.REM_MEM_REG,
    R.SET_VRING_NUM, R.SET_VRING_ADDR, R.SET_VRING_BASE, R.GET_VRING_BASE,
    R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR, R.SET_VRING_ENABLE,
    R.GET_INFLIGHT_FD, R.SET_INFLIGHT_FD, R.SET_LOG_BASE, R.SET_LOG_FD,
})

# crosvm reads config space without negotiating CONFIG; serving it is harmless.
_FEATURE_GATE_EXEMPT = frozenset({R.GET_CONFIG, R.SET_CONFIG})

_VRING_INDEX_MASK = 0xFF
_VRING_NOFD = 1 << 8


class FdBag:
    """Owns a message's fds; closes every fd a handler did not take."""

    def __init__(self, fds):
        self._fds = list(fds)

    def __len__(self) -> int:
        return len(self._fds)

    def take(self) -> int:
        if not self._fds:
            raise RemoteProtocolError("message carries no fd", recoverable=True)
        return self._fds.pop(0)

    def take_all(self) -> list[int]:
        fds, self._fds = self._fds, []
        return fds

    def close(self) -> None:
        close_fds(self._fds)
        self._fds = []


class Session:
    """State of one front-end connection; created per accepted socket."""

    def __init__(self, device: VirtioDevice, channel: AsyncChannel):
        self.device = device
        self.channel = channel
        self.owner = False
        self.features = 0
        self.protocol_features = 0
        self.memory = GuestMemory.empty()
        self.status = 0
        self.queues = [Virtqueue(i, device.max_queue_size, poll_us=device.poll_us)
                       for i in range(device.num_queues)]
        self._enabled = [False] * device.num_queues
        self._addr_set = [False] * device.num_queues
        self._backend_sock: socket.socket | None = None
        self._inflight: mmap.mmap | None = None
        self._inflight_queue_size = 0
        self._logs = DirtyLogs()
        self._state: StateTransfer | None = None

    # -- helpers ------------------------------------------------------------
    def offered_features(self) -> int:
        log_all = (1 << VHOST_F_LOG_ALL) if self.device.dirty_log else 0
        return self.device.features() | (1 << VHOST_USER_F_PROTOCOL_FEATURES) | log_all

    def offered_protocol_features(self) -> int:
        log_shmfd = (1 << PF.LOG_SHMFD) if self.device.dirty_log else 0
        inflight = (1 << PF.INFLIGHT_SHMFD) if self.device.inflight else 0
        return SERVER_PROTOCOL_FEATURES | self.device.protocol_features() | log_shmfd | inflight

    def has_protocol_feature(self, bit: int) -> bool:
        return bool(self.protocol_features & (1 << bit))

    def _queue(self, index: int) -> Virtqueue:
        if not 0 <= index < len(self.queues):
            raise RemoteProtocolError(
                f"queue index {index} out of range (device has {len(self.queues)})",
                recoverable=True,
            )
        return self.queues[index]

    def _check_allowed(self, msg: Message) -> None:
        req = msg.request
        if req in _NEEDS_OWNER and not self.owner:
            raise RemoteProtocolError(f"{req.name} before SET_OWNER", recoverable=True)
        feature = spec_for(req).feature
        if feature is not None and req not in _FEATURE_GATE_EXEMPT:
            if not self.has_protocol_feature(feature):
                raise UnsupportedRequest(f"{req.name} needs protocol feature {PF(feature).name}")

    # -- dispatch -------------------------------------------------------------
    def handle(self, msg: Message) -> None:
        """Process one request and send whatever reply the protocol calls for."""
        bag = FdBag(msg.fds)
        handler = _HANDLERS.get(msg.request)
        reply_payload = None
        ok = True
        try:
            if handler is None:
                raise UnsupportedRequest(f"request {msg.request!r} is not supported")
            self._check_allowed(msg)
            reply_payload = handler(self, msg, bag)
        except (VhostUserError, ValueError, OSError) as exc:
            ok = False
            name = getattr(msg.request, "name", msg.request)
            log.warning("%s failed: %s", name, exc)
        finally:
            bag.close()
        self._reply(msg, reply_payload, ok)

    def _reply(self, msg: Message, payload, ok: bool) -> None:
        fds: tuple[int, ...] = ()
        if isinstance(payload, WithFds):
            payload, fds = payload.payload, payload.fds
        try:
            kind = reply_kind(msg.request, msg.flags, reply_ack=self.has_protocol_feature(PF.REPLY_ACK))
            if msg.request == R.SET_LOG_BASE and self.has_protocol_feature(PF.LOG_SHMFD):
                kind = ReplyKind.BODY  # vhost-user.rst: with LOG_SHMFD the back-end answers
                if not ok:
                    payload = U64(1)
            if kind is ReplyKind.BODY:
                if payload is None:
                    payload = _error_reply(msg)
                self.channel.send(msg.reply(payload, fds=fds))
            elif kind is ReplyKind.ACK:
                self.channel.send(msg.ack(ok))
        finally:
            close_fds(fds)

    # -- features and ownership ----------------------------------------------
    def _get_features(self, msg, bag):
        return U64(self.offered_features())

    def _set_features(self, msg, bag):
        value = msg.payload.value
        unknown = value & ~self.offered_features()
        ignored = unknown & self.device.ignored_acked_features
        if ignored:
            log.info("SET_FEATURES: ignoring acked but unoffered bits %#x", ignored)
            value, unknown = value & ~ignored, unknown & ~ignored
        if unknown:
            raise RemoteProtocolError(f"SET_FEATURES acks unoffered bits {unknown:#x}", recoverable=True)
        transport = (1 << VHOST_USER_F_PROTOCOL_FEATURES) | (1 << VHOST_F_LOG_ALL)
        # QEMU toggles LOG_ALL on a running device when migration starts and
        # ends: that changes only the dirty log, not the device.
        log_only = (value ^ self.features) & ~transport == 0 and any(vq.started for vq in self.queues)
        packed = bool(value & (1 << VirtioFeature.VIRTIO_F_RING_PACKED))
        if not log_only and any(vq.started and vq.packed != packed for vq in self.queues):
            raise RemoteProtocolError("SET_FEATURES changes the ring layout of a running queue",
                                      recoverable=True)
        self.features = value
        self._apply_dirty_log()
        if log_only:
            return
        self.device.set_features(value & ~transport)
        event_idx = bool(value & (1 << VirtioFeature.VIRTIO_RING_F_EVENT_IDX))
        for vq in self.queues:
            vq.set_event_idx(event_idx)
            vq.set_packed(packed)
        if not value & (1 << VHOST_USER_F_PROTOCOL_FEATURES):
            # Without protocol features, rings are enabled as soon as they start.
            self._enabled = [True] * len(self.queues)

    def _get_protocol_features(self, msg, bag):
        return U64(self.offered_protocol_features())

    def _set_protocol_features(self, msg, bag):
        value = msg.payload.value
        unknown = value & ~self.offered_protocol_features()
        if unknown:
            raise RemoteProtocolError(f"SET_PROTOCOL_FEATURES acks unoffered bits {unknown:#x}", recoverable=True)
        self.protocol_features = value
        self.device.acked_protocol_features = value

    def _set_owner(self, msg, bag):
        self.owner = True

    def _reset_owner(self, msg, bag):
        self._reset_device(msg, bag)

    def _reset_device(self, msg, bag):
        """Disable all rings and return to the state after SET_OWNER."""
        self._stop_all()
        for vq in self.queues:
            vq.reset()
        self._enabled = [False] * len(self.queues)
        self._addr_set = [False] * len(self.queues)
        self.features = 0
        self._apply_dirty_log()
        self.status = 0
        self.device.reset()

    def _get_queue_num(self, msg, bag):
        return U64(len(self.queues))

    def _get_max_mem_slots(self, msg, bag):
        return U64(MAX_MEM_SLOTS)

    # -- memory -----------------------------------------------------------------
    def _swap_memory(self, new: GuestMemory) -> None:
        old, self.memory = self.memory, new
        for vq in self.queues:
            if vq.started:
                vq.update_memory(new)
        old.close()
        for i in range(len(self.queues)):
            self._maybe_start(i)

    def _set_mem_table(self, msg, bag):
        regions = msg.payload.regions
        if len(bag) != len(regions):
            raise RemoteProtocolError(
                f"SET_MEM_TABLE has {len(regions)} regions but {len(bag)} fds", recoverable=True
            )
        self._swap_memory(GuestMemory.from_table(bag.take_all(), regions))

    def _add_mem_reg(self, msg, bag):
        r = msg.payload.region
        if len(self.memory.regions) >= MAX_MEM_SLOTS:
            raise GuestMemoryError(f"no free memory slot (max {MAX_MEM_SLOTS})")
        new = self.memory.with_region(
            bag.take(), r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset
        )
        self._swap_memory(new)

    def _rem_mem_reg(self, msg, bag):
        r = msg.payload.region
        self._swap_memory(self.memory.without_region(r.guest_phys_addr, r.memory_size, r.userspace_addr))

    # -- vrings -----------------------------------------------------------------
    def _stop_for_change(self, vq: Virtqueue, what: str) -> None:
        if vq.started:
            log.warning("queue %d changed (%s) while running; stopping it first", vq.index, what)
            vq.stop()
            self.device.queue_stopped(vq.index)

    def _set_vring_num(self, msg, bag):
        vq = self._queue(msg.payload.index)
        self._stop_for_change(vq, "num")
        vq.set_num(msg.payload.num)

    def _set_vring_addr(self, msg, bag):
        p = msg.payload
        vq = self._queue(p.index)
        gpa = self.has_protocol_feature(PF.GPA_ADDRESSES)
        if vq.started and vq.same_rings(p.descriptor, p.available, p.used, gpa):
            # Migration start/end: only VHOST_VRING_F_LOG and log_guest_addr change.
            vq.set_log_flags(p.flags, p.log)
            return
        was_running = vq.started
        self._stop_for_change(vq, "addr")
        vq.set_addr(p.descriptor, p.available, p.used, flags=p.flags, log=p.log, gpa=gpa)
        self._addr_set[p.index] = True
        if was_running:
            self._maybe_start(p.index)

    def _set_vring_base(self, msg, bag):
        vq = self._queue(msg.payload.index)
        self._stop_for_change(vq, "base")
        vq.set_base(msg.payload.num)

    def _get_vring_base(self, msg, bag):
        index = msg.payload.index
        vq = self._queue(index)
        if vq.started:
            self.device.queue_stopped(index)
        base = vq.stop()
        vq.set_kick(None)
        return VringState(index, base)

    def _vring_fd(self, msg, bag) -> tuple[Virtqueue, int | None]:
        value = msg.payload.value
        vq = self._queue(value & _VRING_INDEX_MASK)
        if value & _VRING_NOFD:
            return vq, None
        return vq, bag.take()

    def _set_vring_kick(self, msg, bag):
        vq, fd = self._vring_fd(msg, bag)
        if fd is None:
            raise UnsupportedRequest(f"queue {vq.index}: polling mode (no kick fd) is not supported")
        was_running = vq.started
        if was_running:
            vq.stop()
        vq.set_kick(fd)
        if not self.features & (1 << VHOST_USER_F_PROTOCOL_FEATURES):
            self._enabled[vq.index] = True
        self._maybe_start(vq.index)

    def _set_vring_call(self, msg, bag):
        vq, fd = self._vring_fd(msg, bag)
        vq.set_call(fd)

    def _set_vring_err(self, msg, bag):
        vq, fd = self._vring_fd(msg, bag)
        vq.set_err(fd)

    def _set_vring_enable(self, msg, bag):
        index, enable = msg.payload.index, bool(msg.payload.num)
        vq = self._queue(index)
        self._enabled[index] = enable
        if enable:
            self._maybe_start(index)
        elif vq.started:
            vq.stop()
            self.device.queue_stopped(index)

    def _maybe_start(self, index: int) -> None:
        vq = self.queues[index]
        if vq.started or vq.broken or not vq.has_kick or not self._addr_set[index]:
            return
        if not self._enabled[index] or not self.memory.regions:
            return
        if self._inflight is not None and self.has_protocol_feature(PF.INFLIGHT_SHMFD):
            vq.set_inflight(self._inflight, index * inflight_queue_size(self._inflight_queue_size))
        vq.start(self.memory, self.device.queue_handler(index))
        log.info("queue %d started (%s ring, size %d, base %#x)", index,
                 "packed" if vq.packed else "split", vq.num, vq.get_base())

    def _stop_all(self) -> None:
        for vq in self.queues:
            if vq.started:
                vq.stop()
                self.device.queue_stopped(vq.index)

    # -- config, status, channels ------------------------------------------------
    def _get_config(self, msg, bag):
        p = msg.payload
        data = self.device.get_config(p.offset, p.size)
        return ConfigSpace(p.offset, len(data), p.flags, data)

    def _set_config(self, msg, bag):
        p = msg.payload
        self.device.set_config(p.offset, p.payload, p.flags)

    def _set_backend_req_fd(self, msg, bag):
        if self._backend_sock is not None:
            self.device.set_backend_channel(None)
            self._backend_sock.close()
        self._backend_sock = socket.socket(fileno=bag.take())
        self.device.set_backend_channel(BackendChannel(self._backend_sock))

    def _send_rarp(self, msg, bag):
        self.device.send_rarp(msg.payload.value.to_bytes(8, "little")[:6])

    def _net_set_mtu(self, msg, bag):
        self.device.set_mtu(msg.payload.value)

    def _gpu_set_socket(self, msg, bag):
        self.device.set_gpu_socket(bag.take())

    def _set_status(self, msg, bag):
        """SET_STATUS: the driver's status byte. 0 stops every queue at once (what
        virtio's reset means for the rings); the device keeps its state, since
        QEMU 10 sends 0 on every vhost stop, a VM pause included, and a paused
        guest's vsock connections must survive. RESET_DEVICE forgets everything."""
        value = msg.payload.value & 0xFF
        if value == 0 and self.status != 0:
            self._stop_all()
            log.info("SET_STATUS 0: every queue stopped")
        self.status = value

    def _get_status(self, msg, bag):
        return U64(self.status)

    # -- dirty logging (vhost_user/dirtylog.py) ------------------------------------
    def _set_log_base(self, msg, bag):
        if not self.has_protocol_feature(PF.LOG_SHMFD):
            raise UnsupportedRequest("SET_LOG_BASE without LOG_SHMFD (a log in our address space)")
        p = msg.payload
        new = self._logs.set_base(bag.take(), p.mmap_size, p.mmap_offset, self.memory)
        log.info("dirty log: %d bytes (%d pages)", new.size, new.size * 8)
        self._apply_dirty_log()
        return U64(0)

    def _set_log_fd(self, msg, bag):
        self._logs.set_call_fd(bag.take())
        self._apply_dirty_log()

    def _apply_dirty_log(self) -> None:
        """Point every queue at the current log while VHOST_F_LOG_ALL is acked."""
        active = self._logs.current if self.features & (1 << VHOST_F_LOG_ALL) else None
        for vq in self.queues:
            vq.set_dirty_log(active)

    # -- device state (vhost_user/devicestate.py) -----------------------------------
    def _set_device_state_fd(self, msg, bag):
        p = msg.payload
        fd = bag.take()
        try:
            if p.direction not in (SAVE, LOAD):
                raise RemoteProtocolError(f"device state direction {p.direction} unknown", recoverable=True)
            if p.phase != STOPPED:
                raise RemoteProtocolError(f"device state phase {p.phase}: only STOPPED (0) is served",
                                          recoverable=True)
            running = [vq.index for vq in self.queues if vq.started]
            if running:
                raise RemoteProtocolError(f"device state transfer while queues {running} run",
                                          recoverable=True)
            if self._state is not None and self._state.running:
                raise RemoteProtocolError("a device state transfer is still running", recoverable=True)
        except BaseException:
            os.close(fd)
            raise
        self._state = StateTransfer(self.device, p.direction, fd)
        return U64(_VRING_NOFD)  # success, and we use the front-end's fd

    def _check_device_state(self, msg, bag):
        if self._state is None:
            raise RemoteProtocolError("CHECK_DEVICE_STATE without a transfer", recoverable=True)
        state, self._state = self._state, None
        if not state.check():
            raise VhostUserError(f"device state transfer failed: {state.error}")
        return U64(0)

    def _get_inflight_fd(self, msg, bag):
        p = msg.payload
        if not 0 < p.num_queues <= len(self.queues) or not 0 < p.queue_size <= self.device.max_queue_size:
            raise RemoteProtocolError(
                f"GET_INFLIGHT_FD for {p.num_queues} queues of {p.queue_size}", recoverable=True
            )
        size = p.num_queues * inflight_queue_size(p.queue_size)
        fd = os.memfd_create("vhost-user-inflight", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            self._set_inflight(mmap.mmap(fd, size), p.queue_size)
        except OSError:
            os.close(fd)
            raise
        return WithFds(InflightDescription(size, 0, p.num_queues, p.queue_size), (fd,))

    def _set_inflight_fd(self, msg, bag):
        p = msg.payload
        fd = bag.take()
        try:
            if p.mmap_size == 0 or p.num_queues == 0 or p.queue_size == 0:
                raise RemoteProtocolError("SET_INFLIGHT_FD with an empty region", recoverable=True)
            if p.mmap_size < p.num_queues * inflight_queue_size(p.queue_size):
                raise RemoteProtocolError("SET_INFLIGHT_FD region too small", recoverable=True)
            if os.fstat(fd).st_size < p.mmap_offset + p.mmap_size:
                raise RemoteProtocolError("SET_INFLIGHT_FD region beyond the fd", recoverable=True)
            region = mmap.mmap(fd, p.mmap_size, offset=p.mmap_offset)
        finally:
            os.close(fd)
        self._set_inflight(region, p.queue_size)

    def _set_inflight(self, region: mmap.mmap, queue_size: int) -> None:
        if self._inflight is not None and not any(vq.started for vq in self.queues):
            self._inflight.close()
        self._inflight = region
        self._inflight_queue_size = queue_size

    # -- teardown -------------------------------------------------------------------
    def close(self) -> None:
        """The front-end went away: stop queues, release every resource."""
        self._stop_all()
        for vq in self.queues:
            vq.reset()
            vq.close()
        self.memory.close()
        self.memory = GuestMemory.empty()
        if self._backend_sock is not None:
            self.device.set_backend_channel(None)
            self._backend_sock.close()
            self._backend_sock = None
        if self._inflight is not None:
            self._inflight.close()
            self._inflight = None
        self._logs.close()
        self.device.reset()
        self.device.acked_protocol_features = 0


class WithFds:
    """A reply payload that carries fds; they are closed once sent."""

    def __init__(self, payload, fds):
        self.payload = payload
        self.fds = tuple(fds)


def _error_reply(msg: Message):
    """A reply that tells the front-end the request failed, shaped as the spec allows."""
    req = msg.request
    if req == R.GET_CONFIG:
        return Empty()  # the spec's failure signal: a zero-size reply
    if req == R.GET_VRING_BASE:
        return VringState(getattr(msg.payload, "index", 0), 0)
    if req == R.GET_INFLIGHT_FD:
        return InflightDescription(0, 0, 0, 0)
    if req in (R.SET_DEVICE_STATE_FD, R.CHECK_DEVICE_STATE):
        return U64(1)  # a status word: 0 would claim success (and a transfer fd)
    return U64(0)


_HANDLERS: dict[R, Callable] = {
    R.GET_FEATURES: Session._get_features,
    R.SET_FEATURES: Session._set_features,
    R.SET_OWNER: Session._set_owner,
    R.RESET_OWNER: Session._reset_owner,
    R.SET_MEM_TABLE: Session._set_mem_table,
    R.SET_VRING_NUM: Session._set_vring_num,
    R.SET_VRING_ADDR: Session._set_vring_addr,
    R.SET_VRING_BASE: Session._set_vring_base,
    R.GET_VRING_BASE: Session._get_vring_base,
    R.SET_VRING_KICK: Session._set_vring_kick,
    R.SET_VRING_CALL: Session._set_vring_call,
    R.SET_VRING_ERR: Session._set_vring_err,
    R.GET_PROTOCOL_FEATURES: Session._get_protocol_features,
    R.SET_PROTOCOL_FEATURES: Session._set_protocol_features,
    R.GET_QUEUE_NUM: Session._get_queue_num,
    R.SET_VRING_ENABLE: Session._set_vring_enable,
    R.SET_BACKEND_REQ_FD: Session._set_backend_req_fd,
    R.GET_CONFIG: Session._get_config,
    R.SET_CONFIG: Session._set_config,
    R.GET_INFLIGHT_FD: Session._get_inflight_fd,
    R.SET_INFLIGHT_FD: Session._set_inflight_fd,
    R.RESET_DEVICE: Session._reset_device,
    R.GET_MAX_MEM_SLOTS: Session._get_max_mem_slots,
    R.ADD_MEM_REG: Session._add_mem_reg,
    R.REM_MEM_REG: Session._rem_mem_reg,
    R.SET_STATUS: Session._set_status,
    R.SEND_RARP: Session._send_rarp,
    R.NET_SET_MTU: Session._net_set_mtu,
    R.GPU_SET_SOCKET: Session._gpu_set_socket,
    R.GET_STATUS: Session._get_status,
    R.SET_LOG_BASE: Session._set_log_base,
    R.SET_LOG_FD: Session._set_log_fd,
    R.SET_DEVICE_STATE_FD: Session._set_device_state_fd,
    R.CHECK_DEVICE_STATE: Session._check_device_state,
}
