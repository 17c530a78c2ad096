"""virtio-blk back-end."""
