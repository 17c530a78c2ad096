"""Protocol errors, split by who broke the rules (as h11 does).

`RemoteProtocolError` carries what the caller needs to clean up and go on:
the fds the decoder had taken for the rejected message (the caller must close
them), the request and flags from the header (to NACK it), and `recoverable`:
True when the message was consumed and framing is intact, so the server can
answer and read the next message; False when the byte stream cannot be
trusted any more and the connection must be dropped.
"""

from __future__ import annotations

from typing import Sequence

__all__ = [
    "VhostUserError",
    "ProtocolError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "BadVersion",
    "PayloadTooLarge",
    "UnknownRequest",
    "UnexpectedReply",
    "MalformedPayload",
    "BadFdCount",
]


class VhostUserError(Exception):
    """Root of every error this project raises on purpose."""


class ProtocolError(VhostUserError):
    """The vhost-user wire protocol was violated."""


class LocalProtocolError(ProtocolError):
    """We tried to build or send something the protocol does not allow."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow.

    Attributes:
        fds: fd numbers the decoder had taken for the rejected message; the
            caller now owns them and must close them.
        request: the request from the header (enum member, or int when the
            number is unknown), or None when not known.
        flags: the header flags word, or None.
        recoverable: True if the message was consumed whole and the next one
            can be read; False if the caller must disconnect.
    """

    def __init__(
        self,
        message: str,
        *,
        fds: Sequence[int] = (),
        request: int | None = None,
        flags: int | None = None,
        recoverable: bool | None = None,
    ):
        super().__init__(message)
        self.fds = tuple(fds)
        self.request = request
        self.flags = flags
        self.recoverable = self.RECOVERABLE if recoverable is None else recoverable

    #: default for `recoverable` when the raiser does not say
    RECOVERABLE = True


class BadVersion(RemoteProtocolError):
    """The header's version bits are not 1; fatal."""

    RECOVERABLE = False


class PayloadTooLarge(RemoteProtocolError):
    """The header announces more than MAX_PAYLOAD_SIZE bytes; fatal."""

    RECOVERABLE = False


class UnknownRequest(RemoteProtocolError):
    """The request number is not one this decoder accepts; the payload was skipped."""


class UnexpectedReply(RemoteProtocolError):
    """A reply arrived where only requests are expected, or the reverse."""


class MalformedPayload(RemoteProtocolError):
    """The payload's size or content does not fit the request's payload type."""


class BadFdCount(RemoteProtocolError):
    """The message carries more or fewer fds than its request allows."""
