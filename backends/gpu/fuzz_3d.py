"""Fuzz target `gpu-3d`: the virgl device's 3D path (contexts, 3D resources, SUBMIT_3D) over virglrenderer.

Each input is a sequence of up to 24 control commands (and a few cursor
commands) run through one `VirglGpuDevice` on Mesa's surfaceless EGL
(llvmpipe) over fuzz guest RAM: CTX_CREATE/DESTROY, CTX_ATTACH/DETACH,
RESOURCE_CREATE_3D of every target, format and bind with sizes from 0 to
2^32-1, ATTACH_BACKING anywhere (also outside RAM), TRANSFER_TO/FROM_HOST_3D
with any box, level, stride and offset (also past the backing), SUBMIT_3D
with virgl command streams (mostly commands of virgl_protocol.h with
plausible lengths and handles, TGSI shader text, sometimes raw dwords),
GET_CAPSET for virgl/virgl2, CTX_CREATE with any context_init (with
CONTEXT_INIT acked on inputs of odd length, without on even ones),
RESOURCE_ASSIGN_UUID, UNREF, the 2D commands the virgl device
answers too (create, scanout, flush read-back), fences on any of them.
Resource and context ids come from a small set so that commands meet, and
three inputs in four start with a prelude (context 1 with one or two
resources backed in RAM and attached to it) so that fuzzed transfers and
streams find the state a driver would have set up.

Invariants, checked per command: `execute` raises nothing and answers with
a response type (>= 0x1100) that echoes a fenced command's fence id and
flag; `cursor_command` raises nothing; the guest bytes that change are only
those of the backing of the resource a TRANSFER_FROM_HOST_3D names, or for
SUBMIT_3D of the resources attached to the submitting context (guard pages
included, everything else must stay byte for byte); the device's resources
stay under its host-memory limit, and the process's RSS under 1 GiB (the
device's count is only an estimate of what virglrenderer allocates). A crash inside virglrenderer kills the
process, which libFuzzer reports as a finding with its input.

The renderer costs ~100 ms to start, so one device serves the whole process:
after each input `VirglGpuDevice.reset()` unrefs every resource and destroys
every context the input left (and the target checks that it did). What
carries over between inputs: virglrenderer's global state (context 0, its
format and capset tables, the GL objects of context 0), the highest fence
id signalled so far (a later, lower fence returns at once, as in a guest
after wrap-around), the EDID/display state of the device, and Mesa's
in-process caches. Mesa's on-disk shader cache is turned off
(MESA_SHADER_CACHE_DISABLE) so a run writes nothing to $HOME and inputs do
not depend on earlier runs.
"""
from __future__ import annotations

import os
import struct

from vhost_user.backends.gpu.commands import CtrlHeader, CtrlType as T, HDR_SIZE, BadCommand, parse_cursor
from vhost_user.backends.gpu.commands3d import PARSERS_3D
from vhost_user.backends.gpu.fuzz import control_round

from vhost_user.fuzzing.guestram import FuzzRam
from vhost_user.fuzzing.reader import ByteReader

__all__ = ["run_one", "seeds", "shared_device", "unavailable_reason"]

_MAX_HOSTMEM = 16 << 20
_RSS_LIMIT = 1 << 30  # libFuzzer's -rss_limit_mb under atheris; checked here for the mutation loop
_U32 = 0xFFFFFFFF

# virgl_hw.h: targets (pipe_texture_target), a spread of formats, bind flags
_TARGETS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 2, 2, 0)
_FORMATS = (1, 2, 3, 4, 16, 18, 19, 21, 23, 24, 27, 28, 31, 64, 65, 67, 68, 99, 121, 134, 149, 153, 160,
            178, 190, 0)
_BINDS = (1 << 0, 1 << 1, 1 << 3, (1 << 1) | (1 << 3), 1 << 4, 1 << 5, 1 << 6, 1 << 7, 1 << 8, 1 << 11,
          1 << 14, 1 << 15, 1 << 16, 1 << 17, 1 << 18, 1 << 19, 0)
_SIZES = (0, 1, 2, 3, 4, 7, 16, 32, 64, 100, 256, 1024, 2048, 4096, 16384, 16385, 65536, 1 << 31, _U32)

# virgl_protocol.h: (VIRGL_CCMD_*, object type, payload dwords), payload -1 = variable
_CCMD = (
    (1, 1, 11), (1, 2, 9), (1, 3, 5), (1, 4, -1), (1, 5, -1), (1, 6, 6), (1, 7, 9), (1, 8, 5),
    (1, 9, 4), (1, 10, 4), (1, 11, 6),                          # CREATE_OBJECT per object type
    (2, 1, 1), (2, 2, 1), (2, 3, 1), (2, 5, 1),                 # BIND_OBJECT
    (3, 1, 1), (3, 4, 1), (3, 6, 1), (3, 8, 1), (3, 9, 1),      # DESTROY_OBJECT
    (4, 0, 7), (5, 0, -1), (6, 0, -1), (7, 0, 8), (8, 0, 12), (8, 0, 14), (8, 0, 20),
    (9, 0, -1), (10, 0, -1), (11, 0, 3), (12, 0, -1), (13, 0, 1), (14, 0, 4), (15, 0, 3),
    (16, 0, 21), (17, 0, 13), (18, 0, -1), (19, 0, 1), (20, 0, 1), (21, 0, 2), (22, 0, 32),
    (23, 0, 32), (24, 0, 1), (25, 0, -1), (26, 0, 3), (27, 0, 5), (28, 0, 1), (29, 0, 1),
    (30, 0, 1), (31, 0, 2), (32, 0, 6), (33, 0, 1), (34, 0, -1), (35, 0, -1), (36, 0, 1),
    (37, 0, 8), (38, 0, 2), (39, 0, 1), (40, 0, -1), (41, 0, -1), (42, 0, 6), (43, 0, 13),
    (44, 0, 0), (45, 0, 14), (46, 0, 2), (47, 0, 12), (48, 0, 11), (49, 0, -1), (50, 0, 1),
    (51, 0, -1), (52, 0, 6), (62, 0, 10), (63, 0, 1), (0, 0, 0),
)
_SHADERS = (
    b"VERT\nDCL IN[0]\nDCL OUT[0], POSITION\n  0: MOV OUT[0], IN[0]\n  1: END\n",
    b"FRAG\nDCL OUT[0], COLOR\nIMM[0] FLT32 { 1.0000, 0.0000, 0.0000, 1.0000}\n  0: MOV OUT[0], IMM[0]\n  1: END\n",
    b"FRAG\nPROPERTY FS_COLOR0_WRITES_ALL_CBUFS 1\nDCL IN[0], GENERIC[0], PERSPECTIVE\nDCL OUT[0], COLOR\n"
    b"DCL SAMP[0]\nDCL SVIEW[0], 2D, FLOAT\nDCL TEMP[0]\n  0: TEX TEMP[0], IN[0], SAMP[0], 2D\n"
    b"  1: MOV OUT[0], TEMP[0]\n  2: END\n",
    b"COMP\nPROPERTY CS_FIXED_BLOCK_WIDTH 1\nDCL BUFFER[0]\nDCL TEMP[0]\nIMM[0] UINT32 {0, 0, 0, 0}\n"
    b"  0: STORE BUFFER[0].x, IMM[0].xxxx, IMM[0].xxxx\n  1: END\n",
    b"GEOM\nPROPERTY GS_INPUT_PRIMITIVE TRIANGLES\nPROPERTY GS_OUTPUT_PRIMITIVE TRIANGLE_STRIP\n"
    b"PROPERTY GS_MAX_OUTPUT_VERTICES 3\nDCL IN[][0], POSITION\nDCL OUT[0], POSITION\n"
    b"  0: MOV OUT[0], IN[0][0]\n  1: EMIT IMM[0].xxxx\n  2: END\n",
)
_TGSI_JUNK = (b"DCL TEMP[99999]\n", b"MOV OUT[7], IN[1234567]\n", b"IMM[0] FLT32 {nan, inf, -0, 1e40}\n",
              b"DCL IN[0..4294967295]\n", b"TEX TEMP[0], IN[0], SAMP[31], 3D\n", b"\0", b"{", b"END\n",
              b"DCL SVIEW[64], 2D, FLOAT\n", b"BGNLOOP\n", b"ENDSUB\n", b"PROPERTY NEXT_SHADER 7\n")
_RAM: FuzzRam | None = None
_DEV = None


def unavailable_reason() -> str | None:
    """None when virglrenderer and Mesa's surfaceless EGL work here, else why not."""
    from vhost_user.backends.gpu.virgl import virgl_unavailable_reason
    return virgl_unavailable_reason()


def shared_device():
    """The process's one VirglGpuDevice (max_hostmem 16 MiB) and its FuzzRam.

    virglrenderer is a process-wide singleton (a second virgl_renderer_init fails with
    EBUSY), so everything in one process that drives it in-process shares this device.
    """
    global _DEV, _RAM
    if _DEV is None:
        os.environ.setdefault("MESA_SHADER_CACHE_DISABLE", "true")
        from vhost_user.backends.gpu.device import GpuOptions
        from vhost_user.backends.gpu.device3d import VirglGpuDevice
        _DEV = VirglGpuDevice(GpuOptions(max_hostmem=_MAX_HOSTMEM))
        _RAM = FuzzRam()
    return _DEV, _RAM


# -- fuzz values ------------------------------------------------------------------------------
def _small(r: ByteReader) -> int:
    return r.u8() % 70 if r.u8() % 4 else r.u32()


def _size(r: ByteReader) -> int:
    return r.pick(_SIZES) if r.u8() % 4 else r.u32()


def _rid(r: ByteReader) -> int:
    return r.pick((1, 1, 1, 2, 2, 3, 4)) if r.u8() % 8 else r.u32()


def _ctx(r: ByteReader) -> int:
    return r.pick((0, 1, 1, 1, 2, 3)) if r.u8() % 8 else r.pick((0, 4, 63, 64, 65, 1 << 16, _U32, r.u32()))


def _gpa(r: ByteReader) -> int:
    base = r.pick((0, 0x100, 0x8000, 0xFFF0, 0x10000, 0x20000, 0x2F000, 1 << 40, (1 << 64) - 8))
    return (base + r.u8() * 16) & ((1 << 64) - 1)


# -- virgl command streams --------------------------------------------------------------------
def _shader(r: ByteReader) -> list[int]:
    """CREATE_OBJECT SHADER payload: handle, type, offset/length, tokens, so outputs, TGSI text."""
    text = bytearray(r.pick(_SHADERS))
    for _ in range(r.u8() % 4):
        pos = r.below(len(text) + 1)
        if r.flag():
            text[pos:pos] = r.pick(_TGSI_JUNK)
        else:
            del text[pos:pos + r.u8() % 16]
    text += b"\0" * (4 - len(text) % 4 if r.u8() % 8 else 0)
    length = len(text) if r.u8() % 8 else r.u32()
    words = list(struct.unpack(f"<{len(text) // 4}I", bytes(text[:len(text) // 4 * 4])))
    return [r.u8() % 8, r.u8() % 7 if r.u8() % 8 else r.u32(), length, 300 if r.u8() % 8 else r.u32(),
            0 if r.u8() % 8 else r.u8() % 5] + words


def _arg(r: ByteReader) -> int:
    """One payload dword: a handle, a small enum, a float, or anything."""
    k = r.u8() % 8
    if k < 3:
        return r.u8() % 6
    if k == 3:
        return r.pick((0x3F800000, 0xBF800000, 0x7FC00000, 0x7F800000, 0x80000000))
    if k == 4:
        return _size(r)
    return r.u32() if k == 5 else r.u8()


def _payload(r: ByteReader, cmd: int, obj: int, n: int) -> list[int]:
    if cmd == 1 and obj == 4:
        return _shader(r)
    if n < 0:
        n = {5: 2 + r.u8() % 9, 6: 3 * (r.u8() % 5), 10: 2 + r.u8() % 6, 18: 2 + r.u8() % 6,
             12: 2 + r.u8() % 8, 9: 11 + r.u8() % 16, 1: 1 + 4 * (r.u8() % 4)}.get(cmd, r.u8() % 24)
    return [_arg(r) for _ in range(n)]


def _stream(r: ByteReader) -> bytes:
    """A virgl command stream: mostly well-formed commands, lengths sometimes a lie."""
    if r.u8() % 10 == 0:
        return r.take(4 * (r.u8() % 64))  # raw dwords
    words: list[int] = []
    for _ in range(1 + r.u8() % 8):
        cmd, obj, n = r.pick(_CCMD)
        payload = _payload(r, cmd, obj, n)
        length = len(payload)
        if r.u8() % 10 == 0:
            length = r.pick((0, length + 1, max(0, length - 1), 0xFFFF, r.u16()))
        words.append(cmd | obj << 8 | (length & 0xFFFF) << 16)
        words += payload
    return struct.pack(f"<{len(words)}I", *words)


# -- control commands -------------------------------------------------------------------------
def _hdr(r: ByteReader, ctype: int, fence: int) -> bytes:
    flags = 1 if r.u8() % 4 == 0 else 0
    return CtrlHeader(ctype, flags, fence if r.u8() % 8 else r.u64(), _ctx(r), 0).pack()


def _create_3d(r: ByteReader) -> bytes:
    target = r.pick(_TARGETS) if r.u8() % 8 else r.u32()
    fmt = r.pick(_FORMATS) if r.u8() % 8 else r.u32()
    bind = r.pick(_BINDS) | (r.pick(_BINDS) if r.flag() else 0)
    w, h = (_size(r), _size(r)) if r.u8() % 3 == 0 else (1 + r.u8() % 64, 1 + r.u8() % 64)
    depth, array = (_size(r), _size(r)) if r.u8() % 4 == 0 else (1, 1 if r.u8() % 4 else 6)
    levels, samples = (r.u8() % 16, r.pick((0, 1, 2, 4, 8, 16, 32))) if r.u8() % 4 == 0 else (0, 0)
    flags = r.u32() if r.u8() % 8 == 0 else r.u8() % 2
    return struct.pack("<IIIIIIIIIII4x", _rid(r), target, fmt, bind, w, h, depth, array, levels,
                       samples, flags)


def _transfer_3d(r: ByteReader) -> bytes:
    if r.u8() % 2:  # inside a small resource, as a driver sends
        box = [r.u8() % 8, r.u8() % 8, 0, 1 + r.u8() % 8, 1 + r.u8() % 8, 1]
    else:
        box = [_small(r) if r.u8() % 4 else _size(r) for _ in range(6)]
        if r.u8() % 3:
            box[2], box[5] = 0, 1
    offset = r.u8() * 16 if r.u8() % 4 else r.pick((0x10000, 1 << 32, (1 << 64) - 1, r.u64()))
    level = 0 if r.u8() % 4 else r.pick((1, 2, 1 << 31, (1 << 31) - 1, _U32, 16, r.u32()))
    stride, layer = (0, 0) if r.u8() % 2 else (_size(r), _size(r))
    return struct.pack("<IIIIIIQIIII", *box, offset, _rid(r), level, stride, layer)


def _attach(r: ByteReader) -> bytes:
    n = r.u8() % 4 if r.u8() % 8 else r.u32()
    entries = b"".join(struct.pack("<QI4x", _gpa(r), r.u16() * (1 + r.u8() % 3)) for _ in range(min(n, 6)))
    return struct.pack("<II", _rid(r), n) + entries


def _body(r: ByteReader, ctype: int) -> bytes:
    if ctype == T.CMD_CTX_CREATE:
        name = r.take(r.u8() % 80)
        nlen = len(name) if r.u8() % 8 else r.u32()
        pick = r.u8()   # context_init: any u32, a small capset id (CONTEXT_INIT), or none
        init = r.u32() if pick % 8 == 0 else (pick >> 3) % 6 if pick % 8 == 1 else 0
        return struct.pack("<II", nlen, init) + name[:64].ljust(64, b"\0")
    if ctype in (T.CMD_CTX_ATTACH_RESOURCE, T.CMD_CTX_DETACH_RESOURCE, T.CMD_RESOURCE_UNREF,
                 T.CMD_RESOURCE_DETACH_BACKING):
        return struct.pack("<I4x", _rid(r))
    if ctype == T.CMD_RESOURCE_CREATE_3D:
        return _create_3d(r)
    if ctype == T.CMD_RESOURCE_CREATE_2D:
        return struct.pack("<IIII", _rid(r), r.pick((1, 2, 3, 4, 67, 68, 121, 134, 0)), _small(r), _small(r))
    if ctype in (T.CMD_TRANSFER_TO_HOST_3D, T.CMD_TRANSFER_FROM_HOST_3D):
        return _transfer_3d(r)
    if ctype == T.CMD_RESOURCE_ATTACH_BACKING:
        return _attach(r)
    if ctype == T.CMD_SUBMIT_3D:
        stream = _stream(r)
        size = len(stream) if r.u8() % 16 else r.pick((len(stream) + 4, len(stream) + 1, _U32))
        return struct.pack("<I4x", size) + stream
    if ctype == T.CMD_GET_CAPSET:
        return struct.pack("<II", r.pick((1, 2, 1, 2, 0, 3, 4, _U32)), r.pick((0, 1, 2, 1, 2, 3, _U32)))
    if ctype == T.CMD_GET_CAPSET_INFO:
        return struct.pack("<I4x", r.u8() % 4)
    if ctype == T.CMD_RESOURCE_ASSIGN_UUID:  # one byte, as GET_CAPSET_INFO whose slot it takes
        return struct.pack("<I4x", (1, 1, 2, 3, 4, 0, 7, _U32)[r.u8() % 8])
    rect = struct.pack("<IIII", _small(r), _small(r), _small(r), _small(r))
    if ctype == T.CMD_SET_SCANOUT:
        return rect + struct.pack("<II", r.u8() % 3, _rid(r))
    if ctype == T.CMD_RESOURCE_FLUSH:
        return rect + struct.pack("<II", _rid(r), 0)
    return rect + struct.pack("<QII", r.u16(), _rid(r), 0)  # TRANSFER_TO_HOST_2D


_COMMANDS = (T.CMD_CTX_CREATE, T.CMD_CTX_CREATE, T.CMD_CTX_DESTROY, T.CMD_CTX_ATTACH_RESOURCE,
             T.CMD_CTX_ATTACH_RESOURCE, T.CMD_CTX_DETACH_RESOURCE, T.CMD_RESOURCE_CREATE_3D,
             T.CMD_RESOURCE_CREATE_3D, T.CMD_RESOURCE_ATTACH_BACKING, T.CMD_RESOURCE_DETACH_BACKING,
             T.CMD_TRANSFER_TO_HOST_3D, T.CMD_TRANSFER_TO_HOST_3D, T.CMD_TRANSFER_FROM_HOST_3D,
             T.CMD_TRANSFER_FROM_HOST_3D,
             T.CMD_SUBMIT_3D, T.CMD_SUBMIT_3D, T.CMD_SUBMIT_3D, T.CMD_GET_CAPSET, T.CMD_GET_CAPSET_INFO,
             T.CMD_RESOURCE_UNREF, T.CMD_RESOURCE_CREATE_2D, T.CMD_SET_SCANOUT, T.CMD_RESOURCE_FLUSH,
             T.CMD_TRANSFER_TO_HOST_2D)


def _command(r: ByteReader, fence: int) -> bytes:
    if r.u8() % 16 == 0:
        return r.take(r.u8())  # raw bytes, any length
    ctype = r.pick(_COMMANDS)
    if ctype == T.CMD_GET_CAPSET_INFO and fence % 3 == 0:
        ctype = T.CMD_RESOURCE_ASSIGN_UUID  # a slot of its own would re-map every committed input
    data = _hdr(r, ctype, fence) + _body(r, ctype)
    cut = r.u8()
    if cut < 8:  # short or long by a few bytes
        data = data[:max(0, len(data) - cut)] if cut < 4 else data + bytes(cut)
    return data


# (target, format, bind, width, height, depth, last_level): resources a guest driver makes
_PLAUSIBLE = ((2, 2, (1 << 1) | (1 << 3), 16, 16, 1, 0), (0, 64, 1 << 4, 4096, 1, 1, 0),
              (3, 67, 1 << 3, 8, 8, 4, 0), (2, 31, (1 << 1) | (1 << 3), 16, 16, 1, 2),
              (2, 16, 1 << 0, 16, 16, 1, 0), (0, 64, 1 << 14, 1024, 1, 1, 0))


def _prelude(r: ByteReader) -> list[bytes]:
    """Context 1 with one or two resources backed in RAM and attached to it, so that the
    fuzzed transfers and streams that follow meet a state a driver would have set up."""
    cmds = [CtrlHeader(T.CMD_CTX_CREATE, ctx_id=1).pack() + struct.pack("<II", 4, 0) + b"fuzz".ljust(64, b"\0")]
    for rid in range(1, 2 + r.u8() % 2):
        target, fmt, bind, w, h, d, levels = r.pick(_PLAUSIBLE)
        cmds.append(CtrlHeader(T.CMD_RESOURCE_CREATE_3D).pack() + struct.pack(
            "<IIIIIIIIIII4x", rid, target, fmt, bind, w, h, d, 1, levels, 0, 0))
        cmds.append(CtrlHeader(T.CMD_RESOURCE_ATTACH_BACKING).pack()
                    + struct.pack("<IIQI4x", rid, 1, 0x6000 * (rid - 1), 0x6000))
        cmds.append(CtrlHeader(T.CMD_CTX_ATTACH_RESOURCE, ctx_id=1).pack() + struct.pack("<I4x", rid))
    return cmds


# -- the run ----------------------------------------------------------------------------------
class _Model:
    """What the guest may see written: each resource's backing, each context's resources."""

    def __init__(self) -> None:
        self.backing: dict[int, list[tuple[int, int, int]]] = {}
        self.attached: dict[int, set[int]] = {}

    def allowed(self, data: bytes) -> list[tuple[int, int, int]]:
        hdr = CtrlHeader.unpack(data)
        if hdr.type == T.CMD_TRANSFER_FROM_HOST_3D and len(data) >= HDR_SIZE + 32:
            return self.backing.get(struct.unpack_from("<I", data, HDR_SIZE + 32)[0], [])
        if hdr.type == T.CMD_SUBMIT_3D:
            return [s for rid in self.attached.get(hdr.ctx_id, ()) for s in self.backing.get(rid, [])]
        return []

    def update(self, dev, data: bytes, ok: bool, memory) -> None:
        """Follow a command that succeeded (the device's own tables say what exists)."""
        hdr = CtrlHeader.unpack(data)
        rid = struct.unpack_from("<I", data, HDR_SIZE)[0] if len(data) >= HDR_SIZE + 4 else 0
        if not ok:
            return
        if hdr.type == T.CMD_CTX_CREATE:
            self.attached[hdr.ctx_id] = set()
        elif hdr.type == T.CMD_CTX_DESTROY:
            self.attached.pop(hdr.ctx_id, None)
        elif hdr.type == T.CMD_CTX_ATTACH_RESOURCE:
            self.attached[hdr.ctx_id].add(rid)
        elif hdr.type == T.CMD_CTX_DETACH_RESOURCE:
            self.attached[hdr.ctx_id].discard(rid)
        elif hdr.type == T.CMD_RESOURCE_UNREF:
            self.backing.pop(rid, None)
            for res in self.attached.values():
                res.discard(rid)
        elif hdr.type == T.CMD_RESOURCE_DETACH_BACKING:
            self.backing.pop(rid, None)
        elif hdr.type == T.CMD_RESOURCE_ATTACH_BACKING:
            n = struct.unpack_from("<I", data, HDR_SIZE + 4)[0]
            spans = []
            for k in range(n):
                gpa, length = struct.unpack_from("<QI", data, HDR_SIZE + 8 + 16 * k)
                spans += memory.translate(gpa, length)
            self.backing[rid] = spans


def run_one(data: bytes) -> None:
    dev, ram = shared_device()
    ram.reset()
    r = ByteReader(data)
    # the guest acked CONTEXT_INIT and RESOURCE_UUID, or not (CTX_CREATE's context_init must
    # then be 0); from the input's length, so that corpora keep their meaning
    dev.acked_features = dev.features() if len(data) % 2 else 0
    for _ in range(r.u8() % 8):  # some bytes for transfers and backings to carry
        ram.write(r.pick((0, 0x1000, 0x20000)), r.take(r.u8()))
    memory = ram.memory()
    model = _Model()
    fence = 1
    prelude = _prelude(r) if r.u8() % 4 else []
    try:
        for k in range(len(prelude) + 1 + r.u8() % 24):
            if k >= len(prelude) and not r.remaining:
                break
            fence += 1
            cmd = prelude[k] if k < len(prelude) else _command(r, fence)
            if k >= len(prelude) and r.u8() % 12 == 0:
                _cursor(dev, cmd)
                continue
            before = ram.snapshot()
            ok = _control(dev, cmd, memory)
            if len(cmd) >= HDR_SIZE:
                ram.check_writes(before, model.allowed(cmd))
                model.update(dev, cmd, ok, memory)
            used = sum(res.nbytes for res in dev.res3d.values())
            assert used <= _MAX_HOSTMEM, f"resources hold {used} bytes, over the limit"
            assert _rss() < _RSS_LIMIT, f"process RSS {_rss() >> 20} MiB: a resource escaped the limit"
    finally:
        dev.reset()
        memory.close()
    assert not dev.res3d and not dev.contexts and not dev._uuids3d, \
        "reset left resources, contexts or UUIDs behind"


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _parse_3d(cmd: bytes) -> None:
    """The 3D parser of `cmd`'s type, if it has one (it may raise only BadCommand)."""
    if len(cmd) >= HDR_SIZE:
        parser = PARSERS_3D.get(CtrlHeader.unpack(cmd).type)
        if parser is not None:
            parser(cmd)


def _control(dev, cmd: bytes, memory) -> bool:
    """One command through `execute`; checks the response; True if it succeeded."""
    return control_round(dev, cmd, memory, _parse_3d)


def _cursor(dev, cmd: bytes) -> None:
    """An UPDATE_CURSOR / MOVE_CURSOR built from the same bytes (64x64 read-backs)."""
    body = bytearray(cmd[:56].ljust(56, b"\0"))
    struct.pack_into("<I", body, 0, T.CMD_UPDATE_CURSOR if body[4] & 1 else T.CMD_MOVE_CURSOR)
    struct.pack_into("<I", body, 40, 1 + body[5] % 4)  # resource_id: one the input may have made
    try:
        parsed = parse_cursor(bytes(body))
    except BadCommand:
        return
    dev.cursor_command(parsed)


def seeds() -> list[bytes]:
    """Short fixed patterns plus a few pseudo-random inputs (each decodes to a command mix)."""
    import random
    rng = random.Random(3)
    fixed = [b"", bytes(range(256)), bytes(range(255, 0, -1)) * 3, b"\0\x18" + bytes(range(1, 200)),
             b"\0\x10" + bytes([1, 6, 1]) * 60]
    return fixed + [rng.randbytes(rng.randint(300, 1500)) for _ in range(8)]
