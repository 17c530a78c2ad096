"""libvirglrenderer (Debian's libvirglrenderer1), bound with cffi in ABI mode.

Theory of operation: virglrenderer keeps GL contexts current on the thread
that initialised it, so every call runs on one renderer thread (`call`
hands it a function and waits). Initialisation asks for EGL on Mesa's
surfaceless platform, which works without /dev/dri (llvmpipe). Fences are
created per fenced command and polled until virglrenderer writes them, so a
fenced response is sent only once its work is done.

Guest pages handed to virglrenderer (attach_iov) are host pointers into
the guest memory mapping; the device pins that mapping (GuestMemory.acquire
plus the cffi buffer) until the backing is detached.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

import cffi

__all__ = ["VirglRenderer", "VirglError", "virgl_unavailable_reason", "virgl_capability_features"]

log = logging.getLogger(__name__)

# virglrenderer.h declares some ids and the write level as int; they are declared uint32_t
# here (same size and calling convention) so a guest's u32 id reaches C as C's own
# conversion would pass it, instead of cffi raising OverflowError for ids >= 2^31.
_CDEF = """
struct iovec { void *iov_base; size_t iov_len; };
struct virgl_box { uint32_t x, y, z, w, h, d; };
struct virgl_renderer_resource_create_args {
    uint32_t handle, target, format, bind, width, height, depth, array_size,
             last_level, nr_samples, flags;
};
struct virgl_renderer_callbacks {
    int version;
    void (*write_fence)(void *cookie, uint32_t fence);
    void *create_gl_context;
    void *destroy_gl_context;
    void *make_current;
    int (*get_drm_fd)(void *cookie);
};
int virgl_renderer_init(void *cookie, int flags, struct virgl_renderer_callbacks *cb);
void virgl_renderer_poll(void);
void virgl_renderer_get_cap_set(uint32_t set, uint32_t *max_ver, uint32_t *max_size);
void virgl_renderer_fill_caps(uint32_t set, uint32_t version, void *caps);
int virgl_renderer_context_create(uint32_t handle, uint32_t nlen, const char *name);
int virgl_renderer_context_create_with_flags(uint32_t ctx_id, uint32_t ctx_flags, uint32_t nlen,
                                             const char *name);
void virgl_renderer_context_destroy(uint32_t handle);
void virgl_renderer_ctx_attach_resource(uint32_t ctx_id, uint32_t res_handle);
void virgl_renderer_ctx_detach_resource(uint32_t ctx_id, uint32_t res_handle);
int virgl_renderer_resource_create(struct virgl_renderer_resource_create_args *args,
                                   struct iovec *iov, uint32_t num_iovs);
void virgl_renderer_resource_unref(uint32_t res_handle);
int virgl_renderer_resource_attach_iov(uint32_t res_handle, struct iovec *iov, int num_iovs);
void virgl_renderer_resource_detach_iov(uint32_t res_handle, struct iovec **iov, int *num_iovs);
int virgl_renderer_submit_cmd(void *buffer, uint32_t ctx_id, int ndw);
int virgl_renderer_transfer_write_iov(uint32_t handle, uint32_t ctx_id, uint32_t level,
    uint32_t stride, uint32_t layer_stride, struct virgl_box *box, uint64_t offset,
    struct iovec *iovec, unsigned int iovec_cnt);
int virgl_renderer_transfer_read_iov(uint32_t handle, uint32_t ctx_id, uint32_t level,
    uint32_t stride, uint32_t layer_stride, struct virgl_box *box, uint64_t offset,
    struct iovec *iov, int iovec_cnt);
int virgl_renderer_create_fence(uint32_t client_fence_id, uint32_t ctx_id);
"""
_USE_EGL, _USE_SURFACELESS = 1 << 0, 1 << 3
CAPSET_IDS = (1, 2)  # VIRTIO_GPU_CAPSET_VIRGL, VIRTIO_GPU_CAPSET_VIRGL2
# Venus (capset 4) is not probed: a Venus context needs host3d blob resources, and QEMU's
# vhost-user-gpu front-end masks RESOURCE_BLOB; with virgl contexts only, a guest asking
# CONTEXT_INIT for Venus gets INVALID_PARAMETER instead of a context that cannot map memory.
CONTEXT_INIT_CAPSET_MASK = 0xFF  # VIRTIO_GPU_CONTEXT_INIT_CAPSET_ID_MASK: the rest is reserved
_FENCE_TIMEOUT = 10.0


class VirglError(Exception):
    pass


class VirglRenderer:
    """One virglrenderer instance and the thread that owns its GL contexts."""

    def __init__(self) -> None:
        self.ffi = cffi.FFI()
        self.ffi.cdef(_CDEF)
        try:
            self.lib = self.ffi.dlopen("libvirglrenderer.so.1")
        except OSError as exc:
            raise VirglError(f"cannot load libvirglrenderer.so.1 ({exc}); "
                             "install Debian's libvirglrenderer1") from None
        self._jobs: queue.Queue = queue.Queue()
        self.fence: int | None = 0  # the last fence id virglrenderer wrote
        self._cookie = self.ffi.new("int *")
        self._thread = threading.Thread(target=self._run, name="virgl", daemon=True)
        self._thread.start()
        rc = self.call(self._init)
        if rc != 0:
            self.close()
            raise VirglError(f"virgl_renderer_init failed ({rc}): no EGL surfaceless "
                             "platform (Mesa's libegl-mesa0 and libgl1-mesa-dri)")

    def _init(self) -> int:
        ffi = self.ffi

        @ffi.callback("void(void *, uint32_t)")
        def write_fence(cookie, fence):
            self.fence = fence  # the newest retired fence (virglrenderer retires in order)

        self._write_fence = write_fence
        cb = self._callbacks = ffi.new("struct virgl_renderer_callbacks *")
        cb.version = 1
        cb.write_fence = write_fence
        return self.lib.virgl_renderer_init(self._cookie, _USE_EGL | _USE_SURFACELESS, cb)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, args, box = job
            try:
                box["result"] = fn(*args)
            except BaseException as exc:  # handed back to the caller
                box["error"] = exc
            box["done"].set()

    def call(self, fn, *args):
        """Run fn(*args) on the renderer thread and return its result."""
        box = {"done": threading.Event()}
        self._jobs.put((fn, args, box))
        box["done"].wait()
        if "error" in box:
            raise box["error"]
        return box.get("result")

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(5)

    @property
    def context_init(self) -> bool:
        """virglrenderer creates contexts for a chosen capset (0.9.0 and later)."""
        try:
            self.lib.virgl_renderer_context_create_with_flags
        except AttributeError:  # cffi: the symbol is not in this library
            return False
        return True

    # -- helpers run on the renderer thread ---------------------------------------
    def capsets(self) -> list[tuple[int, int, int]]:
        def get():
            ver, size = self.ffi.new("uint32_t *"), self.ffi.new("uint32_t *")
            out = []
            for cid in CAPSET_IDS:
                self.lib.virgl_renderer_get_cap_set(cid, ver, size)
                if ver[0]:
                    out.append((cid, ver[0], size[0]))
            return out
        return self.call(get)

    def fill_caps(self, capset: int, version: int, size: int) -> bytes:
        def fill():
            buf = self.ffi.new("uint8_t[]", size)
            self.lib.virgl_renderer_fill_caps(capset, version, buf)
            return bytes(self.ffi.buffer(buf, size))
        return self.call(fill)

    def fence_and_wait(self, fence_id: int, ctx_id: int) -> bool:
        """Create a fence after the work so far and wait until virglrenderer signals it.

        virglrenderer 0.10 keeps 32-bit fence ids: the guest's 64-bit id is cut to its low
        32 bits (as QEMU does). Fences retire in order and only one is outstanding at a
        time (this call waits for it), so the next id virglrenderer writes is this one:
        ids past 2^31, repeated ids and the wrap at 2^32 need no ordering of their own.
        """
        fid = fence_id & 0xFFFFFFFF

        def wait():
            self.fence = None
            rc = self.lib.virgl_renderer_create_fence(fid, ctx_id)
            if rc:
                return False
            deadline = time.monotonic() + _FENCE_TIMEOUT
            while self.fence != fid:
                self.lib.virgl_renderer_poll()
                if time.monotonic() > deadline:
                    return False
                if self.fence != fid:
                    time.sleep(0.0005)
            return True
        return self.call(wait)


CAPSET_NAMES = {1: "virgl", 2: "virgl2"}


def _probe() -> tuple[str | None, dict]:
    """Initialise virglrenderer in a child (it starts threads and EGL): (None, what it
    offers) when it works here, else (the reason, {})."""
    import json
    import subprocess
    import sys
    probe = ("import json; from vhost_user.backends.gpu.virgl import VirglRenderer as V; "
             "r = V(); print(json.dumps({'capsets': [c[0] for c in r.capsets()], "
             "'context_init': r.context_init}))")
    try:
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                             timeout=60)
    except subprocess.TimeoutExpired:
        return "virglrenderer did not initialise within 60 s", {}
    if out.returncode == 0:
        try:
            found = json.loads(out.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            found = {}
        if found.get("capsets"):
            return None, found
    tail = (out.stderr.strip().splitlines() or ["no capsets"])[-1]
    return f"3D rendering (virgl) is not available: {tail}", {}


def virgl_unavailable_reason() -> str | None:
    """None when virglrenderer initialises here, else the reason (checked in a child)."""
    return _probe()[0]


def virgl_capability_features() -> list[str]:
    """The `--print-capabilities` features 3D adds here: `virgl` when virglrenderer works,
    `context-init` when --virgl offers VIRTIO_GPU_F_CONTEXT_INIT, and one `capset-NAME`
    per capset a guest may ask for (libvirt ignores names it does not know)."""
    reason, found = _probe()
    if reason is not None:
        return []
    names = ["virgl"] + (["context-init"] if found.get("context_init") else [])
    return names + [f"capset-{CAPSET_NAMES[c]}" for c in found["capsets"] if c in CAPSET_NAMES]
