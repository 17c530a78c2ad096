"""Fuzz target `session`: message sequences against a live DeviceServer serving blk.

The device served is a 1 MiB in-memory vhost-user-blk device with 2 queues;
the messages, the fds and the checks are the generic session machinery's
(vhost_user/fuzzing/session.py, which says what it sends and asserts).
"""
from __future__ import annotations

from vhost_user.backends.blk.device import BlkDevice, BlkOptions
from vhost_user.fuzzing import session

__all__ = ["run_one", "seeds"]


def _device() -> BlkDevice:
    return BlkDevice(BlkOptions(size=session.RAM, num_queues=2))


def run_one(data: bytes) -> None:
    session.run_one(data, _device)


seeds = session.seeds
