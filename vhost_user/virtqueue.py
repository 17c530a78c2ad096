"""Virtqueues: the generic, device-agnostic queue over the C ring (csrc/vring.c).

Theory of operation
-------------------
A `Virtqueue` holds one native `struct vr_queue`.  The session's asyncio
thread calls the setters (SET_VRING_NUM/ADDR/BASE/KICK/CALL/ERR...) and
`start(memory, handler)`, which spawns one worker thread per queue.  The
worker calls `vr_run()` in C with the GIL released; vr_run sleeps on the
kick eventfd and a private control eventfd and runs the handler on every
kick:

* an `Engine` (vhost_user/engine.py; the native engines live beside
  their device, backends/<dev>/engine.py) gives a C handler that
  processes whole requests: Python never sees them; an engine may also
  run without a worker, its queue filled by other threads (net rx);
* a Python handler (any callable taking the Virtqueue) is called back
  from vr_run and uses the slow-path API `pop()` / `push()` / `notify()`.

To change state while the worker runs (stop, memory swap, new kick/call
fd) the control thread writes the control eventfd: vr_run returns at the
next batch boundary (every popped chain has been completed and pushed),
the worker parks, the control thread does the change, and the worker
resumes (or exits, for stop).  So the native queue has one user at a time
and needs no locks.

When the driver breaks a ring rule the C code marks the queue broken; the
worker logs one line ("descriptor loop on queue 1 at head 7"), signals the
err eventfd and exits; the queue's other operations become no-ops until
`reset()`.  Other queues are unaffected.

Memory: each started queue `acquire()`s its GuestMemory and holds cffi
buffer views of the mappings; `update_memory` swaps to the new table and
releases the old one, so the session may `close()` the old table right
after the swap (the unmapping is deferred until the last queue let go).

Device code that drives a queue from its own thread in C (the vsock data
path) uses the small public native API: `native_queue` (the struct
vr_queue pointer), `chain_buffer` (the struct vr_chain pops fill) and
`popped_chain()` (that chain as a `Chain`), plus `check_native` to map C
return codes to the typed errors.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import Any

from vhost_user._native import ffi, lib
from vhost_user.chain import (
    MAX_QUEUE_SIZE, Chain, NativeMemory, check_native, error_class, inflight_queue_size,
)
from vhost_user.engine import Engine
from vhost_user.errors import VirtqueueError
from vhost_user.memory import GuestMemory
from vhost_user.protocol import VHOST_VRING_F_LOG

__all__ = ["Virtqueue", "Chain", "Engine", "HANDLER_IDLE", "check_native", "inflight_queue_size", "MAX_QUEUE_SIZE"]

log = logging.getLogger("vhost_user.virtqueue")

@ffi.def_extern()
def vr_py_handler(ctx, q):  # pragma: no cover - exercised through the worker
    """Trampoline from vr_run into a Python handler; a handler returning HANDLER_IDLE
    leaves guest kicks off (csrc/run.c)."""
    vq = ffi.from_handle(ctx)
    try:
        if vq._handler(vq) == HANDLER_IDLE:
            return lib.VR_HANDLER_IDLE
    except VirtqueueError:
        pass  # the queue is broken; vr_run sees it and returns
    except Exception:
        log.exception("queue %d: handler failed", vq.index)
    return 0


#: What a queue handler returns when it has nothing to put in the ring and whatever
#: gives it work later calls `Virtqueue.wake()`: the worker then leaves guest kicks off.
HANDLER_IDLE = "idle"


class Virtqueue:
    """One virtqueue (split, or packed after set_packed), device side, with its worker thread."""

    def __init__(self, index: int, max_size: int = 1024, *, poll_us: int = 0) -> None:
        if not 0 < max_size <= MAX_QUEUE_SIZE:
            raise ValueError(f"max_size must be in 1..{MAX_QUEUE_SIZE}")
        self.index = index
        self.max_size = max_size
        self.poll_us = poll_us
        self._q = ffi.new("struct vr_queue *")
        lib.vr_queue_init(self._q, index)
        self._ctl = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._cond = threading.Condition()
        self._kick: int | None = None
        self._call: int | None = None
        self._err: int | None = None
        self._num = 0
        self._addr: tuple[int, int, int, int, int, bool] | None = None
        self._event_idx = False
        self._packed = False
        self._inflight: tuple[Any, int] | None = None
        self._inflight_buf = None
        self._dirty_log = None
        #: a lock other threads hold while they pop, push or notify on this queue
        #: (the vsock tx path writes credit updates to its rx queue); a pause and
        #: a stop take it once the worker is parked, so no writer sees a change
        self.writer_lock: Any = None
        self._reset_run_state()

    def _reset_run_state(self) -> None:
        self._started = False
        self._memory: GuestMemory | None = None
        self._native_mem: NativeMemory | None = None
        self._handler: Any = None
        self._engine: Engine | None = None
        self._handle = None
        self._thread: threading.Thread | None = None
        self._request: str | None = None
        self._parked = False
        self._reported = False
        self._chain = None
        self._segs = None

    # -- properties -------------------------------------------------------------
    @property
    def started(self) -> bool:
        return self._started

    @property
    def num(self) -> int:
        return self._num

    @property
    def has_kick(self) -> bool:
        return self._kick is not None

    @property
    def memory(self) -> GuestMemory | None:
        """The guest memory table the queue runs on (None while stopped).

        Stable for the duration of a handler call: a table swap pauses the
        worker between batches.
        """
        return self._memory

    @property
    def native_queue(self) -> Any:
        """The native `struct vr_queue *`, for device C code that works on this queue
        (an engine's bind, the vsock data path).  Only valid while started, and only
        from the thread that runs the queue's handler (or under the engine's lock)."""
        return self._q

    @property
    def chain_buffer(self) -> Any:
        """The `struct vr_chain *` (VR_MAX_SEGS segments) that pops on this queue fill;
        None while stopped.  Read it back with popped_chain()."""
        return self._chain

    @property
    def broken(self) -> bool:
        return bool(lib.vr_queue_broken(self._q))

    @property
    def error(self) -> str | None:
        """The message of the violation that broke the queue, or None."""
        if not lib.vr_queue_broken(self._q):
            return None
        return ffi.string(lib.vr_queue_error(self._q)).decode(errors="replace")

    @property
    def failure(self) -> Exception | None:
        """The typed error (DescriptorLoop, ...) that broke the queue, or None."""
        code = lib.vr_queue_broken(self._q)
        if not code:
            return None
        return error_class(code)(self.error)

    @property
    def stats(self) -> dict[str, int]:
        """Counters of the current run: requests, kicks, notifies, bytes_read,
        bytes_written, io_errors, log_missed, polled (sleeps `poll_us` saved), plus the
        engine's own counters (Engine.stats)."""
        s = ffi.new("struct vr_stats *")
        lib.vr_queue_get_stats(self._q, s)
        out = {"requests": s.requests, "kicks": s.kicks, "notifies": s.notifies,
               "bytes_read": s.bytes_read, "bytes_written": s.bytes_written,
               "io_errors": s.io_errors, "log_missed": s.log_missed, "polled": s.polled}
        if self._engine is not None:
            out.update(self._engine.stats)
        return out

    # -- control plane setters -------------------------------------------------------
    @property
    def packed(self) -> bool:
        return self._packed

    def set_packed(self, on: bool) -> None:
        """Whether VIRTIO_F_RING_PACKED was negotiated (virtio 1.2, 2.8); only while stopped.

        Packed rings keep the spec's packed layout in the inflight region
        (csrc/inflight_packed.c), from which a restarted back-end takes its
        ring positions and the chains to resubmit.
        """
        on = bool(on)
        if on == self._packed:
            return
        if self._started:
            raise ValueError(f"queue {self.index}: ring layout change while started")
        check_native(lib.vr_queue_set_packed(self._q, int(on)), f"queue {self.index}: set_packed")
        self._packed = on

    def set_num(self, n: int) -> None:
        """SET_VRING_NUM: 1..max_size, a power of two for a split ring (like Linux vhost)."""
        split_bad = n & (n - 1) and not self._packed
        if not 0 < n <= self.max_size or split_bad:
            kind = "in" if self._packed else "a power of two in"
            raise ValueError(f"queue {self.index}: size {n} is not {kind} 1..{self.max_size}")
        check_native(lib.vr_queue_set_num(self._q, n), f"queue {self.index}: set_num")
        self._num = n

    def set_addr(self, desc: int, avail: int, used: int, *, flags: int = 0, log: int = 0,
                 gpa: bool = False) -> None:
        """SET_VRING_ADDR: front-end virtual addresses (guest physical if gpa=True).

        The rings are checked against guest memory at start(); with
        VHOST_VRING_F_LOG in `flags`, used-ring writes are logged at the
        guest-physical address `log` while a dirty log is set.
        """
        for name, v in (("desc", desc), ("avail", avail), ("used", used)):
            if not 0 <= v < 1 << 64:
                raise ValueError(f"{name} address out of range")
        check_native(lib.vr_queue_set_addr(self._q, desc, avail, used, int(gpa)),
               f"queue {self.index}: set_addr")
        self._addr = (desc, avail, used, flags, log, gpa)
        self._apply_log_used()

    def same_rings(self, desc: int, avail: int, used: int, gpa: bool) -> bool:
        """Whether these are the ring addresses the queue has (a SET_VRING_ADDR
        that only turns used-ring logging on or off)."""
        return self._addr is not None and self._addr[:3] == (desc, avail, used) \
            and self._addr[5] == gpa

    def set_log_flags(self, flags: int, log: int) -> None:
        """Change only VHOST_VRING_F_LOG and log_guest_addr; safe while running."""
        if self._addr is None:
            raise ValueError(f"queue {self.index}: no ring addresses")
        desc, avail, used, _, _, gpa = self._addr
        self._addr = (desc, avail, used, flags, log, gpa)
        self._apply_log_used()

    def set_dirty_log(self, dirty_log: Any) -> None:
        """Mark this queue's guest writes in `dirty_log` (a DirtyLog), or stop with None.

        An atomic pointer store in C, so safe while the worker runs; the
        caller keeps the log mapped until the queue is closed.
        """
        self._dirty_log = dirty_log
        lib.vr_queue_set_log(self._q, ffi.NULL if dirty_log is None else dirty_log.native)

    def _apply_log_used(self) -> None:
        on = self._addr is not None and bool(self._addr[3] & VHOST_VRING_F_LOG)
        lib.vr_queue_set_log_used(self._q, int(on), self._addr[4] if on else 0)

    def set_base(self, base: int) -> None:
        """SET_VRING_BASE: the avail index to continue from.

        Packed rings: bits 0-14 the next avail slot, 15 its wrap counter,
        16-30 the next used slot, 31 its wrap counter (a fresh ring is
        0x80008000); the slots are checked against the size at start().
        """
        limit = 0xFFFF_FFFF if self._packed else 0xFFFF
        if not 0 <= base <= limit:
            raise ValueError(f"base {base:#x} is not a {'32' if self._packed else '16'}-bit value")
        check_native(lib.vr_queue_set_base(self._q, base), f"queue {self.index}: set_base")

    def get_base(self) -> int:
        """The next avail index to process (GET_VRING_BASE reply; packed: as set_base)."""
        return lib.vr_queue_get_base(self._q)

    def set_event_idx(self, on: bool) -> None:
        """Whether VIRTIO_RING_F_EVENT_IDX was negotiated."""
        with self.paused():
            lib.vr_queue_set_event_idx(self._q, int(bool(on)))
            self._event_idx = bool(on)

    def set_kick(self, fd: int | None) -> None:
        """SET_VRING_KICK; takes ownership of fd and closes the previous one."""
        with self.paused():
            old, self._kick = self._kick, fd
            self._apply_fds()
        _close(old, keep=fd)

    def set_call(self, fd: int | None) -> None:
        """SET_VRING_CALL; takes ownership of fd and closes the previous one."""
        with self.paused():
            old, self._call = self._call, fd
            self._apply_fds()
        _close(old, keep=fd)

    def set_err(self, fd: int | None) -> None:
        """SET_VRING_ERR; takes ownership of fd and closes the previous one."""
        with self._cond:
            old, self._err = self._err, fd
        _close(old, keep=fd)

    def set_inflight(self, region: Any, offset: int) -> None:
        """Attach this queue's slice of the inflight shared memory (an mmap), or None.

        Used from the next start(): a fresh (zeroed) region is initialised; a
        used one is recovered and its inflight heads are resubmitted first.
        """
        if self._started:
            raise ValueError(f"queue {self.index}: set_inflight while started")
        if region is None:
            self._inflight = None
            return
        if offset < 0 or offset + 16 > len(region):
            raise ValueError("inflight offset outside the region")
        self._inflight = (region, offset)

    def _apply_fds(self) -> None:
        lib.vr_queue_set_fds(self._q, -1 if self._kick is None else self._kick,
                             -1 if self._call is None else self._call)

    # -- start / stop -------------------------------------------------------------------
    def start(self, memory: GuestMemory, handler: Any = None) -> None:
        """Start the queue on `memory` with an Engine, a Python callable, or None.

        With handler=None no worker runs: the caller drives pop/push/notify.
        An Engine whose bind() returns None runs no worker either (others fill it).
        Raises AddressOutOfRange / VirtqueueError if the rings do not fit.
        """
        if self._started:
            raise ValueError(f"queue {self.index} is already started")
        if self.broken:
            raise ValueError(f"queue {self.index} is broken; reset() it first")
        if self._num == 0 or self._addr is None:
            raise ValueError(f"queue {self.index}: size and addresses must be set before start")
        memory.acquire()
        native = NativeMemory(memory)
        try:
            if self._inflight is not None:
                region, offset = self._inflight
                self._inflight_buf = ffi.from_buffer("uint8_t[]", region, require_writable=True)
                lib.vr_queue_set_inflight(self._q, self._inflight_buf + offset, len(region) - offset)
            else:
                lib.vr_queue_set_inflight(self._q, ffi.NULL, 0)
            self._apply_fds()
            check_native(lib.vr_queue_start(self._q, native.table), f"queue {self.index}: start")
        except BaseException:
            native.release()
            self._release_inflight()
            memory.release()
            raise
        self._memory, self._native_mem = memory, native
        self._segs = ffi.new("struct vr_seg[]", lib.VR_MAX_SEGS)
        self._chain = ffi.new("struct vr_chain *")
        self._chain.cap = lib.VR_MAX_SEGS
        self._chain.segs = self._segs
        self._started = True
        if self._inflight is not None:
            # One line per start: crash-recovery tests read it to prove that
            # requests really were replayed from the front-end's region.
            log.info("queue %d: %d request(s) to resubmit from the inflight region",
                     self.index, len(self.inflight_heads()))
        if handler is None:
            return
        try:
            if isinstance(handler, Engine):
                worker = handler.bind(self)
                self._engine = handler
                if worker is None:
                    return
                fn, ctx = worker
            elif callable(handler):
                self._handle = ffi.new_handle(self)
                fn, ctx = ffi.addressof(lib, "vr_py_handler"), self._handle
            else:
                raise TypeError("handler must be an Engine, a callable or None")
            self._handler = handler
            self._thread = threading.Thread(target=self._worker, args=(fn, ctx),
                                            name=f"vq{self.index}", daemon=True)
            self._thread.start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> int:
        """Stop the worker after its current batch; returns last_avail_idx (GET_VRING_BASE).

        Every chain popped by a native engine has been completed and pushed
        when this returns.  Safe to call on a stopped or broken queue.
        """
        if self._started:
            t = self._thread
            if t is not None:
                with self._cond:
                    self._request = "stop"
                    self._cond.notify_all()
                os.eventfd_write(self._ctl, 1)
                t.join()
            with self.writer_lock or contextlib.nullcontext():
                if self._engine is not None:
                    self._engine.detach()
                lib.vr_queue_stop(self._q)
                if self._engine is not None:
                    self._engine.unbind()
                self._native_mem.release()
                self._release_inflight()
                self._memory.release()
                _drain(self._ctl)
                engine = self._engine
                self._reset_run_state()
                self._engine = engine  # keep its stats readable
        return lib.vr_queue_get_base(self._q)

    def update_memory(self, memory: GuestMemory) -> None:
        """Swap in a new memory table while running (at a batch boundary).

        If the rings are no longer mapped by the new table the queue is
        stopped and AddressOutOfRange is raised.
        """
        if not self._started:
            return
        memory.acquire()
        native = NativeMemory(memory)
        with self.paused():
            rc = lib.vr_queue_set_mem(self._q, native.table)
            if rc >= 0:
                old_native, old_mem = self._native_mem, self._memory
                self._native_mem, self._memory = native, memory
        if rc < 0:
            native.release()
            memory.release()
            self.stop()
            check_native(rc, f"queue {self.index}: new memory table")
        old_native.release()
        old_mem.release()

    def reset(self) -> None:
        """Back to the initial state: stopped, not broken, no fds, no addresses."""
        self.stop()
        lib.vr_queue_reset(self._q)
        for fd in (self._kick, self._call, self._err):
            _close(fd)
        self._kick = self._call = self._err = None
        self._num = 0
        self._addr = None
        self._event_idx = False
        self._packed = False
        self._inflight = None
        self._engine = None
        self._dirty_log = None

    def close(self) -> None:
        """reset() and release the control eventfd; the object is unusable afterwards."""
        self.reset()
        if self._ctl >= 0:
            os.close(self._ctl)
            self._ctl = -1

    def _release_inflight(self) -> None:
        if self._inflight_buf is not None:
            ffi.release(self._inflight_buf)
            self._inflight_buf = None
        lib.vr_queue_set_inflight(self._q, ffi.NULL, 0)

    # -- slow-path data API (Python handlers, tests) -----------------------------------
    def pop(self) -> Chain | None:
        """The next available chain, or None (also once the queue is broken).

        Raises the typed VirtqueueError the first time the driver breaks a rule.
        """
        if not self._started:
            raise ValueError(f"queue {self.index} is not started")
        rc = lib.vr_pop(self._q, self._chain)
        if rc < 0:
            self._report_broken()
            check_native(rc, f"queue {self.index}: pop", self._q)
        if rc == 0:
            return None
        return self.popped_chain()

    def popped_chain(self) -> Chain:
        """The chain the last native pop left in `chain_buffer`, as a Chain.

        For device C code that pops on this queue and hands a chain back to
        Python (vsock's slow path); only meaningful right after such a pop."""
        c = self._chain
        segs = [(s.region, s.offset, s.len) for s in (c.segs[k] for k in range(c.nseg))]
        return Chain(c.head, segs[:c.nread], segs[c.nread:], self._memory)

    def unpop(self) -> None:
        """Give the chain popped last back, unused: the next pop returns it again.

        Only for queues without inflight tracking (a device that holds an rx
        buffer it may not need, such as vsock waiting for host data).
        """
        if not self._started:
            raise ValueError(f"queue {self.index} is not started")
        check_native(lib.vr_unpop(self._q), f"queue {self.index}: unpop")

    def push(self, head: int, length: int) -> None:
        """Return chain `head` to the driver with `length` bytes written."""
        if not self._started:
            raise ValueError(f"queue {self.index} is not started")
        if not 0 <= length <= 0xFFFFFFFF:
            raise ValueError("length must fit 32 bits")
        if not 0 <= head < self._num:
            raise ValueError(f"head {head} out of range")
        check_native(lib.vr_push(self._q, head, length), f"queue {self.index}: push")

    def notify(self) -> bool:
        """Signal the call eventfd if the suppression rules allow; True if signalled."""
        if not self._started:
            return False
        return bool(lib.vr_notify(self._q))

    def notify_force(self) -> bool:
        """Signal the call eventfd whatever the suppression state, for a thread other
        than the worker (which keeps the event-index bookkeeping of its own signals):
        a spare interrupt costs the driver less than a missed one."""
        if not self._started:
            return False
        return bool(lib.vr_notify_force(self._q))

    def rearm_kick(self) -> None:
        """Ask the driver for a kick past the chains popped so far (EVENT_IDX's
        avail_event, or the NO_NOTIFY flag cleared): for a thread other than the
        worker that popped chains under the queue's writer_lock, since the worker
        re-arms only past what it saw itself."""
        if self._started:
            lib.vr_enable_notify(self._q)

    def inflight_heads(self) -> list[int]:
        """Heads recovered from the inflight region, still to be resubmitted (counter order)."""
        if not self._started:
            return []
        buf = ffi.new("uint16_t[]", max(self._num, 1))
        n = lib.vr_inflight_list(self._q, buf, self._num)
        return [buf[i] for i in range(n)]

    def wake(self) -> None:
        """Make the worker run its handler again without a guest kick.

        For devices whose work also comes from the host side (vsock's rx path
        when a host socket has data): the worker leaves vr_run through the
        control eventfd and re-enters it, which runs the handler once.
        """
        if self._ctl >= 0:
            try:
                os.eventfd_write(self._ctl, 1)
            except OSError:
                pass

    # -- worker -----------------------------------------------------------------------------
    def _worker(self, fn, ctx) -> None:
        while True:
            rc = lib.vr_run(self._q, self._ctl, fn, ctx, self.poll_us)
            if rc == lib.VR_RUN_BROKEN:
                self._report_broken()
            elif rc == lib.VR_RUN_ERROR:
                log.error("queue %d: worker loop failed (bad kick or control fd)", self.index)
            if rc != lib.VR_RUN_CONTROL:
                with self._cond:
                    self._parked = True
                    self._cond.notify_all()
                    while self._request != "stop":
                        self._cond.wait()
                return
            _drain(self._ctl)
            with self._cond:
                self._parked = True
                self._cond.notify_all()
                while self._request == "pause":
                    self._cond.wait()
                self._parked = False
                if self._request == "stop":
                    return

    def report_broken(self) -> bool:
        """Log and signal (err eventfd) a ring violation that another thread met on
        this started queue (a worker-less engine's writers); True the first time."""
        if not self._started or not self.broken or self._reported:
            return False
        self._report_broken()
        return True

    def _report_broken(self) -> None:
        if self._reported:
            return
        self._reported = True
        log.error("%s", self.error)
        err = self._err
        if err is not None:
            try:
                os.eventfd_write(err, 1)
            except OSError:
                pass

    def paused(self) -> _Pause:
        """A context in which the queue's worker is parked at a batch boundary (every
        popped chain completed and pushed) and nothing else drives the queue, so the
        control thread may change what the engine works with (a resized disk)."""
        return _Pause(self)


class _Pause:
    """Context manager: park the worker at a batch boundary, resume on exit."""

    def __init__(self, vq: Virtqueue) -> None:
        self.vq = vq
        self.active = False
        self.locked: Engine | None = None
        self.writer: Any = None

    def __enter__(self) -> None:
        vq = self.vq
        if vq._started and vq._engine is not None and vq._thread is None:
            vq._engine.lock()  # a worker-less engine: other threads write this queue
            self.locked = vq._engine
            return
        self._park()
        self.writer = vq.writer_lock
        if self.writer is not None:
            self.writer.acquire()  # after parking: the worker may need it to finish its batch

    def _park(self) -> None:
        vq = self.vq
        t = vq._thread
        if t is None or not t.is_alive() or t is threading.current_thread():
            return
        with vq._cond:
            vq._request = "pause"
        self.active = True
        os.eventfd_write(vq._ctl, 1)
        with vq._cond:
            while not vq._parked and t.is_alive():
                vq._cond.wait(0.1)

    def __exit__(self, *exc: object) -> None:
        if self.locked is not None:
            self.locked.unlock()
            return
        if self.writer is not None:
            self.writer.release()
        if not self.active:
            return
        vq = self.vq
        with vq._cond:
            if vq._request == "pause":
                vq._request = None
            vq._cond.notify_all()


def _drain(fd: int) -> None:
    try:
        os.eventfd_read(fd)
    except (BlockingIOError, OSError):
        pass


def _close(fd: int | None, keep: int | None = None) -> None:
    if fd is not None and fd != keep:
        try:
            os.close(fd)
        except OSError:
            pass
