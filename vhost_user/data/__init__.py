"""Package data: vhost-user.json description files."""
