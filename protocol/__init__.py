"""vhost-user wire protocol: a sans-IO codec."""
