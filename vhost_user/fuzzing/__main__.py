"""`python -m vhost_user.fuzzing` is `vhost-user-fuzz`."""
import sys

from vhost_user.fuzzing import main

sys.exit(main())
