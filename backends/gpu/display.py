"""Where flushed scanouts go: QEMU's display socket, PNG files, or nowhere.

`SocketDisplay` is the back-end side of the vhost-user-gpu display protocol
on the fd that GPU_SET_SOCKET passed. The handshake (GET/SET_PROTOCOL_FEATURES)
runs lazily from the control queue's worker, never from the vhost-user
session thread: QEMU answers display messages from its main loop, which is
busy sending us vhost-user requests right after GPU_SET_SOCKET. Requests
that expect a reply are sent and answered under one lock; the cursor
queue's messages share the lock so messages never interleave. A peer that
goes away or breaks the protocol turns the display off (one log line); the
device keeps serving the guest.

`PngDisplay` (--display png:DIR) keeps each scanout's image and writes it as
DIR/scanout-N.png after every update, for crosvm (which sends no display
socket) and for debugging.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
import zlib

import numpy as np

from .commands import MAX_SCANOUTS, DisplayOne, Rect, RespDisplayInfo, RespEdid
from .display_protocol import (
    FLAG_REPLY,
    HEADER,
    CursorPosMsg,
    CursorUpdateMsg,
    GpuProtocolFeature,
    GpuRequest,
    ScanoutMsg,
    UpdateMsg,
    pack_message,
)
from .edid import build_edid

__all__ = ["Display", "SocketDisplay", "PngDisplay", "NullDisplay", "encode_png", "default_modes"]

log = logging.getLogger(__name__)

_REPLY_TIMEOUT = 5.0
#: display protocol features we use (no dmabuf without 3D)
WANTED_FEATURES = 1 << GpuProtocolFeature.EDID


def default_modes(outputs: int, width: int, height: int) -> RespDisplayInfo:
    """Output 0 enabled at width x height, like QEMU's default; the others off."""
    modes = [DisplayOne(Rect(0, 0, width, height), 1, 0)]
    modes += [DisplayOne(Rect(0, 0, width, height), 0, 0) for _ in range(1, outputs)]
    return RespDisplayInfo(tuple(modes))


class Display:
    """Interface; the default answers come from the device's own modes."""

    def __init__(self, modes: RespDisplayInfo):
        self.modes = modes

    def display_info(self) -> RespDisplayInfo:
        return self.modes

    def edid(self, scanout: int) -> bytes | None:
        mode = self.modes.pmodes[scanout] if scanout < len(self.modes.pmodes) else None
        if mode is None or mode.r.width == 0:
            return None
        return build_edid(mode.r.width, mode.r.height, serial=scanout)

    def scanout(self, msg: ScanoutMsg) -> None:
        pass

    def update(self, msg: UpdateMsg, pixels: np.ndarray) -> None:
        pass

    def cursor_update(self, msg: CursorUpdateMsg) -> None:
        pass

    def cursor_pos(self, msg: CursorPosMsg, visible: bool) -> None:
        pass

    def close(self) -> None:
        pass


class NullDisplay(Display):
    """No display at all: commands succeed, pixels go nowhere."""


class DisplayGone(Exception):
    """The peer closed the socket or broke the protocol: the display is off."""


class NoReply(Exception):
    """The peer sent nothing back in time (QEMU ignores GET_EDID for unknown outputs)."""


class SocketDisplay(Display):
    """QEMU's display, over the socket GPU_SET_SOCKET passed (owned from here on)."""

    def __init__(self, fd: int, modes: RespDisplayInfo):
        super().__init__(modes)
        self.sock = socket.socket(fileno=fd)
        self.sock.settimeout(_REPLY_TIMEOUT)
        self._lock = threading.Lock()
        self._features: int | None = None
        self.alive = True
        #: the SIGUSR1 counters: a dead display drops what the guest shows, never the guest
        self.stats = {"display_failures": 0, "display_messages_dropped": 0}

    # -- plumbing --------------------------------------------------------------
    def _fail(self, why: str) -> None:
        """The display is off from here on. The socket is shut down at once, so the
        peer sees an end of stream rather than the start of a message cut short."""
        if self.alive:
            log.warning("display socket: %s; display disabled (later updates counted in "
                        "display_messages_dropped)", why)
            self.stats["display_failures"] += 1
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.alive = False

    def _send(self, request: int, payload: bytes = b"", pixels=None) -> None:
        extra = pixels.nbytes if pixels is not None else 0
        self.sock.sendall(pack_message(request, payload, size=len(payload) + extra))
        if pixels is not None:
            self.sock.sendall(memoryview(pixels).cast("B"))

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise DisplayGone("peer closed the display socket")
            buf += chunk
        return bytes(buf)

    def _reply(self, request: int, size: int) -> bytes:
        """Read the reply to `request`; skip stray replies to other requests."""
        for _ in range(8):
            try:
                first = self.sock.recv(HEADER.size)
            except TimeoutError:
                raise NoReply(f"no reply to display request {request}") from None
            if not first:
                raise DisplayGone("peer closed the display socket")
            req, flags, n = HEADER.unpack(first + self._recv_exact(HEADER.size - len(first)))
            if n > 1 << 20:
                raise DisplayGone(f"reply announces {n} bytes")
            payload = self._recv_exact(n)
            if req == request and flags & FLAG_REPLY and n == size:
                return payload
            log.info("display socket: skipping message %d (%d bytes)", req, n)
        raise DisplayGone(f"no reply to request {request}")

    def _call(self, request: int, payload: bytes, reply_size: int) -> bytes | None:
        with self._lock:
            if not self.alive:
                self.stats["display_messages_dropped"] += 1
                return None
            try:
                self._handshake()
                self._send(request, payload)
                return self._reply(request, reply_size)
            except NoReply as exc:
                log.warning("display socket: %s", exc)
                return None
            except (OSError, DisplayGone) as exc:
                self._fail(str(exc) or type(exc).__name__)
                return None

    def _post(self, request: int, payload: bytes, pixels=None) -> None:
        with self._lock:
            if not self.alive:
                self.stats["display_messages_dropped"] += 1
                return
            try:
                self._handshake()
                self._send(request, payload, pixels)
            except (OSError, DisplayGone) as exc:
                self._fail(str(exc) or type(exc).__name__)

    def _handshake(self) -> None:
        if self._features is not None:
            return
        self._send(GpuRequest.GET_PROTOCOL_FEATURES)
        (offered,) = struct.unpack("<Q", self._reply(GpuRequest.GET_PROTOCOL_FEATURES, 8))
        self._features = offered & WANTED_FEATURES
        self._send(GpuRequest.SET_PROTOCOL_FEATURES, struct.pack("<Q", self._features))
        log.info("display protocol features %#x (offered %#x)", self._features, offered)

    # -- Display ---------------------------------------------------------------------
    def display_info(self) -> RespDisplayInfo:
        data = self._call(GpuRequest.GET_DISPLAY_INFO, b"", RespDisplayInfo.SIZE)
        if data is None:
            return self.modes
        info = RespDisplayInfo.unpack(data)
        self.modes = info
        return info

    def edid(self, scanout: int) -> bytes | None:
        with self._lock:
            try:
                if self.alive:
                    self._handshake()
            except (OSError, DisplayGone) as exc:
                self._fail(str(exc))
        if not self.alive or not (self._features or 0) & (1 << GpuProtocolFeature.EDID):
            return super().edid(scanout)
        data = self._call(GpuRequest.GET_EDID, struct.pack("<I", scanout), RespEdid.SIZE)
        if data is None:
            return None
        return RespEdid.unpack(data).edid

    def scanout(self, msg: ScanoutMsg) -> None:
        self._post(GpuRequest.SCANOUT, msg.pack())

    def update(self, msg: UpdateMsg, pixels: np.ndarray) -> None:
        self._post(GpuRequest.UPDATE, msg.pack(), pixels)

    def cursor_update(self, msg: CursorUpdateMsg) -> None:
        self._post(GpuRequest.CURSOR_UPDATE, msg.pack())

    def cursor_pos(self, msg: CursorPosMsg, visible: bool) -> None:
        self._post(GpuRequest.CURSOR_POS if visible else GpuRequest.CURSOR_POS_HIDE, msg.pack())

    def close(self) -> None:
        with self._lock:
            self.alive = False
            self.sock.close()


def encode_png(rgb: np.ndarray) -> bytes:
    """A PNG (8-bit RGB, no interlace) of an (h, w, 3) uint8 array."""
    h, w, _ = rgb.shape
    raw = np.zeros((h, 1 + w * 3), dtype=np.uint8)
    raw[:, 1:] = rgb.reshape(h, w * 3)

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw.tobytes(), 1)) + chunk(b"IEND", b""))


class PngDisplay(Display):
    """Headless: keep each scanout and write DIR/scanout-N.png after each update."""

    def __init__(self, directory: str, modes: RespDisplayInfo):
        super().__init__(modes)
        os.makedirs(directory, exist_ok=True)
        self.directory = directory
        # Files are created relative to this fd, opened now: the sandbox allows
        # writing opens under this directory fd only (vhost_user.sandbox).
        self.dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.images: dict[int, np.ndarray] = {}
        self.cursor: CursorUpdateMsg | None = None
        self._lock = threading.Lock()

    def path(self, scanout: int) -> str:
        return os.path.join(self.directory, self._name(scanout))

    @staticmethod
    def _name(scanout: int) -> str:
        return f"scanout-{scanout}.png"

    def scanout(self, msg: ScanoutMsg) -> None:
        if msg.scanout_id >= MAX_SCANOUTS:
            return
        with self._lock:
            if msg.width == 0 or msg.height == 0:
                self.images.pop(msg.scanout_id, None)
                try:
                    os.unlink(self._name(msg.scanout_id), dir_fd=self.dir_fd)
                except FileNotFoundError:
                    pass
                return
            self.images[msg.scanout_id] = np.zeros((msg.height, msg.width, 4), dtype=np.uint8)

    def update(self, msg: UpdateMsg, pixels: np.ndarray) -> None:
        with self._lock:
            img = self.images.get(msg.scanout_id)
            if img is None:
                return
            h, w = img.shape[:2]
            x1, y1 = min(msg.x + msg.width, w), min(msg.y + msg.height, h)
            if x1 <= msg.x or y1 <= msg.y:
                return
            px = pixels.reshape(msg.height, msg.width, 4)
            img[msg.y:y1, msg.x:x1] = px[:y1 - msg.y, :x1 - msg.x]
            rgb = img[:, :, [2, 1, 0]]
            name = self._name(msg.scanout_id)
            tmp = name + ".tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644, dir_fd=self.dir_fd)
            with open(fd, "wb") as f:
                f.write(encode_png(rgb))
            os.replace(tmp, name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)

    def cursor_update(self, msg: CursorUpdateMsg) -> None:
        self.cursor = msg
