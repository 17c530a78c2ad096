"""cffi (API mode) builder for the private extension `vhost_user._native`.

One module holds the ring core (below) and every device's C engine, found
in backends/<dev>/native.json (csrc/native_parts.py), because a
`struct vr_queue *` passes from the core to each engine. vhost_user/virtqueue.py
(the generic ring) and the device engines beside their devices
(backends/blk/engine.py, backends/net/engine.py, backends/vsock/fastpath.py)
import the result. Sources are relative to the repository root, where
setuptools runs the build. cffi releases the GIL around every call into C;
the worker loop (vr_run) relies on that. The cdef is generated from the
headers' marked regions (csrc/cdefgen.py), so a header change cannot drift
from its binding.
"""
import os
import sys

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # cffi runs this file as a script: its helpers sit beside it
from cdefgen import headers_cdef  # noqa: E402
from native_parts import module_inputs  # noqa: E402

#: the generic core: ring, memory table, inflight region, worker loop, pcap capture ring
CORE_SOURCES = ["memory.c", "vring.c", "packed.c", "inflight.c", "inflight_packed.c", "dirtylog.c", "run.c", "capture.c"]
CORE_HEADERS = ["vring.h", "capture.h"]

INPUTS = module_inputs("engine", CORE_SOURCES, CORE_HEADERS, depends=["clock.h"])
SOURCES = INPUTS.sources
#: the headers whose cdef-begin/cdef-end regions are the binding, in order (absolute paths)
HEADERS = INPUTS.headers

# Read from the headers (csrc/cdefgen.py); only the callback is cffi's own syntax.
CDEF = headers_cdef(HERE, HEADERS) + """
extern "Python" int vr_py_handler(void *ctx, struct vr_queue *q);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "vhost_user._native",
    INPUTS.preamble,
    sources=SOURCES,
    include_dirs=INPUTS.include_dirs,
    depends=INPUTS.depends,
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
