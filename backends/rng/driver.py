"""A virtio-rng driver model: what Linux's virtio_rng does, minus the CPU.

The guest's hw_random core posts one writable buffer, kicks, and waits for
it to come back with the number of bytes the device wrote (virtio 1.2,
5.4.6). `read(n)` does that until n bytes have arrived; `post`/`reap`
expose the ring for tests that want many buffers in flight at once.
"""

from __future__ import annotations

import time

from vhost_user.frontend import Frontend, QueueHandle
from vhost_user.frontend.driver import Driver
from vhost_user.protocol import VirtioFeature

__all__ = ["RngDriver", "DRIVER_FEATURES"]

DRIVER_FEATURES = (1 << VirtioFeature.VIRTIO_F_VERSION_1) | (1 << VirtioFeature.VIRTIO_RING_F_EVENT_IDX)


class RngDriver(Driver):
    """Drives one vhost-user-rng back-end through the built-in front-end."""

    def __init__(self, frontend: Frontend, *, queue_size: int = 64, buf_size: int = 64):
        self.fe = frontend
        frontend.set_mem_table()
        self.queue: QueueHandle = frontend.setup_queue(0, queue_size)
        self.buf_size = buf_size
        self._bufs = [frontend.ram.alloc(buf_size, 64) for _ in range(queue_size)]
        self._free = list(range(queue_size))
        self._posted: dict[int, int] = {}  # head -> buffer index

    @classmethod
    def connect(cls, path: str, *, queue_size: int = 64, buf_size: int = 64,
                features: int = DRIVER_FEATURES, ram_size: int = 64 << 20) -> "RngDriver":
        fe = Frontend(path, ram_size=ram_size)
        try:
            fe.negotiate(features)
            return cls(fe, queue_size=queue_size, buf_size=buf_size)
        except BaseException:
            fe.close()
            raise

    def post(self, count: int = 1) -> int:
        """Put up to `count` empty buffers on the ring and kick; returns how many."""
        n = 0
        while n < count and self._free:
            i = self._free.pop()
            head = self.queue.ring.add([(self._bufs[i], self.buf_size, True)])
            self._posted[head] = i
            n += 1
        if n:
            self.queue.ring.kick()
        return n

    def reap(self, timeout: float = 5.0) -> list[bytes]:
        """Wait up to `timeout` for completions; the bytes each buffer got, in order."""
        ring = self.queue.ring
        deadline = time.monotonic() + timeout
        done = ring.reap()
        # a call may be left over from entries already reaped: wait again until one brings some
        while not done and ring.wait(max(0.0, deadline - time.monotonic())):
            done = ring.reap()
            if time.monotonic() >= deadline:
                break
        out = []
        for head, length in done:
            i = self._posted.pop(head)
            if length > self.buf_size:
                raise AssertionError(f"device claims {length} bytes in a {self.buf_size}-byte buffer")
            out.append(self.fe.ram.read(self._bufs[i], length))
            self._free.append(i)
        return out

    def read(self, n: int, timeout: float = 10.0) -> bytes:
        """n bytes of entropy, one buffer at a time like hw_random."""
        got = bytearray()
        deadline = time.monotonic() + timeout
        while len(got) < n:
            if not self._posted:
                self.post(1)
            for piece in self.reap(max(0.0, deadline - time.monotonic())):
                got += piece
            if time.monotonic() > deadline:
                raise TimeoutError(f"rng: {len(got)} of {n} bytes after {timeout} s")
        return bytes(got[:n])
