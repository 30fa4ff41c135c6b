"""Refusing JSON objects that hold a key twice, which msgspec (and most parsers) accept, the
last one winning: two readers of one signed request could otherwise read two requests.

The exact check is a second parse (the standard library's, with a hook per object), which
would cost a SendMessage about 25 µs. A text it is not needed for is recognised first, by
counting: field names here are plain ASCII letters, and JSON can spell a letter only as
itself or as a \\u escape. So in a text without "\\u", a key appears as the literal "Key",
and an object that holds it twice puts at least one more of those literals in the text than
the objects themselves account for.
"""

import json
from collections.abc import Mapping

import msgspec


class _Duplicate(Exception):
    pass


def _refuse_duplicates(pairs: list[tuple[str, object]]) -> None:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise _Duplicate(sorted({key for key in keys if keys.count(key) > 1}))


def duplicate_keys(text: str | bytes) -> list[str]:
    """The keys that some object in this (valid) JSON text holds more than once."""
    try:
        json.loads(text, object_pairs_hook=_refuse_duplicates)
    except _Duplicate as found:
        return found.args[0]
    return []


def may_hold_duplicates(text: str | bytes, expected: Mapping[str, int]) -> bool:
    """False when the text cannot hold a duplicate key: it has no \\u escape, and each key in
    `expected` appears as a literal at most the given number of times (the number of objects
    that hold it). The keys a text may hold must all be in `expected`."""
    if isinstance(text, bytes):
        return b"\\u" in text or any(text.count(f'"{key}"'.encode()) > n for key, n in expected.items())
    return "\\u" in text or any(text.count(f'"{key}"') > n for key, n in expected.items())


def top_level_keys(struct: type[msgspec.Struct]) -> dict[str, int]:
    """A struct's wire names, each expected once: for a text with no nested object."""
    return {field.encode_name: 1 for field in msgspec.structs.fields(struct)}


def flat_duplicates(text: str | bytes, keys: Mapping[str, int]) -> list[str]:
    """Duplicate keys of a text meant to be one flat object of `keys` (a request's Data):
    counted when it is flat, parsed again when it nests objects or might be re-spelled."""
    brace = b"{" if isinstance(text, bytes) else "{"
    if text.count(brace) <= 1 and not may_hold_duplicates(text, keys):
        return []
    return duplicate_keys(text)
