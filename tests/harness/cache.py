"""Where the harness keeps what it builds once: the guest kernel and initramfs.

Building the guest (download a kernel package, unpack it, assemble an
initramfs) costs seconds; booting costs seconds too, so the build must not be
paid per test or per session. Every artefact lives in a directory named by a
key made of the versions it was built from, and is built into a temporary
sibling that is renamed into place only when complete. A crashed build
therefore never leaves a half-made artefact that later runs would trust, and
two concurrent pytest processes (xdist workers, two developers' shells) race
harmlessly: the loser's rename fails and it uses the winner's copy.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["cache_root", "cached_dir", "prune", "short_hash"]

#: Cache entries of a kind unused for this long are removed when a sibling is used.
STALE_SECONDS = 3 * 24 * 3600

ENV_CACHE = "VHOST_USER_TEST_CACHE"


def cache_root() -> Path:
    """The harness cache: $VHOST_USER_TEST_CACHE or ~/.cache/vhost-user-tests."""
    root = os.environ.get(ENV_CACHE)
    path = Path(root) if root else Path.home() / ".cache" / "vhost-user-tests"
    path.mkdir(parents=True, exist_ok=True)
    return path


def short_hash(*parts: str | bytes) -> str:
    """A 12-hex-digit digest of ``parts``, for cache keys that must change with content."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else part)
        digest.update(b"\0")
    return digest.hexdigest()[:12]


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cached_dir(name: str, build: Callable[[Path], None]) -> Path:
    """Return ``cache_root()/name``, calling ``build(tmpdir)`` first if it is absent.

    ``build`` fills an empty directory; it is renamed to ``name`` only if
    ``build`` returns normally. A lock file serialises builders of the same
    name so that two processes do not both spend the build time.
    """
    root = cache_root()
    final = root / name
    if final.is_dir():
        os.utime(final)  # "last used", for prune()
        return final
    with _lock(root / f".{name}.lock"):
        if final.is_dir():
            return final
        work = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
        try:
            build(work)
            os.rename(work, final)
        finally:
            if work.exists():
                shutil.rmtree(work, ignore_errors=True)
    return final


def prune(prefix: str, keep: str) -> None:
    """Remove ``prefix*`` cache entries other than ``keep`` unused for STALE_SECONDS.

    Every change to the initramfs builder changes its key; without this the
    cache would grow by ~100 MB per edit. Entries used recently are kept, as
    another checkout may still boot them.
    """
    root = cache_root()
    now = time.time()
    for entry in root.glob(f"{prefix}*"):
        if entry.name != keep and entry.is_dir() and now - entry.stat().st_mtime > STALE_SECONDS:
            shutil.rmtree(entry, ignore_errors=True)
