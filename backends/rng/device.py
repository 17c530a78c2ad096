"""The virtio-rng device: entropy into the guest's request-queue buffers.

virtio 1.2, 5.4: one queue (requestq), no feature bits of its own, no
config space. Each available buffer is device-writable; the device fills
as much of it as it chooses and returns the length written. The guest's
hw_random core posts one buffer at a time and waits for it.

The queue's worker calls `_serve` on every kick (a Python handler: an rng
request is rare next to disk or network traffic, so the C engines'
per-request rule does not pay here). One batch: pop every chain, draw the
bytes for all of them with one getrandom() call, write them, push them and
notify once.

Rate limit (`--max-bytes B --period MS`, as vhost-device-rng and QEMU's
rng-random offer): at most B bytes per period. When the budget is spent,
the buffers stay in the ring (back-pressure: the guest simply waits) and a
timer wakes the queue when the next period starts. A chain that would
overrun the budget is filled only up to what is left, never skipped.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

from . import sandbox as _sandbox  # noqa: F401 (registers the seccomp profile)
from vhost_user.device import VirtioDevice, queue_size_problem
from vhost_user.errors import DeviceError
from .spec import SPEC

__all__ = ["RngDevice", "RngOptions", "CAPABILITIES", "VIRTIO_ID_RNG"]

log = logging.getLogger(__name__)

VIRTIO_ID_RNG = SPEC.virtio_id
#: docs/interop/vhost-user.json has no rng capabilities of its own
CAPABILITIES = SPEC.capabilities()  # static; the program may add run-time probes
#: the most one request gets: Linux's hw_random reads at most 64 bytes at a
#: time, virtio_rng up to a page; a huge guest buffer must not make us draw MiBs
MAX_PER_REQUEST = 64 << 10



@dataclass
class RngOptions:
    queue_size: int = 32768
    source: str | None = None   # a file to read instead of getrandom()
    max_bytes: int = 0          # 0: no rate limit
    period_ms: int = 1000


class RngDevice(VirtioDevice):
    device_type = SPEC.name
    virtio_id = SPEC.virtio_id
    num_queues = 1

    def __init__(self, opts: RngOptions | None = None) -> None:
        super().__init__()
        self.opts = opts or RngOptions()
        if (problem := queue_size_problem(self.opts.queue_size)) is not None:
            raise DeviceError(problem)
        self.max_queue_size = self.opts.queue_size
        self._fd = -1
        if self.opts.source is not None:
            try:
                self._fd = os.open(self.opts.source, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise DeviceError(f"{self.opts.source}: cannot open entropy source: {exc.strerror}") from None
        self._lock = threading.Lock()
        self._period_start = time.monotonic()
        self._spent = 0
        self._timer: threading.Timer | None = None
        self.stats = {"requests": 0, "bytes": 0, "rate_limited": 0, "source_errors": 0}

    # -- queue ------------------------------------------------------------------------
    def queue_handler(self, index: int):
        if index == 0:
            return self._serve
        return super().queue_handler(index)

    def queue_stopped(self, index: int) -> None:
        self._cancel_timer()

    def _budget(self, vq) -> int:
        """Bytes that may still go out in this period (no limit: a large number)."""
        if not self.opts.max_bytes:
            return 1 << 62
        now = time.monotonic()
        period = self.opts.period_ms / 1000
        if now - self._period_start >= period:
            self._period_start, self._spent = now, 0
        left = self.opts.max_bytes - self._spent
        if left <= 0:
            self.stats["rate_limited"] += 1
            self._arm_timer(vq, self._period_start + period - now)
        return max(0, left)

    def _arm_timer(self, vq, delay: float) -> None:
        with self._lock:
            if self._timer is not None:
                return
            self._timer = threading.Timer(max(delay, 0.001), self._wake, args=(vq,))
            self._timer.daemon = True
            self._timer.start()

    def _wake(self, vq) -> None:
        with self._lock:
            self._timer = None
        vq.wake()

    def _cancel_timer(self) -> None:
        with self._lock:
            t, self._timer = self._timer, None
        if t is not None:
            t.cancel()

    def _draw(self, n: int) -> bytes:
        if self._fd < 0:
            return os.getrandom(n)
        out = bytearray()
        while len(out) < n:
            try:
                got = os.read(self._fd, n - len(out))
            except OSError as exc:
                self.stats["source_errors"] += 1
                log.error("%s: read failed: %s", self.opts.source, exc.strerror)
                break
            if not got:
                if self.stats["source_errors"] == 0:
                    log.error("%s: end of file", self.opts.source)
                self.stats["source_errors"] += 1
                break
            out += got
        return bytes(out)

    def _serve(self, vq) -> None:
        budget = self._budget(vq)
        chains = []
        want = 0
        while budget - want > 0:
            chain = vq.pop()
            if chain is None:
                break
            take = min(chain.write_len, MAX_PER_REQUEST, budget - want)
            chains.append((chain, take))
            want += take
        if not chains:
            return
        data = memoryview(self._draw(want))
        pos = 0
        for chain, take in chains:
            piece = data[pos:pos + take]
            written = chain.write(piece) if len(piece) else 0
            pos += written
            vq.push(chain.head, written)
        self._spent += pos
        self.stats["requests"] += len(chains)
        self.stats["bytes"] += pos
        vq.notify()

    # -- lifecycle --------------------------------------------------------------------
    def reset(self) -> None:
        super().reset()
        self._cancel_timer()

    def close(self) -> None:
        self._cancel_timer()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def capabilities(self) -> dict:
        return dict(CAPABILITIES)
