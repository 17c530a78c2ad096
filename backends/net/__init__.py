"""vhost-user-net: virtio-net ports joined by a built-in learning switch. What lives here:

- `spec.py` (the registry's declaration), `device.py` (ports, features,
  MTU, multiqueue), `ctrl.py` (the control queue), `header.py` (virtio-net
  header, protocol/layout.py), `tap.py` (TAP ports), `capture.py` (pcap),
  `monitor.py` (SIGUSR1 counters);
- `engine.py` over the C switch: `net.c` (switch, ports, tx workers, TAP
  reader), `net_mac.c` (MAC table), `net_rx.c` (delivery into rx rings),
  `net_offload.c`, `net_filter.c`, private `net_switch.h`; `native.json`;
- `driver.py`, `driver_load.py` + `driver_net.c` (the front-end's frame
  load), `bench.py`; `fuzz.py`; `sandbox.py`; `__main__.py`.
"""

from .device import NetDevice, NetOptions, NetSwitchPorts
from .header import HEADER_SIZE, NetFeature, NetHeader, header_size

__all__ = ["NetDevice", "NetOptions", "NetSwitchPorts", "NetHeader", "NetFeature",
           "HEADER_SIZE", "header_size"]
