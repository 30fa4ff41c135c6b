"""Replies: a typed `Ok | Err` union tagged by `Status`, correlated by the request `Id`."""

import msgspec

from shared.errors import AodmError


class Ok(msgspec.Struct, tag="ok", tag_field="Status", rename="pascal"):
    request_id: str
    result: msgspec.Raw


class Err(msgspec.Struct, tag="error", tag_field="Status", rename="pascal"):
    request_id: str
    code: str
    message: str


Reply = Ok | Err

_encoder = msgspec.json.Encoder()
reply_decoder = msgspec.json.Decoder(Reply)


def ok(request_id: str, result: object) -> bytes:
    return _encoder.encode(Ok(request_id, msgspec.Raw(_encoder.encode(result))))


def err(request_id: str, error: AodmError) -> bytes:
    return _encoder.encode(Err(request_id, error.code, error.message))
