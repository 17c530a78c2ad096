"""Device back-ends; each subpackage plugs a device class into vhost_user."""
