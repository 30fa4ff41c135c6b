"""Replies: a typed `Ok | Err` union tagged by `Status`, correlated by the request `Id`."""

import msgspec

from aodm.errors import AodmError

__all__ = ["Ok", "Err", "Reply", "reply_decoder", "ok", "err"]


class Ok(msgspec.Struct, tag="ok", tag_field="Status", rename="pascal"):
    request_id: str
    result: msgspec.Raw


class Err(msgspec.Struct, tag="error", tag_field="Status", rename="pascal", omit_defaults=True):
    request_id: str
    code: str
    message: str
    retry_after: int = 0  # rate_limited only (absent otherwise): milliseconds to wait before trying again


Reply = Ok | Err

_encoder = msgspec.json.Encoder()
reply_decoder = msgspec.json.Decoder(Reply)


def ok(request_id: str, result: object) -> bytes:
    return _encoder.encode(Ok(request_id, msgspec.Raw(_encoder.encode(result))))


def err(request_id: str, error: AodmError) -> bytes:
    return _encoder.encode(Err(request_id, error.code, error.message, getattr(error, "retry_after_ms", 0)))
