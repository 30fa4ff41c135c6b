"""The error hierarchy. Every error a client can see has a stable string `code`.

Handlers raise these; the consume loop turns them into `Err` replies in one place.
Anything that is not an `AodmError` is either an infrastructure fault (retried) or a
bug (answered with `internal`).
"""

__all__ = [
    "AodmError",
    "MalformedRequest",
    "PayloadTooLarge",
    "InvalidSignature",
    "StaleRequest",
    "UnknownAction",
    "Unauthorized",
    "Forbidden",
    "InvalidArgument",
    "NotFound",
    "AlreadyExists",
    "NoSessionKey",
    "NotAccepted",
    "KeyOutdated",
    "InternalError",
    "RateLimited",
    "Timeout",
    "ALL_ERRORS",
    "ERROR_CODES",
    "error_for",
]


class AodmError(Exception):
    """The base of every error with a wire `code`; `message` says what went wrong."""

    code = "internal"

    def __init__(self, message: str = "") -> None:
        """`message` defaults to the code."""
        super().__init__(message or self.code)
        self.message = message or self.code


class MalformedRequest(AodmError):
    """Not JSON, wrong types, missing or unknown fields, bad base64."""

    code = "malformed_request"


class PayloadTooLarge(AodmError):
    """The request, its Data, or its tags are over their caps."""

    code = "payload_too_large"


class InvalidSignature(AodmError):
    """The signature does not match the envelope and its Owner."""

    code = "invalid_signature"


class StaleRequest(AodmError):
    """Timestamp outside the accepted window: too old to be deduplicated, or from the future."""

    code = "stale_request"


class UnknownAction(AodmError):
    """No such action at this target."""

    code = "unknown_action"


class Unauthorized(AodmError):
    """The signer may not act as `From` (a forged or unregistered `From`)."""

    code = "unauthorized"


class Forbidden(AodmError):
    """The caller is known but may not do this (not a member, a session with itself)."""

    code = "forbidden"


class InvalidArgument(AodmError):
    """Well-formed but out of range: bad handle name, limit 0, inverted bounds."""

    code = "invalid_argument"


class NotFound(AodmError):
    """No such handle, session or key generation."""

    code = "not_found"


class AlreadyExists(AodmError):
    """The handle is taken."""

    code = "already_exists"


class NoSessionKey(AodmError):
    """The session has no key yet (before the first RotateSessionKey)."""

    code = "no_session_key"


class NotAccepted(AodmError):
    """The peer has not accepted this session: a message request holds only a few messages
    until it does. (A block by the peer is answered the same way, on purpose.)"""

    code = "not_accepted"


class KeyOutdated(AodmError):
    """The key batch the message names does not seal to the members' devices of now (one
    was added or removed since): rotate, then send under the new generation."""

    code = "key_outdated"


class InternalError(AodmError):
    """A bug or a request that keeps failing; the request is dead-lettered."""

    code = "internal"


class RateLimited(AodmError):
    """More requests of this kind than the deployment allows: retry after `retry_after_ms`."""

    code = "rate_limited"

    def __init__(self, message: str = "", retry_after_ms: int = 1000) -> None:
        """`retry_after_ms` is at least 1."""
        super().__init__(message)
        self.retry_after_ms = max(1, int(retry_after_ms))


class Timeout(AodmError):
    """Client side only: no reply within the deadline."""

    code = "timeout"


ALL_ERRORS: tuple[type[AodmError], ...] = (
    MalformedRequest,
    PayloadTooLarge,
    InvalidSignature,
    StaleRequest,
    UnknownAction,
    Unauthorized,
    Forbidden,
    InvalidArgument,
    NotFound,
    AlreadyExists,
    NoSessionKey,
    RateLimited,
    NotAccepted,
    KeyOutdated,
    InternalError,
)
ERROR_CODES: dict[str, type[AodmError]] = {e.code: e for e in ALL_ERRORS}


def error_for(code: str, message: str, retry_after_ms: int | None = None) -> AodmError:
    """Rebuild the typed error from a reply (client side)."""
    if code == RateLimited.code:
        return RateLimited(message, retry_after_ms or 1000)
    return ERROR_CODES.get(code, AodmError)(message)
