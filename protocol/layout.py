"""Fixed little-endian wire layouts, declared once: the vhost-user payloads and the device headers.

A `WireStruct` subclass is a frozen dataclass whose `_LAYOUT` lists its wire
fields in wire order, as (field name, struct code) pairs, `None` naming
padding ("4x"). From that one declaration come the `struct.Struct`, `SIZE`,
the range check of every field when an object is built, `pack`, `unpack` and
a `pack_into` fast path. The dataclass may order its fields differently from
the wire (a default-valued field last): values are matched by name.

Who is at fault differs by user, so the errors are hooks: `_BUILD_ERROR` is
raised for a bad value we built, `_WIRE_ERROR` for bytes the peer sent that
do not decode (both ValueError unless a subclass says otherwise; the
vhost-user payloads use LocalProtocolError / MalformedPayload). With
`_PREFIX = True` unpack reads the layout from the start of longer data (a
header followed by its payload), else the data must be exactly SIZE bytes.

This module is pure: no I/O, no imports beyond the standard library.
"""
from __future__ import annotations

import dataclasses
import struct
from typing import ClassVar

__all__ = ["WireStruct", "check_uint", "check_bytes"]

_UINT_BITS = {"B": 8, "H": 16, "I": 32, "Q": 64}


def check_uint(owner: str, name: str, value: object, bits: int, error: type[Exception] = ValueError) -> None:
    """`value` must be an int (not a bool) that fits in `bits` unsigned bits."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise error(f"{owner}.{name} must be an int, not {type(value).__name__}")
    if not 0 <= value < 1 << bits:
        raise error(f"{owner}.{name}={value} does not fit in u{bits}")


def check_bytes(owner: str, name: str, value: object, length: int | None,
                error: type[Exception] = ValueError) -> None:
    """`value` must be bytes, of `length` bytes unless that is None."""
    if not isinstance(value, bytes):
        raise error(f"{owner}.{name} must be bytes, not {type(value).__name__}")
    if length is not None and len(value) != length:
        raise error(f"{owner}.{name} must be {length} bytes, not {len(value)}")


class WireStruct:
    """Base of a frozen dataclass with one fixed little-endian layout (`_LAYOUT`)."""

    __slots__ = ()
    _LAYOUT: ClassVar[tuple[tuple[str | None, str], ...]] = ()
    _STRUCT: ClassVar[struct.Struct] = struct.Struct("<")
    _FIELDS: ClassVar[tuple[str, ...]] = ()
    _POSITIONAL: ClassVar[bool] = True
    _BUILD_ERROR: ClassVar[type[Exception]] = ValueError
    _WIRE_ERROR: ClassVar[type[Exception]] = ValueError
    _PREFIX: ClassVar[bool] = False
    SIZE: ClassVar[int | None] = 0

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "_LAYOUT" in cls.__dict__:
            cls._STRUCT = struct.Struct("<" + "".join(code for _, code in cls._LAYOUT))
            cls._FIELDS = tuple(name for name, _ in cls._LAYOUT if name)
            cls.SIZE = cls._STRUCT.size
            for name, code in cls._LAYOUT:
                if name and code[-1] not in _UINT_BITS and not code.endswith("s"):
                    raise TypeError(f"{cls.__name__}.{name}: unsupported struct code {code!r}")

    def __post_init__(self) -> None:
        owner, error = type(self).__name__, self._BUILD_ERROR
        for name, code in self._LAYOUT:
            if not name:
                continue
            value = getattr(self, name)
            if code in _UINT_BITS:
                check_uint(owner, name, value, _UINT_BITS[code], error)
            else:
                check_bytes(owner, name, value, int(code[:-1]), error)
        self._validate()

    def _validate(self) -> None:
        """Checks beyond field widths; subclasses override."""

    def pack(self) -> bytes:
        return self._STRUCT.pack(*(getattr(self, name) for name in self._FIELDS))

    @classmethod
    def pack_into(cls, buf, offset: int, *values) -> None:
        """Write wire values (in wire order) straight into `buf`: a data path's way, no object."""
        cls._STRUCT.pack_into(buf, offset, *values)

    @classmethod
    def unpack(cls, data):
        size = cls.SIZE
        if len(data) != size and not (cls._PREFIX and len(data) > size):
            raise cls._WIRE_ERROR(f"{cls.__name__} needs {size} bytes, got {len(data)}")
        values = cls._STRUCT.unpack_from(data)
        try:
            if cls._positional():
                return cls(*values)
            return cls(**dict(zip(cls._FIELDS, values)))
        except cls._BUILD_ERROR as exc:
            if cls._WIRE_ERROR is cls._BUILD_ERROR:
                raise
            raise cls._WIRE_ERROR(str(exc)) from None

    @classmethod
    def _positional(cls) -> bool:
        """Whether the dataclass takes the wire fields first and in wire order (faster)."""
        if "_POSITIONAL_CHECKED" not in cls.__dict__:
            names = tuple(f.name for f in dataclasses.fields(cls) if f.init)
            cls._POSITIONAL = names[:len(cls._FIELDS)] == cls._FIELDS
            cls._POSITIONAL_CHECKED = True
        return cls._POSITIONAL
