"""The net device as the device registry (backends/registry.py) sees it."""
from vhost_user.backends.registry import DeviceSpec

SPEC = DeviceSpec(
    name="net",
    program="vhost-user-net",
    driver="vhost_user.backends.net.driver:NetDriver",
    fuzz_targets={"net-header": "vhost_user.backends.net.fuzz"},
)
