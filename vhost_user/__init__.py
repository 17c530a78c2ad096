"""vhost-user device back-ends: guest memory, virtqueues, device server, front-end."""
