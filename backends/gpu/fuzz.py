"""Fuzz target `gpu-commands`: virtio-gpu command parsing and GpuDevice's 2D handling.

Each input is a sequence of control and cursor commands run through a
headless `GpuDevice` (no display socket) over fuzz guest RAM: mostly
well-formed commands of every type with fuzzed fields (resource ids from a
small set so that create/attach/transfer/flush/unref meet), sometimes raw
bytes of any length. Backing entries point anywhere, also outside RAM.
Guest blobs (CREATE_BLOB of every blob_mem, SET_SCANOUT_BLOB with fuzzed
strides, offsets and formats, ASSIGN_UUID) share the resource ids.

Invariants: `execute` returns a response and raises nothing; the response
starts with a header echoing the command's fence and whose type is a
response (>= 0x1100), or is a bare error header for a short command; the
resources never use more host memory than allowed; the device never writes
guest memory (the control queue handler writes responses itself);
`parse` and `parse_cursor` only raise BadCommand.
"""
from __future__ import annotations

import struct
from collections.abc import Callable

from vhost_user.backends.gpu.commands import (
    BadCommand,
    CtrlHeader,
    CtrlType as T,
    CURSOR_CMD_SIZE,
    HDR_SIZE,
    parse,
    parse_cursor,
)
from vhost_user.backends.gpu.device import GpuDevice, GpuOptions

from vhost_user.fuzzing.guestram import FuzzRam
from vhost_user.fuzzing.reader import ByteReader

__all__ = ["control_round", "run_one", "seeds"]

_MAX_HOSTMEM = 1 << 20
_COMMANDS = [T.CMD_GET_DISPLAY_INFO, T.CMD_GET_EDID, T.CMD_RESOURCE_CREATE_2D, T.CMD_RESOURCE_UNREF,
             T.CMD_SET_SCANOUT, T.CMD_RESOURCE_FLUSH, T.CMD_TRANSFER_TO_HOST_2D,
             T.CMD_RESOURCE_ATTACH_BACKING, T.CMD_RESOURCE_DETACH_BACKING, T.CMD_GET_CAPSET_INFO,
             T.CMD_GET_CAPSET, T.CMD_RESOURCE_CREATE_BLOB, T.CMD_SET_SCANOUT_BLOB,
             T.CMD_RESOURCE_ASSIGN_UUID, T.CMD_UPDATE_CURSOR, T.CMD_MOVE_CURSOR]
_RESP_MIN = 0x1100
_RESP_ERR_MIN = 0x1200
_RAM: FuzzRam | None = None


def _small(r: ByteReader) -> int:
    """Mostly small values, sometimes anything (u32)."""
    return r.u8() % 70 if r.u8() % 4 else r.u32()


def _gpa(r: ByteReader) -> int:
    return (r.pick((0, 0x100, 0x8000, 0xFFF0, 0x10000, 0x20000, 0x2F000, 1 << 40, (1 << 64) - 8)) + r.u8()) & ((1 << 64) - 1)


def _entries(r: ByteReader, n: int, pages: bool = False) -> bytes:
    """Up to n (at most 6) mem entries anywhere, some outside RAM; `pages`: mostly whole pages."""
    def length() -> int:
        if pages and r.flag():
            return 0x1000 * (1 + r.u8() % 4)
        return r.u16() * (1 + r.u8() % 3)
    return b"".join(struct.pack("<QI4x", _gpa(r), length())
                    for _ in range(min(n, 6) if r.flag() else min(n, 3)))


def _command(r: ByteReader) -> bytes:
    """One control or cursor command: a header plus a body of 4-byte fields."""
    if r.u8() % 8 == 0:
        return r.take(r.u8())  # raw bytes, any length
    ctype = r.pick(_COMMANDS)
    hdr = CtrlHeader(ctype, r.u8() & 3, r.u64() if r.flag() else 0, 0, 0).pack()
    rid = r.u8() % 4 if r.u8() % 8 else r.u32()
    if ctype == T.CMD_RESOURCE_CREATE_2D:
        body = struct.pack("<IIII", rid, r.pick((1, 2, 3, 4, 67, 68, 121, 134, 0, 999)), _small(r), _small(r))
    elif ctype == T.CMD_RESOURCE_ATTACH_BACKING:
        n = r.u8() % 4 if r.u8() % 8 else r.u32()
        body = struct.pack("<II", rid, n) + _entries(r, n)
    elif ctype == T.CMD_RESOURCE_CREATE_BLOB:
        n = r.u8() % 4 if r.u8() % 8 else r.u32()
        entries = _entries(r, n, pages=True)
        size = (r.pick((0x1000, 0x2000, 0x10000, 0x20000, 1 << 32, (1 << 64) - 1)) + (r.u8() % 3) * 0x400) & ((1 << 64) - 1)
        body = struct.pack("<IIIIQQ", rid, r.pick((1, 1, 1, 2, 3, 0, 9)), r.u8() % 8, n, 0, size) + entries
    elif ctype == T.CMD_SET_SCANOUT_BLOB:
        rect = struct.pack("<IIII", _small(r), _small(r), _small(r), _small(r))
        w, h = _small(r), _small(r)
        stride = r.pick((w * 4, w * 4 + 64, 0, 0xFFFFFFFF, r.u32()))
        body = rect + struct.pack("<IIIIII", r.u8() % 18, rid, w, h,
                                  r.pick((1, 2, 3, 4, 67, 68, 121, 134, 0, 999)), 0)
        body += struct.pack("<4I", stride & 0xFFFFFFFF, 0, 0, 0)
        body += struct.pack("<4I", r.pick((0, 0, 64, 0x1000, 0xFFFFFFFF)), 0, 0, 0)
    elif ctype in (T.CMD_SET_SCANOUT, T.CMD_RESOURCE_FLUSH, T.CMD_TRANSFER_TO_HOST_2D):
        rect = struct.pack("<IIII", _small(r), _small(r), _small(r), _small(r))
        if ctype == T.CMD_SET_SCANOUT:
            body = rect + struct.pack("<II", r.u8() % 18, rid)
        elif ctype == T.CMD_RESOURCE_FLUSH:
            body = rect + struct.pack("<II", rid, 0)
        else:
            body = rect + struct.pack("<QII", r.u16() if r.flag() else r.u64(), rid, 0)
    elif ctype in (T.CMD_UPDATE_CURSOR, T.CMD_MOVE_CURSOR):
        body = struct.pack("<IIIIIIII", r.u8() % 18, _small(r), _small(r), 0, rid, r.u8() % 70,
                           r.u8() % 70, 0)
    else:
        body = struct.pack("<II", rid if r.flag() else r.u8() % 18, 0)
    cut = r.u8()
    data = hdr + body
    if cut < 16:  # short or long by a few bytes
        data = data[:max(0, len(data) - cut)] if cut < 8 else data + bytes(cut)
    return data


def run_one(data: bytes) -> None:
    global _RAM
    if _RAM is None:
        _RAM = FuzzRam()
    ram = _RAM
    ram.reset()
    r = ByteReader(data)
    for _ in range(r.u8() % 16):  # some pixel data for transfers to find
        ram.write(r.pick((0, 0x1000, 0x20000)), r.take(r.u8()))
    before = ram.snapshot()
    memory = ram.memory()
    dev = GpuDevice(GpuOptions(max_hostmem=_MAX_HOSTMEM))
    try:
        for _ in range(1 + r.u8() % 24):
            if not r.remaining:
                break
            cmd = _command(r)
            if r.u8() % 6 == 0:
                _cursor(dev, cmd)
            else:
                control_round(dev, cmd, memory)
            assert dev.resources.hostmem <= _MAX_HOSTMEM, f"hostmem {dev.resources.hostmem} over the limit"
        ram.check_writes(before, [])
    finally:
        dev.close()
        memory.close()


def control_round(dev: GpuDevice, cmd: bytes, memory, parse_check: Callable[[bytes], object] = parse) -> bool:
    """Run one control command through ``dev.execute`` and check the answer.

    Shared by the gpu-commands and gpu-3d targets: ``parse_check(cmd)`` may
    raise only BadCommand; the response is at least a header, of a response
    type, and echoes a fenced command's fence flag and id. Returns True if the
    command succeeded (an OK_* response).
    """
    try:
        parse_check(cmd)
    except BadCommand:
        pass
    response = dev.execute(cmd, memory)
    assert isinstance(response, bytes) and len(response) >= HDR_SIZE, response
    rhdr = CtrlHeader.unpack(response)
    assert rhdr.type >= _RESP_MIN, f"response type {rhdr.type:#x} is not a response"
    if len(cmd) < HDR_SIZE:
        return False
    hdr = CtrlHeader.unpack(cmd)
    if hdr.flags & 1:
        assert rhdr.flags & 1 and rhdr.fence_id == hdr.fence_id, f"fence {hdr.fence_id} not echoed"
    return rhdr.type < _RESP_ERR_MIN


def _cursor(dev: GpuDevice, cmd: bytes) -> None:
    try:
        parsed = parse_cursor(cmd[:CURSOR_CMD_SIZE])
    except BadCommand:
        return
    dev.cursor_command(parsed)


def seeds() -> list[bytes]:
    create = bytes([8, 1, 0, 2, 0, 1, 1, 0, 0, 7, 1, 0, 0, 7, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    return [b"", b"\0\x05" + bytes(64), create, create + bytes(range(256)), bytes(range(255, 0, -1)) * 3]

