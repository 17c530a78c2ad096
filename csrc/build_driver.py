"""cffi API-mode build of `vhost_user._driver`, the driver-side virtqueue hot loop.

Used by setup.py (`cffi_modules=["csrc/build_driver.py:ffibuilder"]`); paths are
relative to the repository root, where setup.py runs. The generic part lives
in csrc/driver.c and csrc/driver.h (the driver ring and the latency
histogram); each device's load (backends/<dev>/driver_<dev>.c) is found in
its backends/<dev>/native.json (csrc/native_parts.py). The cdef is read from
the headers' cdef-begin/cdef-end regions (csrc/cdefgen.py), so what Python
calls is declared once, in the header the C code compiles against.
"""
import os
import sys

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # cffi runs this file as a script: its helpers sit beside it
from cdefgen import headers_cdef  # noqa: E402
from native_parts import module_inputs  # noqa: E402

CORE_SOURCES = ["driver.c"]
CORE_HEADERS = ["driver.h"]

INPUTS = module_inputs("driver", CORE_SOURCES, CORE_HEADERS, depends=["clock.h"])
SOURCES = INPUTS.sources
#: the headers whose cdef-begin/cdef-end regions are the binding, in order (absolute paths)
HEADERS = INPUTS.headers

CDEF = headers_cdef(HERE, HEADERS)

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "vhost_user._driver",
    INPUTS.preamble,
    sources=SOURCES,
    include_dirs=INPUTS.include_dirs,
    depends=INPUTS.depends,
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
