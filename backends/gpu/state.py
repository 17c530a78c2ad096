"""The 2D GPU's device state for crosvm's snapshot and restore (DEVICE_STATE).

What moves: every 2D resource (id, format, size, its host-side pixels and
its backing as the guest's (address, length) list, translated again against
the restoring process's guest memory on first use) and every scanout's
resource and rectangle. A restored scanout is shown again at once. What
does not: the cursor (the guest sends it again on its next move), UUIDs
(assigned again on request), anything of virglrenderer's (3D contexts and
resources live in the library and cannot be serialised: `VirglGpuDevice`
refuses to save them) and guest blobs: a state holding one is refused
with ValueError (the driver's UNREF of its blobs makes it savable).

Layout: u32 length of a JSON description, the JSON, then each resource's
pixels in the description's order.
"""

from __future__ import annotations

import json
import struct

import numpy as np

from .commands import MemEntry, Rect
from .resources import GpuError, _Backing

__all__ = ["save", "load"]

_LEN = struct.Struct("<I")


def save(resources, scanouts) -> bytes:
    """The state of a ResourceTable and its scanouts; ValueError if it holds guest blobs."""
    blobs = resources.blobs()
    if blobs:
        raise ValueError(f"{len(blobs)} guest blob resource(s) ({', '.join(map(str, sorted(blobs)[:8]))}) "
                         "cannot be saved: blob state is not part of the gpu's device state")
    meta = {"resources": [], "scanouts": []}
    images = []
    for rid in sorted(resources.ids()):
        res = resources.get(rid)
        backing = None if res.backing is None else [[e.addr, e.length] for e in res.backing.entries]
        meta["resources"].append({"id": rid, "format": res.format, "width": res.width,
                                  "height": res.height, "backing": backing})
        images.append(res.image.tobytes())
    for s in scanouts:
        meta["scanouts"].append([s.resource_id, s.rect.x, s.rect.y, s.rect.width, s.rect.height])
    text = json.dumps(meta).encode()
    return _LEN.pack(len(text)) + text + b"".join(images)


def load(data: bytes, resources, scanout_type, nscanouts: int):
    """Rebuild `resources` (emptied first) from `data`; returns the scanouts.

    ValueError for a state that does not fit: malformed, a format or size
    the table refuses (host memory cap), pixels missing or left over.
    """
    try:
        (n,) = _LEN.unpack_from(data)
        meta = json.loads(data[_LEN.size:_LEN.size + n])
        pos = _LEN.size + n
        resources.clear()
        for r in meta["resources"]:
            res = resources.create_2d(int(r["id"]), int(r["format"]), int(r["width"]), int(r["height"]))
            size = res.nbytes
            if pos + size > len(data):
                raise ValueError(f"pixels of resource {res.resource_id} missing")
            res.image[:] = np.frombuffer(data, np.uint8, size, pos).reshape(res.image.shape)
            pos += size
            if r["backing"] is not None:
                entries = tuple(MemEntry(int(a), int(n)) for a, n in r["backing"])
                # No guest memory yet: the first use translates (ResourceTable.current_backing).
                res.backing = _Backing(entries, None, [], [], 0)
        if pos != len(data):
            raise ValueError(f"{len(data) - pos} bytes after the last resource")
        scanouts = []
        for rid, x, y, w, h in meta["scanouts"][:nscanouts]:
            if rid and resources.get(rid) is None:
                raise ValueError(f"scanout shows resource {rid}, which the state lacks")
            scanouts.append(scanout_type(int(rid), Rect(int(x), int(y), int(w), int(h))))
        scanouts += [scanout_type() for _ in range(nscanouts - len(scanouts))]
        return scanouts
    except ValueError:
        resources.clear()
        raise
    except GpuError as exc:
        resources.clear()
        raise ValueError(str(exc)) from None
    except (KeyError, TypeError, IndexError, struct.error) as exc:
        resources.clear()
        raise ValueError(f"malformed gpu state: {exc!r}") from None
