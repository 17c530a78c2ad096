"""virtio-gpu (2D) back-end: drop-in for QEMU's vhost-user-gpu."""

import os as _os

# numpy's OpenBLAS starts a thread pool at import; the back-end needs none, and a
# second thread would keep the file-system sandbox (vhost_user.sandbox_fs) from
# making its namespace. Set before the first numpy import.
_os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from .commands import CtrlType, Format, GpuFeature
from .device import CAPABILITIES, GpuDevice, GpuOptions

__all__ = ["GpuDevice", "GpuOptions", "CAPABILITIES", "CtrlType", "Format", "GpuFeature"]
