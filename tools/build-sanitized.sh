#!/usr/bin/env bash
# Builds the C extensions (vhost_user._native, vhost_user._driver) with
# AddressSanitizer + UndefinedBehaviorSanitizer into an overlay directory,
# without touching the in-tree build other processes may be using, and
# optionally runs tests against it.
#
#   tools/build-sanitized.sh [OUTDIR]                    # build only
#   tools/build-sanitized.sh OUTDIR --run [PYTEST ARGS]  # build, then run pytest under it
#
# The overlay works through sitecustomize.py in OUTDIR: with OUTDIR first on
# PYTHONPATH and VHOST_USER_SANITIZED_DIR=OUTDIR, `vhost_user._native` and
# `vhost_user._driver` resolve to the sanitized builds, everything else to the
# normal package. Child processes (the back-ends tests start) inherit this.
# libasan must be loaded before Python's own allocator runs: LD_PRELOAD.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-"$repo/build/sanitized"}
shift || true
mkdir -p "$out"
out=$(cd "$out" && pwd)

export CFLAGS="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g -O1"
export LDFLAGS="-fsanitize=address,undefined"
# cffi compiles inside its tmpdir with the builders' repo-relative source paths: give it a copy.
# The core's C is csrc/; each device's sits in backends/<dev>/ (its native.json names it).
rm -rf "$out/tmp" && mkdir -p "$out/tmp" && cp -r "$repo/csrc" "$out/tmp/csrc"
(cd "$repo" && find backends -name native.json -o -name '*.[ch]') | while read -r f; do
    mkdir -p "$out/tmp/$(dirname "$f")" && cp "$repo/$f" "$out/tmp/$f"
done
(cd "$out/tmp" && python3 - "$out" <<'PY'
import importlib.util, os, sys
out = sys.argv[1]
for script in ("csrc/build_native.py", "csrc/build_driver.py"):  # the copies
    spec = importlib.util.spec_from_file_location("builder", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.ffibuilder.compile(tmpdir=".", verbose=False)
PY
)
# Not "$out/vhost_user": a folder of that name on PYTHONPATH would shadow the package.
rm -rf "$out/overlay" && mkdir -p "$out/overlay"
find "$out/tmp" -name '_native*.so' -exec cp {} "$out/overlay/" \;
find "$out/tmp" -name '_driver*.so' -exec cp {} "$out/overlay/" \;
cat > "$out/sitecustomize.py" <<'PY'
"""Load vhost_user._native and vhost_user._driver from the sanitized overlay.

A meta-path finder, not a change to vhost_user.__path__: it works however
vhost_user itself is found (installed, editable, or from a checkout).
"""
import importlib.abc
import importlib.machinery
import os
import sys

_DIR = os.environ.get("VHOST_USER_SANITIZED_DIR")


class _SanitizedExtensions(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name in ("vhost_user._native", "vhost_user._driver"):
            return importlib.machinery.PathFinder.find_spec(name, [os.path.join(_DIR, "overlay")])
        return None


if _DIR:
    sys.meta_path.insert(0, _SanitizedExtensions())
PY
libasan=$(gcc -print-file-name=libasan.so)
echo "build-sanitized: extensions in $out/overlay:" $(ls "$out/overlay")
echo "build-sanitized: run with:"
echo "  LD_PRELOAD=$libasan PYTHONPATH=$out VHOST_USER_SANITIZED_DIR=$out \\"
echo "  ASAN_OPTIONS=detect_leaks=0:halt_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 pytest ..."

if [ "${1:-}" = "--run" ]; then
    shift
    cd "$repo"
    LD_PRELOAD="$libasan" PYTHONPATH="$out${PYTHONPATH:+:$PYTHONPATH}" VHOST_USER_SANITIZED_DIR="$out" \
    ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=0" \
    UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
        pytest -p no:cacheprovider "$@"
fi
