"""The rng device as the device registry (backends/registry.py) sees it."""
from vhost_user.backends.registry import DeviceSpec

SPEC = DeviceSpec(
    name="rng",
    program="vhost-user-rng",
    driver="vhost_user.backends.rng.driver:RngDriver",
    fuzz_targets={},
)
