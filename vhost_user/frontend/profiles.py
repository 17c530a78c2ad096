"""VMM profiles for the built-in front-end: which messages it sends, in what order.

A `Profile` is data, not code: the built-in front-end (`vhost_user.frontend`)
reads it at each step, so every driver model (`vhost_user.backends.<dev>.driver`) runs
unchanged under any profile. Two are defined:

`QEMU` -- what the front-end always did, QEMU 10's vhost-user client:
GET_FEATURES, protocol features, GET_QUEUE_NUM, GET_MAX_MEM_SLOTS,
SET_BACKEND_REQ_FD, SET_OWNER, SET_FEATURES; ADD_MEM_REG per region when
CONFIGURE_MEM_SLOTS is offered; per queue CALL, ERR, NUM, BASE, ADDR, KICK,
ENABLE; NEED_REPLY on set-type requests once REPLY_ACK is agreed.

`CROSVM` -- crosvm's vhost-user front-end, as its source has it (google/crosvm;
the files named are where each rule comes from; nothing is copied):

* opening, `devices/src/virtio/vhost_user_frontend/mod.rs` (`VhostUserFrontend::new`):
  SET_OWNER first, GET_FEATURES, and when the back-end offers bit 30,
  GET_PROTOCOL_FEATURES / SET_PROTOCOL_FEATURES asking for CONFIG, MQ,
  BACKEND_REQ, DEVICE_STATE, SHMEM and REPLY_ACK only; SET_BACKEND_REQ_FD if
  BACKEND_REQ was agreed; GET_QUEUE_NUM if MQ (else the device type's
  minimum queue count). The virtio features it lets through are the device
  type's bits 0-23 and 50-63 plus VERSION_1, RING_EVENT_IDX and SUSPEND
  (`devices/src/virtio/device_constants.rs`, `base_features` in
  `devices/src/virtio/mod.rs`): no INDIRECT_DESC, no packed ring.
* GET_SHMEM_CONFIG when SHMEM was agreed (`get_shared_memory_region`, asked
  while the PCI device is built, before the guest runs).
* probe, `read_config` in mod.rs: GET_CONFIG with flags WRITABLE (crosvm's
  value 1, `third_party/vmm_vhost/src/message.rs`) for each guest config
  access -- 4-byte pieces here -- whether or not CONFIG was agreed, before
  any SET_FEATURES or memory table. The reply must echo offset and size
  (`get_config` in `third_party/vmm_vhost/src/backend_client.rs`), whose
  payload is `hdr.size - 12` bytes.
* activation, `activate` in mod.rs: SET_FEATURES only if the acked set
  changed since it was last sent (bit 30 is acked from the start), then
  SET_MEM_TABLE (never ADD_MEM_REG), then per queue NUM, ADDR, BASE, CALL,
  KICK and ENABLE(1) if bit 30 was acked (`activate_vring`). No SET_VRING_ERR,
  no SET_STATUS, no RESET_DEVICE, no inflight fd.
* memory, `vm_memory/src/guest_memory.rs` (`create_shm`, `new_with_options`)
  and `x86_64/src/lib.rs` (`arch_memory_regions`): all guest RAM is one memfd;
  regions [0, 640K), [640K, 1M), [1M, PCI hole) and [4G, ...) sit in it one
  after the other at growing mmap offsets, and SET_MEM_TABLE carries that one
  memfd once per region.
* no NEED_REPLY ever (`BackendClient::new` leaves `set_need_reply` off, and
  mod.rs negotiates REPLY_ACK only for back-end requests): a refused message
  is silent.
* queue size: every queue is offered at `Queue::MAX_SIZE` (32768) unless the
  user gives `max-queue-size=` (the largest power of two not above it), and a
  Linux guest takes what is offered.
* stop (`deactivate_vring`, on guest reset or sleep): SET_VRING_ENABLE(0) then
  GET_VRING_BASE per queue; at VM exit the socket is simply closed.
* connection, `src/crosvm/sys/linux/device_helpers.rs` and
  `third_party/vmm_vhost/src/connection.rs`: a socket path or an already
  connected fd; the back-end side of `crosvm device` takes `--fd` likewise.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from vhost_user.protocol import (
    VHOST_USER_F_PROTOCOL_FEATURES,
    FrontendRequest as R,
    ProtocolFeature as PF,
    VirtioFeature as VF,
)

__all__ = ["Profile", "QEMU", "CROSVM", "crosvm_ram_layout"]

KB, MB = 1 << 10, 1 << 20
_VIRTIO_F_SUSPEND = 39


@dataclass(frozen=True)
class Profile:
    """How one VMM speaks vhost-user; `Frontend(sock, profile=...)` follows it.

    `opening` and `vring_setup` are step names the front-end runs in order
    (see `Frontend._OPENING` and `Frontend._VRING_STEPS`); `sends`, when not
    None, is every request this VMM ever sends, so a driver asking for
    another one fails loudly instead of testing something the VMM never does.
    """

    name: str
    protocol_features: int
    opening: tuple[str, ...]
    vring_setup: tuple[str, ...]
    feature_mask: int | None = None     # virtio features the VMM lets through
    need_reply: bool = True             # NEED_REPLY on set-type requests (REPLY_ACK agreed)
    mem_slots: bool = True              # ADD_MEM_REG when CONFIGURE_MEM_SLOTS is agreed
    defer_set_features: bool = False    # SET_FEATURES at activation, only when changed
    config_piece: int = 0               # GET_CONFIG in pieces of this many bytes (0: whole)
    config_flags: int = 0
    queue_size: int | None = None       # the size every queue gets (None: the driver's)
    disable_before_stop: bool = False   # SET_VRING_ENABLE(0) before GET_VRING_BASE
    single_memfd: bool = False          # crosvm's RAM: its regions in one memfd at offsets
    net_protocol_features: int = 0      # asked for besides, by the net device only
    sends: frozenset[R] | None = None

    def with_max_queue_size(self, limit: int) -> "Profile":
        """crosvm's `max-queue-size=N`: the largest power of two not above N."""
        if not 1 <= limit <= 32768:
            raise ValueError(f"max queue size {limit} not in 1..32768")
        return dataclasses.replace(self, queue_size=1 << (limit.bit_length() - 1))


QEMU = Profile(
    name="qemu",
    protocol_features=(
        (1 << PF.MQ) | (1 << PF.LOG_SHMFD) | (1 << PF.REPLY_ACK) | (1 << PF.BACKEND_REQ)
        | (1 << PF.CONFIG) | (1 << PF.INFLIGHT_SHMFD) | (1 << PF.RESET_DEVICE)
        | (1 << PF.CONFIGURE_MEM_SLOTS) | (1 << PF.STATUS)
    ),
    opening=("features", "protocol_features", "queue_num", "max_mem_slots", "backend_req",
             "owner", "set_features"),
    vring_setup=("call", "err", "num", "base", "addr", "kick", "enable"),
    net_protocol_features=1 << PF.RARP,  # announce after migration
)

CROSVM = Profile(
    name="crosvm",
    protocol_features=(
        (1 << PF.CONFIG) | (1 << PF.MQ) | (1 << PF.BACKEND_REQ) | (1 << PF.DEVICE_STATE)
        | (1 << PF.SHMEM) | (1 << PF.REPLY_ACK)
    ),
    opening=("owner", "features", "protocol_features", "backend_req", "queue_num", "shmem_config"),
    vring_setup=("num", "addr", "base", "call", "kick", "enable"),
    feature_mask=(
        0xFFFC_0000_00FF_FFFF | (1 << VF.VIRTIO_F_VERSION_1) | (1 << VF.VIRTIO_RING_F_EVENT_IDX)
        | (1 << _VIRTIO_F_SUSPEND) | (1 << VHOST_USER_F_PROTOCOL_FEATURES)
    ),
    need_reply=False,
    mem_slots=False,
    defer_set_features=True,
    config_piece=4,
    config_flags=1,                     # crosvm's VhostUserConfigFlags::WRITABLE
    queue_size=32768,
    disable_before_stop=True,
    single_memfd=True,
    sends=frozenset({
        R.SET_OWNER, R.GET_FEATURES, R.SET_FEATURES, R.GET_PROTOCOL_FEATURES,
        R.SET_PROTOCOL_FEATURES, R.SET_BACKEND_REQ_FD, R.GET_QUEUE_NUM, R.GET_SHMEM_CONFIG,
        R.GET_CONFIG, R.SET_CONFIG, R.SET_MEM_TABLE, R.SET_VRING_NUM, R.SET_VRING_ADDR,
        R.SET_VRING_BASE, R.SET_VRING_CALL, R.SET_VRING_KICK, R.SET_VRING_ENABLE,
        R.GET_VRING_BASE, R.SET_DEVICE_STATE_FD, R.CHECK_DEVICE_STATE,
    }),
)


def crosvm_ram_layout(mem_size: int, pci_start: int = 0xD000_0000) -> list[tuple[int, int]]:
    """crosvm's x86-64 guest RAM regions for `mem_size` bytes, as (gpa, size).

    640 KiB low memory, the BIOS area up to 1 MiB, RAM from 1 MiB up to the
    32-bit PCI window (`pci_start`, 4 GiB - 768 MiB by default, lower with
    crosvm's `--pci mem=[start=...]`), and the rest from 4 GiB.
    """
    if mem_size <= MB or mem_size % (4 * KB) or pci_start % (4 * KB) or pci_start <= MB:
        raise ValueError("memory size and PCI start must be page aligned and above 1 MiB")
    below = min(pci_start, mem_size) - MB
    layout = [(0, 640 * KB), (640 * KB, 384 * KB), (MB, below)]
    above = mem_size - MB - below
    if above:
        layout.append((1 << 32, above))
    return layout
