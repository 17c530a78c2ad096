"""The 2D GPU's device state for crosvm's snapshot and restore (DEVICE_STATE).

What moves: every 2D resource (id, format, size, its host-side pixels and
its backing as the guest's (address, length) list, translated again against
the restoring process's guest memory on first use) and every scanout's
resource and rectangle; every guest blob (id, blob_mem, flags, size, its
entries, translated lazily like a backing) and a blob scanout's framebuffer
(format, size, stride, offset: checked against the blob again on load);
the UUIDs assigned so far. A restored 2D scanout is shown again at once, a
blob scanout at the guest's next flush (its pages are guest memory, which
the restoring process maps only after the load). What does not: the
cursor (the guest sends it again on its next move) and anything of
virglrenderer's (3D contexts and resources live in the library and cannot
be serialised: `VirglGpuDevice` refuses to save them).

Layout: u32 length of a JSON description, the JSON, then each resource's
pixels in the description's order.
"""

from __future__ import annotations

import json
import struct

import numpy as np

from .blob import MAX_BLOB_SIZE, BlobResource, check_fb
from .commands import MemEntry, Rect
from .commands_blob import BlobMem, SetScanoutBlob
from .resources import GpuError, _Backing

__all__ = ["save", "load"]

_LEN = struct.Struct("<I")


def save(resources, scanouts) -> bytes:
    """The state of a ResourceTable (2D resources and guest blobs) and its scanouts."""
    meta = {"resources": [], "blobs": [], "scanouts": [], "uuids": {}}
    images = []
    for rid in sorted(resources.ids()):
        res = resources.get(rid)
        backing = None if res.backing is None else [[e.addr, e.length] for e in res.backing.entries]
        if isinstance(res, BlobResource):
            meta["blobs"].append({"id": rid, "blob_mem": res.blob_mem, "flags": res.blob_flags,
                                  "size": res.size, "backing": backing})
            continue
        meta["resources"].append({"id": rid, "format": res.format, "width": res.width,
                                  "height": res.height, "backing": backing})
        images.append(res.image.tobytes())
    for s in scanouts:
        fb = None if s.fb is None else [s.fb.format, s.fb.width, s.fb.height, s.fb.stride, s.fb.offset]
        meta["scanouts"].append([s.resource_id, s.rect.x, s.rect.y, s.rect.width, s.rect.height, fb])
    meta["uuids"] = {str(rid): u.hex() for rid, u in resources.assigned_uuids().items()}
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
            res.backing = _lazy_backing(r["backing"])
        if pos != len(data):
            raise ValueError(f"{len(data) - pos} bytes after the last resource")
        for b in meta.get("blobs", []):
            _load_blob(b, resources)
        scanouts = [_load_scanout(i, item, resources, scanout_type)
                    for i, item in enumerate(meta["scanouts"][:nscanouts])]
        scanouts += [scanout_type() for _ in range(nscanouts - len(scanouts))]
        for rid, text in meta.get("uuids", {}).items():
            resources.set_uuid(int(rid), bytes.fromhex(text))
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


def _lazy_backing(pairs) -> _Backing | None:
    """A saved backing: no guest memory yet, the first use translates (current_backing)."""
    if pairs is None:
        return None
    return _Backing(tuple(MemEntry(int(a), int(n)) for a, n in pairs), None, [], [], 0)


def _load_blob(b: dict, resources) -> None:
    rid, size = int(b["id"]), int(b["size"])
    if not 0 < size <= MAX_BLOB_SIZE:
        raise ValueError(f"blob {rid}: size {size}")
    if int(b["blob_mem"]) != BlobMem.VIRTIO_GPU_BLOB_MEM_GUEST:
        raise ValueError(f"blob {rid}: blob_mem {b['blob_mem']} is not a guest blob")
    backing = _lazy_backing(b["backing"])
    if backing is not None and sum(e.length for e in backing.entries) < size:
        raise ValueError(f"blob {rid}: its entries do not cover its {size} bytes")
    blob = BlobResource(rid, int(b["blob_mem"]), int(b["flags"]), size, backing)
    resources.add_blob(blob)


def _load_scanout(i: int, item, resources, scanout_type):
    rid, x, y, w, h = (int(v) for v in item[:5])
    fb = item[5] if len(item) > 5 else None
    res = resources.get(rid) if rid else None
    if rid and res is None:
        raise ValueError(f"scanout shows resource {rid}, which the state lacks")
    if isinstance(res, BlobResource) != (fb is not None):
        raise ValueError(f"scanout {i}: resource {rid} and its framebuffer do not match")
    if fb is None:
        return scanout_type(rid, Rect(x, y, w, h))
    fmt, fw, fh, stride, offset = (int(v) for v in fb)
    cmd = SetScanoutBlob(Rect(x, y, w, h), i, rid, fw, fh, fmt, (stride, 0, 0, 0), (offset, 0, 0, 0))
    return scanout_type(rid, cmd.r, check_fb(cmd, res, resources.max_hostmem))   # GpuError: refused
