"""The device base class every back-end implements.

A device says what it offers (virtio features, protocol features, queue count,
config space) and hands each queue a handler; the server does the rest. Hooks
that a device does not implement answer "unsupported" rather than silently
succeeding, so a front-end learns early that something is missing.
"""

from __future__ import annotations

import os
from typing import Any

from vhost_user.errors import UnsupportedRequest
from vhost_user.protocol import VirtioFeature

__all__ = ["VirtioDevice", "COMMON_FEATURES", "MAX_QUEUE_SIZE", "queue_size_problem"]

# Ring features every device here supports through the shared virtqueue code.
COMMON_FEATURES = (
    (1 << VirtioFeature.VIRTIO_F_VERSION_1)
    | (1 << VirtioFeature.VIRTIO_RING_F_INDIRECT_DESC)
    | (1 << VirtioFeature.VIRTIO_RING_F_EVENT_IDX)
    | (1 << VirtioFeature.VIRTIO_F_RING_PACKED)
)

#: virtio 1.2, 2.7: a split queue's size is a power of two, at most 32768 (crosvm's default)
MAX_QUEUE_SIZE = 32768


def queue_size_problem(size: int) -> str | None:
    """Why `--queue-size size` is refused (the one rule every back-end applies), or None."""
    if not 4 <= size <= MAX_QUEUE_SIZE or size & (size - 1):
        return f"--queue-size {size} must be a power of two in 4..{MAX_QUEUE_SIZE}"
    return None


class VirtioDevice:
    """Base class: override the class attributes and the hooks you need."""

    #: name used in --print-capabilities and logs ("blk", "net", ...)
    device_type: str = "generic"
    #: virtio device id (virtio spec 5): 2 = block
    virtio_id: int = 0
    #: queues the device exposes (GET_QUEUE_NUM)
    num_queues: int = 1
    #: largest queue size the device accepts (SET_VRING_NUM)
    max_queue_size: int = MAX_QUEUE_SIZE  # crosvm offers every queue at 32768 unless told otherwise
    poll_us: int = 0  # --poll-us: each queue worker busy-polls this long before sleeping (csrc/run.c)
    #: device-specific virtio feature bits, in addition to COMMON_FEATURES
    device_features: int = 0
    #: protocol features the device adds to the server's own set
    device_protocol_features: int = 0
    #: unoffered bits a front-end is known to ack anyway (QEMU's vhost-user-gpu-pci acks
    #: VIRTIO_F_RING_RESET); SET_FEATURES drops them with a log line instead of failing
    ignored_acked_features: int = 0
    #: whether every guest write the device makes lies in a chain it completes
    #: with push: the core then logs them for live migration (vhost_user/dirtylog.py)
    #: and offers LOG_SHMFD and VHOST_F_LOG_ALL; a device writing elsewhere says False
    dirty_log: bool = True
    #: whether the core may offer INFLIGHT_SHMFD: a device that gives popped chains back
    #: (vr_unpop: a buffer taken before knowing it is needed) says False, since with
    #: inflight tracking a chain taken can only be completed or resubmitted
    inflight: bool = True

    def __init__(self) -> None:
        self.acked_features = 0
        #: protocol features of the current session (SET_PROTOCOL_FEATURES), set by the session
        self.acked_protocol_features = 0

    # -- negotiation -------------------------------------------------------
    def features(self) -> int:
        """Virtio features offered to the driver (the server adds PROTOCOL_FEATURES)."""
        return COMMON_FEATURES | self.device_features

    def protocol_features(self) -> int:
        return self.device_protocol_features

    def set_features(self, features: int) -> None:
        """Called on SET_FEATURES with the acknowledged subset."""
        self.acked_features = features

    def has_feature(self, bit: int) -> bool:
        return bool(self.acked_features & (1 << bit))

    # -- config space --------------------------------------------------------
    def get_config(self, offset: int, size: int) -> bytes:
        raise UnsupportedRequest(f"{self.device_type} has no config space")

    def set_config(self, offset: int, data: bytes, flags: int) -> None:
        raise UnsupportedRequest(f"{self.device_type} config space is read-only")

    # -- queues ----------------------------------------------------------------
    # -- device state (SET_DEVICE_STATE_FD, vhost_user/devicestate.py) ----------
    def save_state(self) -> bytes:
        """The device's internal state while every queue is stopped (crosvm's
        snapshot); rings, features and memory are the front-end's to restore.
        A device with nothing of its own returns b"" (the default)."""
        return b""

    def load_state(self, data: bytes) -> None:
        """Apply what `save_state` returned, in a new process (crosvm's restore);
        raise ValueError to refuse it."""
        if data:
            raise ValueError(f"{self.device_type} keeps no device state, got {len(data)} bytes")

    def queue_handler(self, index: int) -> Any:
        """Return the handler that serves queue `index` (a native engine or a callable)."""
        raise UnsupportedRequest(f"{self.device_type} does not serve queue {index}")

    def queue_stopped(self, index: int) -> None:
        """A queue stopped (GET_VRING_BASE, disable, disconnect); release its handler state."""

    # -- device-specific requests (the session routes them here) ----------------
    def send_rarp(self, mac: bytes) -> None:
        """SEND_RARP (net): announce `mac` after migration."""
        raise UnsupportedRequest(f"{self.device_type} does not handle SEND_RARP")

    def set_mtu(self, mtu: int) -> None:
        """NET_SET_MTU (net)."""
        raise UnsupportedRequest(f"{self.device_type} does not handle NET_SET_MTU")

    def set_gpu_socket(self, fd: int) -> None:
        """GPU_SET_SOCKET (gpu): the display socket to QEMU. The device owns `fd`."""
        os.close(fd)
        raise UnsupportedRequest(f"{self.device_type} does not handle GPU_SET_SOCKET")

    def set_backend_channel(self, channel) -> None:
        """The back-end request channel (SET_BACKEND_REQ_FD), or None when it goes away.

        A `vhost_user.backend_req.BackendChannel`-like object with `send(msg)`;
        devices use it for config-change notifications and the like.
        """

    def connected(self) -> None:
        """A front-end connected (a new session starts with fresh device state)."""

    # -- lifecycle ------------------------------------------------------------
    def reset(self) -> None:
        """Back to the state a new front-end expects (called between connections)."""
        self.acked_features = 0

    def close(self) -> None:
        """Release everything at process exit."""

    def counters(self) -> dict:
        """The device's counters for the SIGUSR1 stats line (drops, errors, ...).

        Default: a copy of the device's `stats` mapping, if it has one; the
        server adds sessions and per-queue counters beside these.
        """
        return dict(getattr(self, "stats", None) or {})

    def capabilities(self) -> dict:
        """The --print-capabilities JSON (docs/interop/vhost-user.json)."""
        return {"type": self.device_type, "features": []}

