"""cffi API-mode build of `vhost_user._driver`, the driver-side virtqueue hot loop.

Used by setup.py (`cffi_modules=["csrc/build_driver.py:ffibuilder"]`); paths are
relative to the repository root, where setup.py runs. The C lives in
csrc/driver.c and csrc/driver.h (and drvnet, drvvsock); the cdef is read from
the headers' cdef-begin/cdef-end regions (csrc/cdefgen.py), so what Python
calls is declared once, in the header the C code compiles against.
"""
import os
import sys

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # cffi runs this file as a script: cdefgen.py sits beside it
from cdefgen import headers_cdef  # noqa: E402

HEADERS = ["driver.h", "drvnet.h", "drvvsock.h"]


CDEF = headers_cdef(HERE, HEADERS)

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "vhost_user._driver",
    '#include "driver.h"\n#include "drvnet.h"\n#include "drvvsock.h"',
    sources=["csrc/driver.c", "csrc/drvnet.c", "csrc/drvvsock.c"],
    include_dirs=["csrc"],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
