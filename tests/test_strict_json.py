"""Duplicate keys (aodm/strict_json.py), without a broker: the counting filter must never
let a duplicate through, and the exact check must name it."""

import json

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from aodm import strict_json
from aodm.envelope import Envelope, Tag


class Query(msgspec.Struct, rename="pascal"):
    handle: str = ""
    limit: int = 0


KEYS = {"Handle": 1, "Limit": 1}
FLAT = strict_json.FlatObject(Query)
ENVELOPE_LIKE = strict_json.RequiredKeys(list(KEYS))  # both keys required, once each


@pytest.mark.parametrize("text, duplicates", [
    ('{"Handle":"a","Limit":1}', []),
    ('{"Handle":"a","Handle":"b"}', ["Handle"]),
    ('{"Handle":"a","\\u0048andle":"b"}', ["Handle"]),  # the same key, spelled with an escape
    ('{"Handle":"Handle"}', []),  # a value that reads like a key
    ('{"Handle":"\\"Handle\\""}', []),
    ('{"Keys":[{"Handle":"a","Handle":"b"}]}', ["Handle"]),  # nested
])
def test_flat_duplicates(text, duplicates):
    assert FLAT.duplicates(text) == duplicates
    assert FLAT.duplicates(text.encode()) == duplicates


def test_the_filter_spares_the_parse_only_where_no_duplicate_can_be():
    assert not ENVELOPE_LIKE.may_hold_duplicates(b'{"Handle":"a","Limit":1}', 2)
    assert ENVELOPE_LIKE.may_hold_duplicates(b'{"Handle":"a","Handle":"a","Limit":1}', 2)
    assert ENVELOPE_LIKE.may_hold_duplicates(b'{"Handle":"\\u0061","Limit":1}', 2)  # any \\u: parse
    assert ENVELOPE_LIKE.may_hold_duplicates(b'{"Handle":"Handle","Limit":1}', 2)  # a look-alike: parse, finds none
    assert strict_json.duplicate_keys(b'{"Handle":"Handle"}') == []


def test_the_struct_names_are_the_wire_names():
    assert set(strict_json.top_level_keys(Envelope)) == {
        "Id", "Target", "From", "Owner", "Anchor", "Timestamp", "Tags", "Data", "Signature"}
    assert strict_json.top_level_keys(Tag) == {"name": 1, "value": 1}


@given(st.dictionaries(st.sampled_from(["Handle", "Limit"]), st.text(max_size=5), min_size=1),
       st.sampled_from(["Handle", "Limit"]), st.booleans())
def test_a_doubled_key_is_always_found(fields, extra, escaped):
    """Whatever the values, a key added twice is reported, counted or parsed."""
    spelled = "\\u00" + format(ord(extra[0]), "02x") + extra[1:] if escaped else extra
    text = '{"' + spelled + '":0,' + json.dumps(fields)[1:]
    if extra in fields:
        assert FLAT.duplicates(text) == [extra]
    else:
        assert FLAT.duplicates(text) == []
        assert msgspec.json.decode(text)[extra] == 0
