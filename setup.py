"""Build glue: maps the top-level folders onto the one `vhost_user` namespace.

The package list is computed here so a new back-end folder under backends/
cannot be silently left out of the wheel, and because cffi_modules needs
setup.py anyway. A device's C (backends/<dev>/*.c, *.h, native.json) is
found by the builders themselves (csrc/native_parts.py); the sdist carries it
(MANIFEST.in), the wheel carries only what it was compiled into.
"""
import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _walk(root: str, prefix: str) -> dict[str, str]:
    found = {}
    for dirpath, dirnames, filenames in os.walk(os.path.join(HERE, root)):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__")))
        if "__init__.py" not in filenames:
            continue
        rel = os.path.relpath(dirpath, HERE)
        sub = os.path.relpath(dirpath, os.path.join(HERE, root))
        name = prefix if sub == "." else prefix + "." + sub.replace(os.sep, ".")
        found[name] = rel
    return found


PACKAGE_DIRS = {}
PACKAGE_DIRS.update(_walk("vhost_user", "vhost_user"))
PACKAGE_DIRS.update(_walk("protocol", "vhost_user.protocol"))
PACKAGE_DIRS.update(_walk("backends", "vhost_user.backends"))

setup(
    packages=sorted(PACKAGE_DIRS),
    package_dir=PACKAGE_DIRS,
    exclude_package_data={"": ["*.c", "*.h", "native.json"]},
    cffi_modules=["csrc/build_native.py:ffibuilder", "csrc/build_driver.py:ffibuilder"],
    zip_safe=False,
)
