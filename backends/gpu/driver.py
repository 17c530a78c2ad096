"""A virtio-gpu driver model and QEMU's side of the vhost-user-gpu display protocol.

`DisplayListener` plays QEMU: it owns one end of the socket pair whose other
end goes to the back-end with GPU_SET_SOCKET, answers GET_PROTOCOL_FEATURES
(EDID | DMABUF2), GET_DISPLAY_INFO, GET_EDID (only for outputs that exist,
like QEMU) and DMABUF_UPDATE, and keeps each scanout's image from SCANOUT and
UPDATE plus the cursor, so a test sees what QEMU would display.

`GpuDriver` is what a guest's virtio_gpu does, minus the CPU: control and
cursor queues through the C driver ring, commands and responses built and
parsed by `vhost_user.backends.gpu.commands`, backing pages allocated in
guest RAM (optionally scattered, as a real guest's are). It drives any
vhost-user-gpu back-end: ours and QEMU's /usr/lib/qemu/vhost-user-gpu.
"""

from __future__ import annotations

import array
import random
import socket
import struct
import threading
from dataclasses import dataclass, field

import numpy as np

from vhost_user.backends.gpu.commands import (
    CtrlHeader,
    CtrlType as T,
    CursorPos,
    GetCapsetInfo,
    GetDisplayInfo,
    GetEdid,
    GpuConfig,
    GpuFeature,
    MemEntry,
    Rect,
    ResourceAttachBacking,
    ResourceCreate2d,
    ResourceDetachBacking,
    ResourceFlush,
    ResourceUnref,
    RespDisplayInfo,
    RespEdid,
    SetScanout,
    TransferToHost2d,
    UpdateCursor,
    DisplayOne,
)
from vhost_user.backends.gpu.commands_blob import (
    BlobFlag,
    BlobMem,
    ResourceAssignUuid,
    ResourceCreateBlob,
    RespResourceUuid,
    SetScanoutBlob,
)
from vhost_user.backends.gpu.display_protocol import (
    HEADER,
    CursorPosMsg,
    CursorUpdateMsg,
    GpuProtocolFeature,
    GpuRequest as G,
    ScanoutMsg,
    UpdateMsg,
    pack_message,
)
from vhost_user.backends.gpu.edid import build_edid
from vhost_user.channel import close_fds
from vhost_user.errors import VhostUserError
from vhost_user.frontend import QEMU, Frontend, Profile
from vhost_user.frontend.driver import Driver
from vhost_user.protocol import FrontendRequest as R, ProtocolFeature as PF, VirtioFeature

__all__ = ["GpuDriver", "GpuDriverError", "DisplayListener", "CursorState", "Backing",
           "DRIVER_FEATURES", "BLOB_FEATURES", "PAGE"]

PAGE = 4096
DRIVER_FEATURES = (
    (1 << VirtioFeature.VIRTIO_F_VERSION_1)
    | (1 << VirtioFeature.VIRTIO_RING_F_EVENT_IDX)
    | (1 << VirtioFeature.VIRTIO_RING_F_INDIRECT_DESC)
    | (1 << GpuFeature.VIRTIO_GPU_F_EDID)
)
#: what Linux's virtio-gpu also acks from a device offering guest blobs
BLOB_FEATURES = (DRIVER_FEATURES | (1 << GpuFeature.VIRTIO_GPU_F_RESOURCE_UUID)
                 | (1 << GpuFeature.VIRTIO_GPU_F_RESOURCE_BLOB))
_QEMU_FEATURES = (1 << GpuProtocolFeature.EDID) | (1 << GpuProtocolFeature.DMABUF2)


class GpuDriverError(VhostUserError):
    """The GPU answered a command with an unexpected response."""


@dataclass
class CursorState:
    x: int = 0
    y: int = 0
    visible: bool = False
    hot_x: int = 0
    hot_y: int = 0
    image: bytes = b""


class DisplayListener:
    """QEMU's end of the display socket, served by a thread; scanout images as numpy."""

    def __init__(self, outputs: list[tuple[int, int]] | None = None, *, enabled: int | None = None):
        self.outputs = outputs or [(1280, 800)]
        self.enabled = enabled if enabled is not None else 1  # QEMU enables output 0 only
        self.sock, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.images: dict[int, np.ndarray | None] = {}
        self.cursors: dict[int, CursorState] = {}
        self.log: list[tuple[int, tuple]] = []
        self.protocol_features: int | None = None
        self.error: str | None = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="gpu-display", daemon=True)
        self._thread.start()

    def take_peer_fd(self) -> int:
        """The back-end's end, to pass with GPU_SET_SOCKET (close `peer` once sent)."""
        return self.peer.fileno()

    # -- reading --------------------------------------------------------------------
    def _recv_exact(self, buf) -> bool:
        view, pos = memoryview(buf).cast("B"), 0
        while pos < len(view):
            n = self.sock.recv_into(view[pos:])
            if n == 0:
                return False
            pos += n
        return True

    def _read_header(self):
        fds = array.array("i")
        data, anc, flags, _ = self.sock.recvmsg(HEADER.size, socket.CMSG_SPACE(4 * 4))
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[:len(payload) - len(payload) % 4])
        close_fds(list(fds))  # dmabufs are not displayed here
        if not data:
            return None
        rest = bytearray(HEADER.size - len(data))
        if rest and not self._recv_exact(rest):
            return None
        return HEADER.unpack(bytes(data) + bytes(rest))

    def _run(self) -> None:
        try:
            while True:
                head = self._read_header()
                if head is None:
                    break
                request, flags, size = head
                if request == G.UPDATE and size >= UpdateMsg.SIZE:
                    self._update(size)
                    continue
                payload = bytearray(size)
                if not self._recv_exact(payload):
                    break
                self._handle(request, bytes(payload))
        except OSError as exc:
            self.error = str(exc)
        finally:
            with self._cond:
                self._cond.notify_all()

    def _record(self, request: int, info: tuple) -> None:
        with self._cond:
            self.log.append((request, info))
            self._cond.notify_all()

    def _reply(self, request: int, payload: bytes) -> None:
        self.sock.sendall(pack_message(request, payload, reply=True))

    def _display_info(self) -> RespDisplayInfo:
        modes = [DisplayOne(Rect(0, 0, w, h), 1 if self.enabled & (1 << i) else 0, 0)
                 for i, (w, h) in enumerate(self.outputs)]
        return RespDisplayInfo(tuple(modes))

    def _handle(self, request: int, payload: bytes) -> None:
        if request == G.GET_PROTOCOL_FEATURES:
            self._reply(request, struct.pack("<Q", _QEMU_FEATURES))
        elif request == G.SET_PROTOCOL_FEATURES:
            self.protocol_features = struct.unpack_from("<Q", payload)[0]
        elif request == G.GET_DISPLAY_INFO:
            self._reply(request, self._display_info().pack())
        elif request == G.GET_EDID:
            (scanout,) = struct.unpack_from("<I", payload)
            if scanout < len(self.outputs):  # QEMU stays silent otherwise
                w, h = self.outputs[scanout]
                self._reply(request, RespEdid(build_edid(w, h, serial=scanout)).pack())
        elif request == G.SCANOUT:
            m = ScanoutMsg.unpack(payload)
            if m.scanout_id < len(self.outputs):
                with self._cond:
                    self.images[m.scanout_id] = (None if m.width == 0 else
                                                 np.zeros((m.height, m.width, 4), np.uint8))
        elif request in (G.CURSOR_POS, G.CURSOR_POS_HIDE, G.CURSOR_UPDATE):
            self._cursor(request, payload)
        elif request == G.DMABUF_UPDATE:
            self._reply(request, b"")
        self._record(request, tuple(payload[:20]))

    def _cursor(self, request: int, payload: bytes) -> None:
        pos = CursorPosMsg.unpack(payload)
        if pos.scanout_id >= len(self.outputs):
            return
        with self._cond:
            c = self.cursors.setdefault(pos.scanout_id, CursorState())
            if request == G.CURSOR_UPDATE:
                up = CursorUpdateMsg.unpack(payload)
                c.hot_x, c.hot_y, c.image = up.hot_x, up.hot_y, up.data
            c.x, c.y, c.visible = pos.x, pos.y, request != G.CURSOR_POS_HIDE

    def _update(self, size: int) -> None:
        head = bytearray(UpdateMsg.SIZE)
        if not self._recv_exact(head):
            raise OSError("display socket closed inside UPDATE")
        m = UpdateMsg.unpack(bytes(head))
        pixels = np.empty(size - UpdateMsg.SIZE, np.uint8)
        if not self._recv_exact(pixels):
            raise OSError("display socket closed inside UPDATE")
        with self._cond:
            img = self.images.get(m.scanout_id) if m.scanout_id < len(self.outputs) else None
            if img is not None and m.width and m.height and pixels.size >= m.pixel_bytes:
                px = pixels[:m.pixel_bytes].reshape(m.height, m.width, 4)
                h, w = img.shape[:2]
                y1, x1 = min(m.y + m.height, h), min(m.x + m.width, w)
                if y1 > m.y and x1 > m.x:
                    img[m.y:y1, m.x:x1] = px[:y1 - m.y, :x1 - m.x]
        self._record(G.UPDATE, (m.scanout_id, m.x, m.y, m.width, m.height))

    # -- what a test looks at ---------------------------------------------------------
    def rgb(self, scanout: int = 0) -> np.ndarray | None:
        """The scanout as an (h, w, 3) RGB array, or None when it is off."""
        with self._cond:
            img = self.images.get(scanout)
            return None if img is None else img[:, :, [2, 1, 0]].copy()

    def count(self, request: int) -> int:
        with self._cond:
            return sum(1 for r, _ in self.log if r == request)

    def wait_for(self, request: int, count: int, timeout: float = 10.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.count_unlocked(request) >= count, timeout)

    def count_unlocked(self, request: int) -> int:
        return sum(1 for r, _ in self.log if r == request)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._thread.join(5)
        self.sock.close()
        self.peer.close()


@dataclass
class _Slot:
    cmd: int
    resp: int


@dataclass
class Backing:
    """Guest pages backing a resource: (addr, length) entries in the order the device sees."""

    entries: list[MemEntry] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(e.length for e in self.entries)


class GpuDriver(Driver):
    """Drives one vhost-user-gpu back-end through the built-in front-end."""

    CMD_BYTES = ResourceCreateBlob.SIZE + 16 * 16384
    RESP_BYTES = 4096

    def __init__(self, frontend: Frontend, listener: DisplayListener | None, *,
                 queue_size: int = 64, slots: int = 8):
        self.fe = frontend
        self.listener = listener
        self.config = (GpuConfig.unpack(frontend.get_config(GpuConfig.SIZE))
                       if frontend.has_protocol_feature(PF.CONFIG) else None)
        if listener is not None:
            self.set_display_socket(listener)
        frontend.set_mem_table()
        self.ctrl = frontend.setup_queue(0, queue_size)
        self.cursor = frontend.setup_queue(1, queue_size)
        ram = frontend.ram
        self._slots = [_Slot(ram.alloc(self.CMD_BYTES, PAGE), ram.alloc(self.RESP_BYTES, PAGE))
                       for _ in range(slots)]
        self._cursor_cmd = ram.alloc(UpdateCursor.SIZE, 64)

    @classmethod
    def connect(cls, path: str, *, outputs: list[tuple[int, int]] | None = None,
                enabled: int | None = None, ram_size: int = 64 << 20, display: bool | None = None,
                features: int = DRIVER_FEATURES, queue_size: int = 64,
                profile: Profile = QEMU) -> "GpuDriver":
        """`display`: hand the back-end a display socket (default: when the
        profile's VMM sends GPU_SET_SOCKET, i.e. QEMU and not crosvm)."""
        if display is None:
            display = profile.sends is None or R.GPU_SET_SOCKET in profile.sends
        fe = Frontend(path, ram_size=ram_size, profile=profile)
        listener = DisplayListener(outputs, enabled=enabled) if display else None
        try:
            fe.negotiate(features)
            return cls(fe, listener, queue_size=queue_size)
        except BaseException:
            fe.close()
            if listener is not None:
                listener.close()
            raise

    def set_display_socket(self, listener: DisplayListener) -> None:
        """GPU_SET_SOCKET as QEMU sends it (no reply requested)."""
        self.fe.call(R.GPU_SET_SOCKET, fds=(listener.take_peer_fd(),), ack=False)
        listener.peer.close()  # the back-end holds its own copy now
        # A request with a reply orders it: queue commands kicked from now on see the socket.
        self.fe.call(R.GET_FEATURES)

    # -- control queue -------------------------------------------------------------------
    def submit(self, commands: list[bytes], resp_len: int = CtrlHeader.SIZE,
               timeout: float = 10.0) -> list[bytes]:
        """Post up to `slots` commands at once; return their responses in order."""
        if len(commands) > len(self._slots):
            raise ValueError(f"at most {len(self._slots)} commands in flight")
        ram, ring = self.fe.ram, self.ctrl.ring
        heads = {}
        for i, cmd in enumerate(commands):
            slot = self._slots[i]
            ram.write(slot.cmd, cmd)
            ram.write(slot.resp, b"\xee" * resp_len)
            heads[ring.add([(slot.cmd, len(cmd), False), (slot.resp, resp_len, True)])] = (i, slot)
        ring.kick()
        out: list[bytes | None] = [None] * len(commands)
        pending = len(commands)
        while pending:
            done = ring.reap()
            if not done and not ring.wait(timeout):
                raise TimeoutError(f"control queue: no completion within {timeout} s")
            for head, used in done:
                i, slot = heads.pop(head)
                out[i] = ram.read(slot.resp, min(used, resp_len))
                pending -= 1
        return out

    def command(self, cmd: bytes, resp_len: int = CtrlHeader.SIZE) -> bytes:
        return self.submit([cmd], resp_len)[0]

    def status(self, cmd: bytes) -> int:
        """The response type of a command that answers with a bare header."""
        resp = self.command(cmd)
        return CtrlHeader.unpack(resp).type if len(resp) >= CtrlHeader.SIZE else -1

    def display_info(self) -> RespDisplayInfo:
        return RespDisplayInfo.unpack(self.command(GetDisplayInfo().pack(), RespDisplayInfo.SIZE))

    def edid(self, scanout: int) -> bytes:
        """The raw response (a RespEdid, or a bare error header)."""
        return self.command(GetEdid(scanout).pack(), RespEdid.SIZE)

    def create_2d(self, resource_id: int, width: int, height: int,
                  fmt: int = 2) -> int:
        return self.status(ResourceCreate2d(resource_id, fmt, width, height).pack())

    def unref(self, resource_id: int) -> int:
        return self.status(ResourceUnref(resource_id).pack())

    def attach_backing(self, resource_id: int, backing: Backing) -> int:
        return self.status(ResourceAttachBacking(resource_id, tuple(backing.entries)).pack_all())

    def detach_backing(self, resource_id: int) -> int:
        return self.status(ResourceDetachBacking(resource_id).pack())

    def set_scanout(self, scanout_id: int, resource_id: int, r: Rect) -> int:
        return self.status(SetScanout(r, scanout_id, resource_id).pack())

    def transfer(self, resource_id: int, r: Rect, offset: int = 0) -> int:
        return self.status(TransferToHost2d(r, offset, resource_id).pack())

    def flush(self, resource_id: int, r: Rect) -> int:
        return self.status(ResourceFlush(r, resource_id).pack())

    # -- blobs (virtio 5.7.6.8), as Linux's virtio-gpu sends them for a dumb buffer ------------
    def create_blob(self, resource_id: int, backing: Backing, size: int | None = None, *,
                    blob_mem: int = BlobMem.VIRTIO_GPU_BLOB_MEM_GUEST,
                    blob_flags: int = BlobFlag.VIRTIO_GPU_BLOB_FLAG_USE_SHAREABLE,
                    nr_entries: int | None = None) -> int:
        size = backing.size if size is None else size
        cmd = ResourceCreateBlob(resource_id, blob_mem, blob_flags, size, 0,
                                 tuple(backing.entries), nr_entries=nr_entries)
        return self.status(cmd.pack_all())

    def set_scanout_blob(self, scanout_id: int, resource_id: int, width: int, height: int, *,
                         fmt: int = 2, stride: int | None = None, offset: int = 0,
                         r: Rect | None = None) -> int:
        stride = width * 4 if stride is None else stride
        r = r or Rect(0, 0, width, height)
        return self.status(SetScanoutBlob(r, scanout_id, resource_id, width, height, fmt,
                                          (stride, 0, 0, 0), (offset, 0, 0, 0)).pack())

    def assign_uuid(self, resource_id: int) -> tuple[int, bytes]:
        """(response type, the UUID or b"")."""
        resp = self.command(ResourceAssignUuid(resource_id).pack(), RespResourceUuid.SIZE)
        rtype = CtrlHeader.unpack(resp).type
        return rtype, (RespResourceUuid.unpack(resp).uuid if rtype == T.RESP_OK_RESOURCE_UUID else b"")

    def capset_info(self, index: int) -> int:
        return CtrlHeader.unpack(self.command(GetCapsetInfo(index).pack(), 40)).type

    # -- cursor queue ------------------------------------------------------------------
    def cursor_command(self, cmd: UpdateCursor, timeout: float = 10.0) -> int:
        """Post one cursor command; returns the used length the device reported."""
        self.fe.ram.write(self._cursor_cmd, cmd.pack())
        ring = self.cursor.ring
        ring.add([(self._cursor_cmd, UpdateCursor.SIZE, False)])
        ring.kick()
        done = ring.reap()
        while not done:
            if not ring.wait(timeout):
                raise TimeoutError("cursor queue: no completion")
            done = ring.reap()
        return done[0][1]

    def update_cursor(self, scanout: int, x: int, y: int, resource_id: int,
                      hot_x: int = 0, hot_y: int = 0) -> int:
        return self.cursor_command(UpdateCursor(CursorPos(scanout, x, y), resource_id, hot_x, hot_y))

    def move_cursor(self, scanout: int, x: int, y: int, resource_id: int) -> int:
        return self.cursor_command(UpdateCursor(CursorPos(scanout, x, y), resource_id,
                                                hdr=CtrlHeader(T.CMD_MOVE_CURSOR)))

    # -- guest memory helpers ------------------------------------------------------------
    def alloc_backing(self, nbytes: int, *, scatter: bool = True, seed: int = 1) -> Backing:
        """Pages for nbytes; scattered = one entry per page, pages in a shuffled order."""
        pages = -(-nbytes // PAGE)
        base = self.fe.ram.alloc(pages * PAGE, PAGE)
        if not scatter:
            return Backing([MemEntry(base, nbytes)])
        order = list(range(pages))
        random.Random(seed).shuffle(order)
        entries = [MemEntry(base + p * PAGE, PAGE) for p in order]
        last = nbytes - (pages - 1) * PAGE
        entries[-1] = MemEntry(entries[-1].addr, last)
        return Backing(entries)

    def write_backing(self, backing: Backing, data, offset: int = 0) -> None:
        """Write bytes at `offset` of the backing as the guest sees it (its entries in order)."""
        view = memoryview(data).cast("B")
        lo, hi, base = offset, offset + len(view), 0
        for e in backing.entries:
            a, b = max(base, lo), min(base + e.length, hi)
            if a < b:
                self.fe.ram.write(e.addr + a - base, view[a - lo:b - lo])
            base += e.length

    # -- benchmark ---------------------------------------------------------------------
    def _random_frame(self, width: int, height: int, seed: int) -> Backing:
        """Scattered pages holding a width x height frame of random pixels."""
        backing = self.alloc_backing(width * height * 4, seed=seed)
        self.write_backing(backing, np.random.default_rng(seed).integers(
            0, 256, width * height * 4, dtype=np.uint8))
        return backing

    @staticmethod
    def _expect_ok(steps) -> None:
        for what, status in steps:
            if status != T.RESP_OK_NODATA:
                raise GpuDriverError(f"{what}: {T(status).name}")

    def setup_frame(self, resource_id: int, width: int, height: int, *, scanout: int = 0,
                    seed: int = 1) -> Backing:
        """A scanout-sized resource on scattered pages, filled and shown (bench set-up)."""
        self._expect_ok([(f"create {width}x{height}", self.create_2d(resource_id, width, height))])
        backing = self._random_frame(width, height, seed)
        self._expect_ok([("attach", self.attach_backing(resource_id, backing)),
                         ("scanout", self.set_scanout(scanout, resource_id,
                                                      Rect(0, 0, width, height)))])
        return backing

    def setup_blob_frame(self, resource_id: int, width: int, height: int, *, scanout: int = 0,
                         seed: int = 1) -> Backing:
        """A scanout-sized guest blob on scattered pages, filled and shown with
        SET_SCANOUT_BLOB, as Linux's virtio-gpu shows a dumb buffer (bench set-up).
        Needs a driver connected with BLOB_FEATURES."""
        backing = self._random_frame(width, height, seed)
        self._expect_ok([(f"create blob {width}x{height}", self.create_blob(resource_id, backing)),
                         (f"scanout blob {width}x{height}",
                          self.set_scanout_blob(scanout, resource_id, width, height))])
        return backing

    def _cycles(self, commands: list[bytes], cycles: int) -> int:
        """Submit `commands` together `cycles` times; the responses that were not OK."""
        return sum(CtrlHeader.unpack(resp).type != T.RESP_OK_NODATA
                   for _ in range(cycles) for resp in self.submit(commands))

    def flush_cycles(self, resource_id: int, width: int, height: int, cycles: int) -> int:
        """`cycles` full-frame RESOURCE_FLUSHes alone (what a blob scanout needs); errors."""
        return self._cycles([ResourceFlush(Rect(0, 0, width, height), resource_id).pack()], cycles)

    def frame_cycles(self, resource_id: int, width: int, height: int, cycles: int) -> int:
        """`cycles` full-frame TRANSFER_TO_HOST_2D + RESOURCE_FLUSH pairs; returns errors."""
        r = Rect(0, 0, width, height)
        return self._cycles([TransferToHost2d(r, 0, resource_id).pack(),
                             ResourceFlush(r, resource_id).pack()], cycles)

    def close(self) -> None:
        self.fe.close()
        if self.listener is not None:
            self.listener.close()
