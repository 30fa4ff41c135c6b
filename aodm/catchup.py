"""Catching up on messages whose notifications never came.

A handle's inbox is bounded (docs/reliability.md, "When an inbox is full"): past the bound
the broker drops the oldest notifications, while every message stays stored. `Seq` numbers
a session's messages 1, 2, … without gaps, so the newest Seq seen in a session (its
`Mark`) tells what is missing: a `NewMessage` more than one past its session's mark. The
missing messages are read back with QueryMessage, oldest first, `From` the mark's
timestamp (a later message never has an earlier timestamp; the protocol's `Cursor` is
opaque, so it is not built from a mark).

Gaps have two other, harmless causes, and the same catch-up shows those messages too: the
handle's own messages (only the peer is notified of them, e.g. ones sent from another
device) and the messages of a message request (none is notified until it is accepted).

A session without a mark (never seen here: a new device, a lost state file) is caught up
with its last page at most, `LAST_PAGE` messages: the first one's `Seq` tells how many came
before (`aodm history` shows them). With a mark, every message after it comes back.

Nothing here trusts the server to be tidy: messages at or below the mark, or at or past
the one that revealed the gap, are skipped, and the caller shows a Seq at most once
(`Tracker.seen`).
"""

from collections.abc import AsyncIterator
from typing import NamedTuple, Protocol

from aodm.client import Client
from aodm.notifications import NewMessage
from aodm.session_api import MAX_PAGE, StoredMessage

__all__ = ["LAST_PAGE", "Later", "Mark", "Tracker", "missed"]

LAST_PAGE = 50


class Mark(NamedTuple):
    """The newest message seen in a session."""

    seq: int
    timestamp: int


class Later(Protocol):
    """A message after a gap, as far as a catch-up needs it: a NewMessage, or the `Sent`
    answer to one's own message."""

    @property
    def seq(self) -> int:
        """Its number in the session (1, 2, … without gaps)."""
        ...

    @property
    def timestamp(self) -> int:
        """When it was stored (epoch milliseconds)."""
        ...


class Tracker:
    """The mark of every session seen; the caller advances it as it shows messages."""

    def __init__(self, marks: dict[str, Mark] | None = None) -> None:
        self.marks: dict[str, Mark] = dict(marks or {})

    def seen(self, session_id: str, seq: int) -> bool:
        """Shown before (a duplicate, or a message a catch-up already showed)."""
        mark = self.marks.get(session_id)
        return mark is not None and seq <= mark.seq

    def gap(self, note: NewMessage) -> bool:
        """Messages come before this one that were not seen here: its Seq is more than one
        past the mark (past 0 in a session without one)."""
        mark = self.marks.get(note.session_id)
        return note.seq > (mark.seq if mark else 0) + 1

    def advance(self, session_id: str, seq: int, timestamp: int) -> bool:
        """Move the mark forward, never back; True if it moved."""
        if seq < 1 or self.seen(session_id, seq):
            return False
        self.marks[session_id] = Mark(seq, timestamp)
        return True


async def missed(
    client: Client, session_id: str, mark: Mark | None, before: Later | None = None
) -> AsyncIterator[StoredMessage]:
    """The messages after `mark` (and before `before`, the message that revealed the
    gap), oldest first, a page at a time: a gap of any size costs no more memory than a
    page. Without a mark: the last page only."""
    until = before.timestamp if before is not None else None
    upto = before.seq if before is not None else None
    if mark is None:
        for message in await _last_page(client, session_id, until, upto):
            yield message
        return
    cursor = None
    while True:
        page = await client.query_messages(session_id, from_=mark.timestamp, until=until, limit=MAX_PAGE, cursor=cursor)
        for message in page.messages:
            if upto is not None and message.seq >= upto:
                return
            if message.seq > mark.seq:
                yield message
        if (cursor := page.next_cursor) is None:
            return


async def _last_page(client: Client, session_id: str, until: int | None, upto: int | None) -> list[StoredMessage]:
    """Up to LAST_PAGE of the newest messages before `upto`, oldest first. (Messages of the
    same millisecond as `before` may come after it, so the first page can hold fewer.)"""
    found: list[StoredMessage] = []
    cursor = None
    while len(found) < LAST_PAGE:
        page = await client.query_messages(session_id, until=until, order="desc", limit=LAST_PAGE, cursor=cursor)
        found += [m for m in page.messages if upto is None or m.seq < upto]
        if (cursor := page.next_cursor) is None:
            break
    return sorted(found[:LAST_PAGE], key=lambda m: m.seq)
