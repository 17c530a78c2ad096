"""The cffi bindings are read from the C headers (csrc/cdefgen.py), not written twice.

Each builder's cdef is the concatenation of its headers' `/* cdef-begin */`
... `/* cdef-end */` regions; these tests check the generator's rules on a
small header, that a broken marker is an error, and that every function and
constant the real headers declare for Python is in the installed module
(which was compiled against those same headers).
"""
from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import pytest
from cffi import FFI

REPO = Path(__file__).resolve().parents[2]
CSRC = REPO / "csrc"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_test_{name}", CSRC / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


cdefgen = _load("cdefgen")


def test_cdefgen_keeps_declarations_and_rewrites_preprocessor_lines(tmp_path):
    h = tmp_path / "x.h"
    h.write_text("""#ifndef X_H
#define X_H
#include <stdint.h>
struct hidden { int a; };
/* cdef-begin */
/* cdef: struct opaque { ...; }; */
#define X_N 8          /* a literal stays a literal */
#define X_MASK 0x10u
#define X_BIG (1u << 20)
#define X_MAX(a, b) ((a) > (b) ? (a) : (b))
struct x_item { uint32_t v[X_N]; };  // sized by the literal
int x_get(const struct x_item *it, struct opaque *o);
/* cdef-end */
static inline int x_inline(void) { return 1; }
#endif
""")
    text = cdefgen.header_cdef(str(h))
    assert "#define X_N 8" in text and "#define X_MASK 0x10" in text and "#define X_BIG ..." in text
    assert "X_MAX" not in text and "hidden" not in text and "x_inline" not in text and "#include" not in text
    ffi = FFI()
    ffi.cdef(text)
    decls = ffi._parser._declarations
    assert {"struct opaque", "struct x_item", "function x_get", "macro X_N"} <= set(decls)


def test_cdefgen_refuses_a_header_without_or_with_an_unclosed_region(tmp_path):
    h = tmp_path / "y.h"
    h.write_text("int y(void);\n")
    with pytest.raises(ValueError, match="no /\\* cdef-begin"):
        cdefgen.header_cdef(str(h))
    h.write_text("/* cdef-begin */\nint y(void);\n")
    with pytest.raises(ValueError, match="without"):
        cdefgen.header_cdef(str(h))


@pytest.mark.parametrize("builder, module", [("build_native", "vhost_user._native"),
                                             ("build_driver", "vhost_user._driver")])
def test_every_name_a_header_declares_for_python_is_in_the_built_module(builder, module):
    headers = _load(builder).HEADERS
    ffi = FFI()
    ffi.cdef(cdefgen.headers_cdef(str(CSRC), headers))
    lib = importlib.import_module(module).lib
    names = [k.split(" ", 1)[1] for k in ffi._parser._declarations
             if k.startswith(("function ", "macro "))]
    assert names, f"{builder}: the headers {headers} declare nothing for Python"
    missing = [n for n in names if not hasattr(lib, n)]
    assert not missing, f"{module} lacks what its headers declare: {missing}"
