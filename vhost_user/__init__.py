"""vhost-user device back-ends: guest memory, virtqueues, device server, front-end.

Installed, the top-level folders of the repository are one namespace:
`vhost_user`, `vhost_user.protocol` (protocol/), `vhost_user.backends`
(backends/). Run from a checkout (a command started in the repository root
imports this folder first), the same names must resolve to the same code:
the repository root joins this package's search path, so protocol/ and
backends/ are found as the sub-packages they install as, and the compiled
cffi modules (built only by `pip install .`) come from the installed copy.
"""

import os as _os
import sys as _sys

__all__: list[str] = []


def _join_checkout() -> None:
    here = _os.path.dirname(_os.path.abspath(__file__))
    root = _os.path.dirname(here)
    if not (_os.path.isfile(_os.path.join(root, "setup.py"))
            and _os.path.isdir(_os.path.join(root, "backends"))
            and _os.path.isdir(_os.path.join(root, "protocol"))):
        return  # an installed copy: its sub-packages sit beside this file
    __path__.append(root)
    for entry in _sys.path:  # the installed copy, for _native / _driver
        other = _os.path.join(entry or _os.getcwd(), "vhost_user")
        if (_os.path.isdir(other) and _os.path.realpath(other) != _os.path.realpath(here)
                and other not in __path__):
            __path__.append(other)


_join_checkout()
