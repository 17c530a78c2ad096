"""The cffi cdef of a native module, read from its C headers (never written twice).

Each header marks what Python may see between `/* cdef-begin */` and
`/* cdef-end */` comments (a header may have several such regions). From
those regions `header_cdef` keeps the C declarations as they are and turns
the preprocessor lines into what cffi understands:

* `#define NAME 123` (a decimal or hex literal, a `u` suffix dropped) stays a
  literal, so it can size an array in a later declaration;
* any other object-like `#define NAME value` becomes `#define NAME ...`
  (the compiler supplies the value in API mode);
* every other preprocessor line (includes, guards, function-like macros) goes.

A declaration cffi cannot parse (a struct whose layout Python must not
rely on, a varargs function with attributes, an inline function) stays
outside the regions; where Python still needs a name for it, the region
holds a comment `/* cdef: struct name { ...; }; */` whose text only the
cdef sees. A header edited inside a region changes its binding with it; a
field or signature cffi reads differently from the compiler fails the build.
"""
from __future__ import annotations

import os
import re

__all__ = ["header_cdef", "headers_cdef"]

BEGIN, END = "/* cdef-begin */", "/* cdef-end */"
_CDEF_ONLY = re.compile(r"/\* cdef: (.*?) \*/", re.S)
_COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*", re.S)
_DEFINE = re.compile(r"#\s*define\s+([A-Za-z_]\w*)(\()?\s*(.*)")
_LITERAL = re.compile(r"(0[xX][0-9a-fA-F]+|[0-9]+)[uU]?")


def _regions(path: str, text: str) -> list[str]:
    out, pos = [], 0
    while (b := text.find(BEGIN, pos)) >= 0:
        e = text.find(END, b)
        if e < 0:
            raise ValueError(f"{path}: {BEGIN} without {END}")
        out.append(text[b + len(BEGIN):e])
        pos = e + len(END)
    if not out:
        raise ValueError(f"{path}: no {BEGIN} ... {END} region")
    return out


def header_cdef(path: str) -> str:
    """The cdef text of one header's marked regions."""
    with open(path) as f:
        text = f.read()
    lines = [f"/* from {os.path.basename(path)} */"]
    for region in _regions(path, text):
        region = _CDEF_ONLY.sub(lambda m: m.group(1), region)
        region = _COMMENT.sub(" ", region).replace("\\\n", " ")
        for line in region.splitlines():
            stripped = line.strip()
            if not stripped.startswith("#"):
                if stripped:
                    lines.append(line.rstrip())
                continue
            m = _DEFINE.match(stripped)
            if m and not m.group(2):
                value = m.group(3).strip()
                lit = _LITERAL.fullmatch(value)
                lines.append(f"#define {m.group(1)} {lit.group(1) if lit else '...'}")
    return "\n".join(lines) + "\n"


def headers_cdef(directory: str, names) -> str:
    """The cdef of several headers in `directory`, in the given order."""
    return "".join(header_cdef(os.path.join(directory, n)) for n in names)
