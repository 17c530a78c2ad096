"""virtio-vsock back-end: host Unix sockets, sibling VMs, vsockmon capture. What lives here:

- `spec.py` (the registry's declaration), `device.py` + `rxpath.py` (the
  queues' Python handlers), `connection.py`, `host.py` (host sockets),
  `router.py` (sibling VMs), `guestio.py`, `packet.py` (the header, via
  protocol/layout.py), `pcap.py`;
- `fastpath.py` over the C data path `vsock.c` and the C host loop and
  queue handlers `vsock_host.c` (`vsock.h`, `vsock_hdr.h` shared with the
  driver side); `native.json`;
- `driver.py`, `driver_load.py` + `driver_vsock.c` (the front-end's stream
  load), `bench.py`; `fuzz.py`; `sandbox.py`; `__main__.py`.
"""

from .device import CAPABILITIES, VmOptions, VsockDevice
from .packet import Header, Op, SockType

__all__ = ["VsockDevice", "VmOptions", "CAPABILITIES", "Header", "Op", "SockType"]
