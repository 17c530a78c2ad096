"""The engine protocol: how a device's queue handler plugs into a `Virtqueue`.

The generic queue (vhost_user/virtqueue.py) knows no device.  A device
hands `Virtqueue.start()` either a Python callable (called on every kick,
using the slow-path pop/push API) or an `Engine`, and the queue drives
every engine through the same four calls:

* `bind(vq)` at start: return `(c_function, ctx)` for a native worker (the
  queue's thread calls `vr_run(q, ..., c_function, ctx)` with the GIL
  released), or None for an engine without a worker, whose queue other
  threads fill (a net rx queue, written by other ports' tx workers);
* `detach()` at stop, once the worker (if any) has exited and before the
  native queue stops: cut every link other threads use to reach the queue;
* `unbind()` after the native queue stopped: free the per-run native state
  (its counters stay readable through `stats`);
* `lock()` / `unlock()` around a control-plane change (new kick/call fd,
  memory table, event-idx) of a queue without a worker: a queue with a
  worker is paused by parking the worker instead.

Native engines live beside their device (backends/<dev>/engine.py).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from vhost_user.virtqueue import Virtqueue

__all__ = ["Engine"]


class Engine:
    """Base of every queue engine; the defaults suit a native worker engine."""

    #: counters merged into Virtqueue.stats (override with a property)
    stats: dict[str, int] = {}

    def bind(self, vq: Virtqueue) -> tuple[Any, Any] | None:
        """Prepare to serve `vq` (started, rings checked); returns (c_function, ctx) or None."""
        raise NotImplementedError

    def detach(self) -> None:
        """The worker has exited; stop other threads from reaching the queue."""

    def unbind(self) -> None:
        """The native queue has stopped; release per-run native state."""

    def lock(self) -> None:
        """Hold off other threads that write a worker-less queue (see `Virtqueue.paused`)."""

    def unlock(self) -> None:
        """Undo `lock()`."""
