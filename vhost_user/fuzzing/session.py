"""The session fuzz machinery: message sequences against a live DeviceServer.

A device's session target (blk's: backends/blk/fuzz_session.py) binds it to
the device it serves: `run_one(data, make_device)`, where `make_device()`
builds the device once per process (its memory is `RAM` bytes). One
DeviceServer runs in a background thread's event loop for the whole fuzzing
process, as a back-end serves front-end after front-end. Each input is one connection: a
sequence of messages of any type in any order, with mostly plausible
payloads (queue indices near the range, power-of-two sizes, ring addresses
inside the shared memfd, memory tables with real memfds that may be too
small) and real fds (memfds, eventfds) in counts that are usually right and
sometimes one off. Guest memory holds fuzz bytes, and the input ends by
kicking every kick fd it sent. Checks, after the connection closes:

* the server is still serving (its task did not die) and no exception
  reached the event loop;
* this process has exactly the fds it had before (every fd sent was
  closed or returned) and no queue worker thread is left;
* a reply to a request that has one arrived, or the connection was dropped.
"""
from __future__ import annotations

import asyncio
import atexit
import mmap
import os
import select
import shutil
import socket
import struct
import tempfile
import threading
import time

from vhost_user.protocol import (
    FrontendRequest as R,
    HeaderFlag,
    ProtocolFeature as PF,
    VRING_NOFD_MASK,
    spec_for,
)
from vhost_user.server import DeviceServer, listen_unix

from vhost_user.fuzzing.reader import ByteReader

__all__ = ["RAM", "run_one", "seeds"]

RAM = 1 << 20
UADDR = 0x7F00_0000_0000
_REQUESTS = list(R)
_state: dict = {}


def _server(make_device) -> dict:
    """Start the long-lived server thread once per process."""
    if _state:
        return _state
    # Under atheris the runner's temporary directory (removed by it: libFuzzer skips atexit).
    workdir = tempfile.mkdtemp(prefix="vu-fuzz-", dir=os.environ.get("VHOST_USER_FUZZ_TMP"))
    atexit.register(shutil.rmtree, workdir, True)
    path = os.path.join(workdir, "s.sock")
    listener = listen_unix(path)
    device = make_device()
    server = DeviceServer(device, listener, path=path)
    loop = asyncio.new_event_loop()
    errors: list = []
    tasks: list = []
    loop.set_exception_handler(lambda lp, ctx: errors.append(ctx))

    def task_factory(lp, coro, **kw):
        task = asyncio.Task(coro, loop=lp, **kw)
        tasks.append(task)  # a connection task that dies is seen at once, not at GC time
        return task

    loop.set_task_factory(task_factory)
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        task = loop.create_task(server.serve_forever())
        _state["task"] = task
        ready.set()
        loop.run_until_complete(task)

    thread = threading.Thread(target=run, name="fuzz-server", daemon=True)
    thread.start()
    ready.wait()
    _state.update(path=path, server=server, loop=loop, errors=errors, tasks=tasks, thread=thread)
    time.sleep(0.05)
    return _state


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def _u64(r: ByteReader) -> int:
    return r.pick((0, 1 << 32, (1 << 32) | (1 << 29) | (1 << 28), r.u64(), 0xFFFF_FFFF_FFFF_FFFF))


def _region(r: ByteReader) -> bytes:
    gpa = r.pick((0, 0, RAM, r.u64()))
    size = r.pick((RAM, RAM, RAM // 2, 0, RAM * 2, r.u64()))
    uaddr = r.pick((UADDR, UADDR + RAM, r.u64()))
    offset = r.pick((0, 0, 4096, r.u64()))
    return struct.pack("<QQQQ", gpa, size, uaddr, offset)


def _payload(r: ByteReader, request: R) -> bytes:
    cls = spec_for(request).accepted_payloads[0].__name__
    index = r.u8() % 3 if r.u8() % 8 else r.u8()
    if cls == "Empty":
        return b""
    if cls == "U64":
        if request in (R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR):
            return struct.pack("<Q", index | (VRING_NOFD_MASK if r.u8() % 8 == 0 else 0))
        return struct.pack("<Q", _u64(r))
    if cls == "VringFdRequest":
        return struct.pack("<Q", index | (VRING_NOFD_MASK if r.u8() % 8 == 0 else 0))
    if cls == "VringState":
        return struct.pack("<II", index, r.pick((64, 128, 256, 1, 0, 3, 32768, r.u32())))
    if cls == "VringAddress":
        addrs = [r.pick((UADDR + 0x1000 * (r.u8() % 16), UADDR + r.u16(), r.u64())) for _ in range(4)]
        return struct.pack("<IIQQQQ", index, r.u8() % 2, *addrs)
    if cls == "MemoryTable":
        n = r.u8() % 3
        return struct.pack("<II", n if r.u8() % 8 else r.u32() % 16, 0) + b"".join(_region(r) for _ in range(n))
    if cls == "SingleMemoryRegion":
        return bytes(8) + _region(r)
    if cls == "ConfigSpace":
        size = r.u8() % 80
        return struct.pack("<III", r.u8() % 80, size, r.u8() % 2) + r.take(size).ljust(size, b"\0")
    if cls == "InflightDescription":
        return struct.pack("<QQHH4x", r.pick((4096, 8192, 0, r.u64())), r.pick((0, 4096, r.u64())),
                           r.pick((1, 2, 0, r.u16())), r.pick((64, 256, 0, r.u16())))
    size = spec_for(request).accepted_payloads[0].SIZE or r.u8()
    return r.take(size).ljust(size, b"\0")


def _fds_for(r: ByteReader, request: R, payload: bytes, ram_fd: int, kicks: list[int]) -> list[int]:
    spec = spec_for(request)
    try:
        bounds = spec.fds.bounds(spec.accepted_payloads[0].unpack(payload))
        want = bounds[1]
    except Exception:  # the payload does not even decode: the decoder refuses it
        want = 1
    want = max(0, want + r.pick((0, 0, 0, 1, -1)))
    fds = []
    for _ in range(min(want, 9)):
        kind = r.u8() % 4
        if request in (R.SET_MEM_TABLE, R.ADD_MEM_REG, R.SET_INFLIGHT_FD) and kind:
            fds.append(os.dup(ram_fd) if kind > 1 else _memfd(r.pick((4096, 0, RAM * 2))))
        else:
            fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            kicks.append(os.dup(fd))
            fds.append(fd)
    return fds


def _memfd(size: int) -> int:
    fd = os.memfd_create("fuzz-region", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def _drain(sock: socket.socket) -> bool:
    """Read whatever replies arrived (closing any fds in them); False once the peer hung up."""
    while select.select([sock], [], [], 0)[0]:
        try:
            data, anc, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(8 * 4))
        except (ConnectionResetError, BlockingIOError):
            return False
        for level, kind, blob in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                for fd in struct.unpack(f"{len(blob) // 4}i", blob[:len(blob) - len(blob) % 4]):
                    os.close(fd)
        if not data:
            return False
    return True


def _opening() -> list[tuple[R, bytes]]:
    """GET/SET features and SET_OWNER, so later messages get past the state checks."""
    feats = (1 << PF.REPLY_ACK) | (1 << PF.MQ) | (1 << PF.CONFIGURE_MEM_SLOTS) | (1 << PF.INFLIGHT_SHMFD)
    return [(R.GET_FEATURES, b""), (R.SET_PROTOCOL_FEATURES, struct.pack("<Q", feats)), (R.SET_OWNER, b"")]


def run_one(data: bytes, make_device) -> None:
    """One connection's worth of messages from `data` to the server of `make_device()`'s device."""
    st = _server(make_device)
    server = st["server"]
    r = ByteReader(data)
    fds_before = _fd_count()
    threads_before = threading.active_count()
    served = server.sessions_served
    ram_fd = _memfd(RAM)
    with mmap.mmap(ram_fd, RAM) as ram:
        blob = r.take(r.u8() * 8)  # rings and descriptors: fuzz bytes, tiled over the first 64 KiB
        if blob:
            ram[:0x10000] = (blob * (0x10000 // len(blob) + 1))[:0x10000]
    kicks: list[int] = []
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(st["path"])
        plan = _opening() if r.u8() % 4 else []
        for _ in range(r.u8() % 24):
            request = _REQUESTS[r.below(len(_REQUESTS))]
            plan.append((request, _payload(r, request)))
        for request, payload in plan:
            flags = 1 | (HeaderFlag.NEED_REPLY if r.u8() % 4 else 0)
            number = int(request) if r.u8() % 32 else r.u32()
            fds = _fds_for(r, request, payload, ram_fd, kicks)
            try:
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] if fds else []
                sock.sendmsg([struct.pack("<III", number, flags, len(payload)) + payload], anc)
            except (BrokenPipeError, ConnectionResetError):
                break
            finally:
                for fd in fds:
                    os.close(fd)
            if not _drain(sock):
                break
        for fd in kicks:
            os.eventfd_write(fd, 1)
    finally:
        sock.close()
        for fd in kicks:
            os.close(fd)
        os.close(ram_fd)
    deadline = time.monotonic() + 10
    while server.sessions_served == served:
        assert not st["task"].done(), f"the server stopped: {st['task']}"
        assert time.monotonic() < deadline, "the server did not finish the connection"
        time.sleep(0.0005)
    died = []
    for task in [t for t in st["tasks"] if t.done()]:
        st["tasks"].remove(task)
        if not task.cancelled() and task.exception() is not None:
            died.append(task.exception())
    assert not died, f"a connection task died on {died[0]!r}"
    assert not st["errors"], f"exception reached the event loop: {st['errors'][:1]}"
    assert threading.active_count() == threads_before, "a queue worker thread outlived its connection"
    assert _fd_count() == fds_before, f"fd leak: {fds_before} -> {_fd_count()}"


def seeds() -> list[bytes]:
    import random

    rng = random.Random(5)
    out = [bytes(8), bytes([1, 0, 0, 0, 20])]
    for size in (64, 256, 1024, 4096):
        out.append(bytes(rng.getrandbits(8) for _ in range(size)))
    return out
