"""The blk device as the device registry (backends/registry.py) sees it: declared once here."""
from vhost_user.backends.registry import DeviceSpec

SPEC = DeviceSpec(
    name="blk",
    program="vhost-user-blk",
    virtio_id=2,
    vhost_user_type="block",
    description="vhost-user-blk back-end (vhost_user, Python with a C data path)",
    features=("read-only", "blk-file"),
    driver="vhost_user.backends.blk.driver:BlkDriver",
    bench="vhost_user.backends.blk.bench",
    fuzz_targets={
        "blk": "vhost_user.backends.blk.fuzz",
        "blk-request": "vhost_user.backends.blk.fuzz_request",
        "session": "vhost_user.backends.blk.fuzz_session",
    },
    sandbox="vhost_user.backends.blk.sandbox",
    summary="random or sequential I/O through a vhost-user-blk back-end",
)
