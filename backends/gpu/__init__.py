"""virtio-gpu (2D) back-end: drop-in for QEMU's vhost-user-gpu."""

from .commands import CtrlType, Format, GpuFeature
from .device import CAPABILITIES, GpuDevice, GpuOptions

__all__ = ["GpuDevice", "GpuOptions", "CAPABILITIES", "CtrlType", "Format", "GpuFeature"]
