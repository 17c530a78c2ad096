"""vhost-user-blk's seccomp additions: the image is read and written with
vectored I/O, discards punch holes, flushes sync, large reads from the
image's mapping ask mincore first (registered on import)."""
from vhost_user import sandbox

sandbox.register_profile(
    "blk", "preadv pwritev preadv2 pwritev2 fallocate fdatasync fsync sync_file_range mincore".split())
