"""Binary-to-text encoding used everywhere on the wire: base64url, no padding (RFC 4648 §5).

Decoding is strict (no padding, no other alphabet, canonical trailing bits) so that one
byte string has exactly one text form and a signed field cannot be re-spelled.
"""

import base64
import binascii
import re

from aodm.errors import MalformedRequest

__all__ = ["b64encode", "b64decode"]

_ALPHABET = re.compile(r"[A-Za-z0-9_-]*")


def b64encode(data: bytes) -> str:
    """`data` in unpadded base64url."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64decode(text: str, *, field: str = "value", length: int | None = None) -> bytes:
    """The bytes of canonical unpadded base64url `text`, `length` of them if given; else
    `MalformedRequest` naming `field`."""
    if not _ALPHABET.fullmatch(text) or len(text) % 4 == 1:
        raise MalformedRequest(f"{field}: not unpadded base64url")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise MalformedRequest(f"{field}: not unpadded base64url") from exc
    if b64encode(data) != text:
        raise MalformedRequest(f"{field}: non-canonical base64url")
    if length is not None and len(data) != length:
        raise MalformedRequest(f"{field}: expected {length} bytes, got {len(data)}")
    return data
