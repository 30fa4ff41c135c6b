"""docs/protocol.md in step with the code where it describes wire shapes in prose (the
AsyncAPI document is checked against the code by tests/test_asyncapi.py)."""

import re
import typing
from pathlib import Path

import msgspec

from aodm import notifications

DOC = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text(encoding="utf-8")
KINDS = {t.__struct_config__.tag: t for t in typing.get_args(notifications.AnyNotification)}
COMMON = {"Kind", "Id", "Handle", "At"}
_NAME = re.compile(r"`([A-Z][A-Za-z]*)`")  # a backticked field name (not a "value", not a §)


def section(title: str) -> str:
    start = DOC.index(f"\n## {title}\n")
    return DOC[start : DOC.index("\n## ", start + 1)]


def kind_rows() -> dict[str, str]:
    """§12's table of kinds: Kind -> its 'extra fields' cell."""
    rows = {}
    for line in section("12. Notifications").splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 4 and (match := _NAME.fullmatch(cells[0])) and match[1] in KINDS:
            rows[match[1]] = cells[3]
    return rows


def test_the_notification_table_has_every_kind():
    assert set(kind_rows()) == set(KINDS)


def test_each_notification_row_names_exactly_its_fields():
    """Every field name a row gives is the notification's, and every field of it is given:
    a row that likened NewMessage to StoredMessage promised a SenderKey it does not carry."""
    for kind, cell in kind_rows().items():
        fields = {f.encode_name for f in msgspec.structs.fields(KINDS[kind])}
        named = set(_NAME.findall(cell))
        assert named - fields - COMMON == set(), f"§12 {kind}: {sorted(named - fields)} are no fields of it"
        assert fields - COMMON - named == set(), f"§12 {kind}: its fields {sorted(fields - COMMON - named)} are missing"
