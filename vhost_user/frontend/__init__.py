"""The built-in front-end: a small VMM without a CPU that drives any vhost-user back-end.

What lives here (all of it device-neutral):

- `connection`: `Frontend` (one vhost-user connection, spoken as a VMM does);
- `guestram`: `GuestRam` (memfd guest memory), the one model tests and the
  fuzz targets build on too;
- `splitring`: `SplitRing`, a split ring written byte by byte in Python, for
  tests and fuzz targets that must also write malformed rings;
- `profiles`: which VMM the front-end imitates (QEMU by default, or CROSVM);
- `driver_ring`: the guest-side split ring in C (`DriverQueue`) and the C
  bench loops that run on it with the GIL released;
- `driver`: what every device driver model shares (`Driver`, `split_buffer`);
- `bench`: `vhost-user-bench`, which finds each device's driver through the
  device registry (backends/registry.py), never by importing a back-end.

The device driver models themselves sit beside their devices, in
`vhost_user.backends.<dev>.driver`, so this package knows no device.
"""

from .connection import CROSVM, QEMU, Frontend, FrontendError, Profile, QueueHandle
from .guestram import GuestRam, RamRegion

__all__ = ["GuestRam", "RamRegion", "Frontend", "FrontendError", "QueueHandle", "Profile", "QEMU", "CROSVM"]
