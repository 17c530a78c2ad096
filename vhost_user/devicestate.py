"""Device state transfer: SET_DEVICE_STATE_FD and CHECK_DEVICE_STATE.

Theory of operation
-------------------
With VHOST_USER_PROTOCOL_F_DEVICE_STATE a front-end (crosvm's snapshot and
restore; QEMU 10 only for vhost-user-fs) moves the device's internal state
through a pipe while every queue is stopped (phase STOPPED). SAVE: the
front-end passes the write end, the back-end writes the state and closes it,
the front-end reads to EOF. LOAD: the front-end passes the read end, writes
the state and closes its end; the back-end reads to EOF and applies it. Then
CHECK_DEVICE_STATE asks whether that worked.

The copy runs in a thread of its own, so the control loop keeps answering
while a slow front-end drains the pipe; CHECK waits for it (bounded). What a
device carries is its own business (`VirtioDevice.save_state` /
`load_state`); here it is framed so a state never loads into another kind of
device, another version, or after damage in transit:

    b"VHUSTATE" | u16 version | u16 len(device type) | device type
    | u64 len(payload) | payload | u32 crc32 of everything before
"""

from __future__ import annotations

import logging
import os
import stat
import struct
import threading
import zlib

from vhost_user.errors import RemoteProtocolError

__all__ = ["StateTransfer", "pack_state", "unpack_state", "SAVE", "LOAD", "STOPPED", "MAX_STATE"]

log = logging.getLogger(__name__)

SAVE, LOAD = 0, 1          # VhostDeviceStateDirection
STOPPED = 0                # VhostDeviceStatePhase
MAGIC = b"VHUSTATE"
VERSION = 1
MAX_STATE = 1 << 30        # a LOAD larger than this is refused, not buffered
CHECK_TIMEOUT = 30.0
_HEAD = struct.Struct("<8sHH")
_LEN = struct.Struct("<Q")
_CRC = struct.Struct("<I")


def pack_state(device_type: str, payload: bytes) -> bytes:
    """The framed state of a `device_type` device."""
    name = device_type.encode()
    body = _HEAD.pack(MAGIC, VERSION, len(name)) + name + _LEN.pack(len(payload)) + payload
    return body + _CRC.pack(zlib.crc32(body))


def unpack_state(device_type: str, data: bytes) -> bytes:
    """The payload of a framed state; ValueError says what is wrong with it."""
    if len(data) < _HEAD.size + _LEN.size + _CRC.size:
        raise ValueError(f"state of {len(data)} bytes is too short")
    body, (crc,) = data[:-_CRC.size], _CRC.unpack(data[-_CRC.size:])
    if zlib.crc32(body) != crc:
        raise ValueError("state checksum mismatch (damaged in transit)")
    magic, version, nlen = _HEAD.unpack_from(body)
    if magic != MAGIC:
        raise ValueError("not a device state of ours")
    if version != VERSION:
        raise ValueError(f"state version {version}, this back-end reads {VERSION}")
    name = body[_HEAD.size:_HEAD.size + nlen].decode(errors="replace")
    if name != device_type:
        raise ValueError(f"state of a {name!r} device, this is {device_type!r}")
    (plen,) = _LEN.unpack_from(body, _HEAD.size + nlen)
    payload = body[_HEAD.size + nlen + _LEN.size:]
    if len(payload) != plen:
        raise ValueError(f"state payload is {len(payload)} bytes, header says {plen}")
    return payload


class StateTransfer:
    """One SAVE or LOAD through a pipe (or socket) fd, in its own thread."""

    def __init__(self, device, direction: int, fd: int) -> None:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
            os.close(fd)
            raise RemoteProtocolError("device-state fd is not a pipe or socket", recoverable=True)
        os.set_blocking(fd, True)
        self.device = device
        self.direction = direction
        self.error: str | None = None
        self._fd = fd
        target = self._save if direction == SAVE else self._load
        self._thread = threading.Thread(target=self._run, args=(target,),
                                        name=f"device-state-{'save' if direction == SAVE else 'load'}",
                                        daemon=True)
        self._thread.start()

    def _run(self, target) -> None:
        try:
            target()
        except (OSError, ValueError) as exc:
            self.error = str(exc)
        except Exception as exc:  # a device hook failed: report, never crash the loop
            log.exception("device state transfer failed")
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            os.close(self._fd)
        if self.error:
            log.warning("device state %s failed: %s", "save" if self.direction == SAVE else "load",
                        self.error)

    def _save(self) -> None:
        data = memoryview(pack_state(self.device.device_type, self.device.save_state()))
        while data:
            n = os.write(self._fd, data)
            data = data[n:]
        log.info("device state saved (%d bytes)", len(data.obj))

    def _load(self) -> None:
        chunks, total = [], 0
        while True:
            chunk = os.read(self._fd, 1 << 20)
            if not chunk:
                break
            total += len(chunk)
            if total > MAX_STATE:
                raise ValueError(f"state larger than {MAX_STATE} bytes")
            chunks.append(chunk)
        self.device.load_state(unpack_state(self.device.device_type, b"".join(chunks)))
        log.info("device state loaded (%d bytes)", total)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def check(self, timeout: float = CHECK_TIMEOUT) -> bool:
        """CHECK_DEVICE_STATE: wait for the copy; True if it succeeded."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.error = "the transfer did not finish (front-end kept its end open)"
            return False
        return self.error is None
