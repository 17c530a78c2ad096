"""Protocol errors, split by who broke the rules (as h11 does)."""


class VhostUserError(Exception):
    """Root of every error this project raises on purpose."""


class ProtocolError(VhostUserError):
    """The vhost-user wire protocol was violated."""


class LocalProtocolError(ProtocolError):
    """We tried to build or send something the protocol does not allow."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow."""
