"""cffi (API mode) builder for the private extension `vhost_user._native`.

vhost_user/virtqueue.py (the generic ring) and the device engines beside
their devices (backends/blk/engine.py, backends/net/engine.py,
backends/vsock/fastpath.py) import the result.  Sources are listed
relative to the repository root, where setuptools runs the build.
cffi releases the GIL around every call into C; the worker loop (vr_run)
relies on that.  The cdef is generated from the headers' marked regions
(csrc/cdefgen.py), so a header change cannot drift from its binding.
"""
import os
import sys

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # cffi runs this file as a script: cdefgen.py sits beside it
from cdefgen import headers_cdef  # noqa: E402
SOURCES = ["csrc/memory.c", "csrc/vring.c", "csrc/inflight.c", "csrc/run.c", "csrc/blk.c", "csrc/net.c", "csrc/net_offload.c", "csrc/net_filter.c", "csrc/vsock.c", "csrc/capture.c"]

#: the headers whose cdef-begin/cdef-end regions are the binding, in order
HEADERS = ["vring.h", "blk.h", "net.h", "capture.h", "vsock.h"]


# Read from the headers (csrc/cdefgen.py); only the callback is cffi's own syntax.
CDEF = headers_cdef(HERE, HEADERS) + """
extern "Python" int vr_py_handler(void *ctx, struct vr_queue *q);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "vhost_user._native",
    '#include "vring.h"\n#include "blk.h"\n#include "net.h"\n#include "vsock.h"\n#include "capture.h"\n',
    sources=SOURCES,
    include_dirs=[HERE],
    depends=[os.path.join("csrc", f) for f in ("clock.h", "vring.h", "blk.h", "net.h", "net_offload.h", "net_filter.h", "vsock.h", "capture.h")],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
