"""Guest-side device driver models for the built-in front-end."""

from .blk import BlkDriver, BlkIOError

__all__ = ["BlkDriver", "BlkIOError"]
