"""Turns the switch's drop counters into log lines.

The C data path only counts (it must not log per frame); this checks the
counters twice a second from the event loop and logs each increase once,
so a hostile or misconfigured guest shows up in the log. The SIGUSR1
line of every port's counters is vhost_user.cli's (serve_devices).
"""

from __future__ import annotations

import json
import logging
from typing import Callable

__all__ = ["StatsMonitor", "DROP_COUNTERS"]

log = logging.getLogger(__name__)

DROP_COUNTERS = {
    "tx_runt": "runt frame(s) (shorter than a header plus 14 bytes, e.g. zero-length) dropped",
    "tx_oversize": "frame(s) larger than 64 KiB dropped",
    "tx_bad_header": "frame(s) with a broken or unnegotiated virtio-net header dropped",
    "tx_malformed": "tx chain(s) with device-writable buffers dropped",
    "rx_no_room": "frame(s) dropped: no (or too small) rx buffers posted",
    "rx_not_ready": "frame(s) dropped: no rx queue running",
    "rx_over_mtu": "frame(s) longer than the port's MTU dropped",
}


class StatsMonitor:
    def __init__(self, ports: list[tuple[str, Callable[[], dict[str, int]]]],
                 checks: list[Callable[[], None]] = ()) -> None:
        self.ports = ports
        self.checks = list(checks)
        self._seen: dict[tuple[str, str], int] = {}

    def check(self) -> None:
        for extra in self.checks:
            extra()
        for name, stats in self.ports:
            s = stats()
            for key, what in DROP_COUNTERS.items():
                old = self._seen.get((name, key), 0)
                if s[key] != old:
                    self._seen[(name, key)] = s[key]
                    level = logging.INFO if key.startswith("rx_") else logging.WARNING
                    log.log(level, "%s: %d %s (total %d)", name, s[key] - old, what, s[key])

    def dump(self) -> None:
        log.warning("stats %s", json.dumps({name: stats() for name, stats in self.ports}))

    def attach(self, loop, interval: float = 0.5) -> None:
        """Check periodically on `loop`. SIGUSR1 is serve_devices' one handler
        (vhost_user.cli), which calls check() before it logs the stats line."""

        def tick() -> None:
            self.check()
            loop.call_later(interval, tick)

        loop.call_later(interval, tick)
