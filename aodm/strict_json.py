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
import re
from typing import AnyStr

import msgspec


class _Duplicate(Exception):
    def __init__(self, keys: list[str]) -> None:
        super().__init__(keys)
        self.keys = keys


def _refuse_duplicates(pairs: list[tuple[str, object]]) -> None:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise _Duplicate(sorted({key for key in keys if keys.count(key) > 1}))


def duplicate_keys(text: str | bytes) -> list[str]:
    """The keys that some object in this (valid) JSON text holds more than once."""
    try:
        json.loads(text, object_pairs_hook=_refuse_duplicates)
    except _Duplicate as found:
        return found.keys
    return []


class RequiredKeys:
    """Keys every object of a text must hold (the envelope's, a tag's), found in one pass: a
    pattern that starts with the quote, which the regex engine scans for fast."""

    def __init__(self, keys: list[str]) -> None:
        self._rx = re.compile(('"(' + "|".join(re.escape(key) for key in sorted(keys, key=len, reverse=True)) + ')"').encode())

    def may_hold_duplicates(self, text: bytes, expected: int) -> bool:
        """False when the text cannot hold a duplicate: no \\u escape, and no more literals
        than the `expected` number of keys (each object holds each of its keys at least
        once, so any more means one twice, or a value that looks like a key)."""
        return b"\\u" in text or len(self._rx.findall(text)) > expected


def top_level_keys(struct: type[msgspec.Struct]) -> dict[str, int]:
    """A struct's wire names, each expected once: for a text with no nested object."""
    return {field.encode_name: 1 for field in msgspec.structs.fields(struct)}


class FlatObject:
    """A text meant to be one flat object of a struct's fields (a request's Data)."""

    def __init__(self, struct: type[msgspec.Struct]) -> None:
        names = list(top_level_keys(struct))
        self._literals = [f'"{name}"' for name in names]
        self._byte_literals = [literal.encode() for literal in self._literals]

    def duplicates(self, text: str | bytes) -> list[str]:
        """Its duplicate keys. Counted when it is flat and spells its keys plainly: each at
        most once (fields may be absent). Parsed again when it nests objects or might spell
        a key otherwise (\\u), or a literal shows up twice (a duplicate, or a look-alike)."""
        if isinstance(text, bytes):
            plain = _flat_and_plain(text, b"{", b"\\u", self._byte_literals)
        else:
            plain = _flat_and_plain(text, "{", "\\u", self._literals)
        return [] if plain else duplicate_keys(text)


def _flat_and_plain(text: AnyStr, brace: AnyStr, escape: AnyStr, literals: list[AnyStr]) -> bool:
    """At most one object, no \\u escape, and each key's literal at most once."""
    return text.count(brace) <= 1 and escape not in text and all(text.count(literal) <= 1 for literal in literals)
