"""virtio-gpu back-end: drop-in for QEMU's vhost-user-gpu (2D, and 3D through virglrenderer).

What lives here: `spec.py` (the registry's declaration), `device.py` /
`device3d.py` (the control and cursor queues), `commands.py` /
`commands3d.py` / `commands_blob.py` (the command layouts), `resources.py`,
`blob.py` (guest blobs), `state.py` (snapshot and
restore of the 2D state), `display.py` +
`display_protocol.py` (QEMU's display socket), `edid.py`, `virgl.py` (the
virglrenderer binding), `driver.py`, `bench.py`, `fuzz.py` / `fuzz_3d.py`,
`sandbox.py`, `__main__.py`. It has no C engine of its own: pixel copies
are numpy, 3D is virglrenderer.
"""

import os as _os

# numpy's OpenBLAS starts a thread pool at import; the back-end needs none, and a
# second thread would keep the file-system sandbox (vhost_user.sandbox_fs) from
# making its namespace. Set before the first numpy import.
_os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from .commands import CtrlType, Format, GpuFeature
from .device import CAPABILITIES, GpuDevice, GpuOptions

__all__ = ["GpuDevice", "GpuOptions", "CAPABILITIES", "CtrlType", "Format", "GpuFeature"]
