"""Guest-side device driver models for the built-in front-end."""

from .blk import BlkDriver, BlkIOError
from .gpu import DisplayListener, GpuDriver
from .net import NetDriver
from .vsock import VsockDriver

__all__ = ["BlkDriver", "BlkIOError", "DisplayListener", "GpuDriver", "NetDriver", "VsockDriver"]
