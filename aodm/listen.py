"""`aodm listen`: a handle's notifications as they arrive, each message once and in order.

First it catches up every chat (the chat list) from where the last `listen` got to (the
state file's cursors; a chat without one: its last page), then it shows each message once,
in `Seq` order: a NewMessage past a gap (its notifications were dropped from a full inbox,
or are the handle's own) comes after the messages it skipped, read back (aodm/catchup.py).

With --json every line on stdout is one event (JSON lines): "message", "catching_up",
"session_established", "key_rotated", "devices_changed", "request_failed"."""

import time

from aodm import catchup, views
from aodm.client import Client
from aodm.commands import Context
from aodm.errors import AodmError
from aodm.inbox import Inbox
from aodm.notifications import (
    AnyNotification,
    DevicesChanged,
    KeyRotated,
    NewMessage,
    RequestFailed,
    SessionEstablished,
)
from aodm.output import Document, Output, local_time, moment
from aodm.session_api import StoredMessage
from aodm.state import State

DRAIN_QUIET_S = 1.0  # `listen --once`: how long the queue must stay quiet to count as drained
SAVE_EVERY_S = 2.0  # `listen`: how often, at most, it writes where it got to while messages come

# Chats not caught up: a message request not accepted yet (`aodm requests` shows it; its
# messages come once it is accepted, as a gap) and a chat the handle blocked.
UNSHOWN = {"incoming", "blocked"}


async def listen(ctx: Context) -> int:
    """Print notifications as they come. With --once: what is waiting (or the first to
    arrive within --timeout), then exit. Without: until Ctrl-C or --timeout of silence."""
    async with ctx.client() as client:
        handle = client.acting_as
        await client.query_handle(handle)  # a typo must not create a queue for nobody
        marks = Marks(ctx.state, handle)
        listener = Listener(client, ctx.out, marks)
        try:
            async with Inbox(client.bus, handle, queue=await client.inbox_queue()) as inbox:
                shown = await listener.catch_up_chats()
                ctx.out.note(f"listening as {client.handle} (Ctrl-C to stop)")
                wait = DRAIN_QUIET_S if ctx.args.once and shown else ctx.args.wait
                while True:
                    try:
                        note = await inbox.next(wait)
                    except TimeoutError:
                        break
                    shown += await listener.show(note)
                    if ctx.args.once:
                        wait = DRAIN_QUIET_S
        finally:
            marks.save()
    if not shown:
        ctx.out.note(f"no notifications within {ctx.args.wait}s")
    return 0


class Marks(catchup.Tracker):
    """The tracker of `listen`, kept in the state file: saved after a catch-up, at most
    every SAVE_EVERY_S while messages come, and at the end. A message shown but not saved
    (the process killed) is shown again by the next `listen`, never skipped."""

    def __init__(self, state: State, handle: str) -> None:
        super().__init__({s: catchup.Mark(*c) for s, c in state.cursors_of(handle).items()})
        self._state, self._handle = state, handle
        self._saved, self._dirty = time.monotonic(), False

    def advance(self, session_id: str, seq: int, timestamp: int) -> bool:
        moved = super().advance(session_id, seq, timestamp)
        self._dirty = self._dirty or moved
        if self._dirty and time.monotonic() - self._saved >= SAVE_EVERY_S:
            self.save()
        return moved

    def save(self) -> None:
        if self._dirty:
            self._state.remember_cursors(self._handle, dict(self.marks))
            self._saved, self._dirty = time.monotonic(), False


class Listener:
    """Shows notifications and the messages they skipped; knows each session's peer."""

    def __init__(self, client: Client, out: Output, marks: Marks) -> None:
        self.client, self.out, self.marks = client, out, marks
        self.peers: dict[str, str] = {}  # session id -> peer: notifications name sessions by id

    async def catch_up_chats(self) -> int:
        """Every chat from its mark; one that cannot be read back is reported, the rest go on."""
        chats = (await self.client.get_chat_list()).chats
        self.peers.update({chat.session_id: chat.peer for chat in chats})
        shown = 0
        for chat in sorted(chats, key=lambda c: c.last_activity):
            if chat.state not in UNSHOWN:
                shown += await self.catch_up(chat.session_id)
        self.marks.save()
        return shown

    async def catch_up(self, session_id: str, before: NewMessage | None = None) -> int:
        """The messages of a session past its mark (and before `before`), each with a line."""
        mark, shown = self.marks.marks.get(session_id), 0
        try:
            async for message in catchup.missed(self.client, session_id, mark, before):
                if self.marks.seen(session_id, message.seq):
                    continue
                if not shown:
                    self.out.emit(*await self.catching_up(session_id, mark, message))
                self.emit_message(*await views.stored(self.client, session_id, self.peers.get(session_id), message))
                self.marks.advance(session_id, message.seq, message.timestamp)
                shown += 1
        except AodmError as exc:  # refused (a blocked chat, say): the others and the new ones still come
            peer = self.peers.get(session_id, session_id)
            self.out.error(exc.code, f"cannot catch up the chat with {peer}: {exc}")
        return shown

    def emit_message(self, document: Document, text: str) -> None:
        self.out.emit({"event": "message", **document}, text)

    async def catching_up(self, session_id: str, mark: catchup.Mark | None, first: StoredMessage) -> views.View:
        """The line before a catch-up: from which message, and what it leaves to `aodm history`."""
        peer = await self.peer_of(session_id)
        after = mark.seq if mark else 0
        skipped = f" (#{after + 1}–#{first.seq - 1} not shown: `aodm history {peer}`)" if first.seq > after + 1 else ""
        document = {"event": "catching_up", "peer": peer, "session_id": session_id, "from_seq": first.seq,
                    "after_seq": after, **moment(first.timestamp)}
        return document, f"[{local_time(first.timestamp)}] * catching up the chat with {peer} from #{first.seq}{skipped}"

    async def show(self, note: AnyNotification) -> int:
        """One notification; a NewMessage past a gap after the messages it skipped, one already
        shown not again. Returns how many messages or events it showed."""
        if not isinstance(note, NewMessage):
            self.out.emit(*await self.describe(note))
            return 1
        if self.marks.seen(note.session_id, note.seq):
            return 0
        shown = await self.catch_up(note.session_id, before=note) if self.marks.gap(note) else 0
        # Only the peer of a session is notified of a message: its sender is the peer.
        peer = self.peers.get(note.session_id, note.sender)
        self.emit_message(*await views.stored(self.client, note.session_id, peer, note))
        self.marks.advance(note.session_id, note.seq, note.timestamp)
        return shown + 1

    async def describe(self, note: AnyNotification) -> views.View:
        """An event other than a message."""
        at = f"[{local_time(note.at)}]"
        match note:
            case SessionEstablished():
                self.peers[note.session_id] = note.peer
                document = {"event": "session_established", "peer": note.peer, "session_id": note.session_id,
                            "state": note.state, **moment(note.at)}
                if note.state == "incoming":
                    return document, f"{at} * message request from {note.peer}: `aodm requests` shows it"
                return document, f"{at} * session established with {note.peer} ({note.session_id})"
            case KeyRotated():
                peer = await self.peer_of(note.session_id)
                document = {"event": "key_rotated", "peer": peer, "session_id": note.session_id,
                            "generation": note.generation, "rotated_by": note.rotated_by, **moment(note.at)}
                what = f"key of the chat with {peer} rotated to generation {note.generation} by {note.rotated_by}"
                return document, f"{at} * {what}"
            case DevicesChanged():
                document = {"event": "devices_changed", "handle": note.subject, "change": note.change,
                            "device_id": note.device_id, "seq": note.seq, **moment(note.at)}
                whose = "your handle" if note.subject == self.client.handle else note.subject
                return document, (f"{at} * device {note.device_id} {note.change} {'to' if note.change == 'added' else 'from'} "
                                  f"{whose} (device log entry {note.seq}; `aodm device list {note.subject}` verifies it)")
            case RequestFailed():
                document = {"event": "request_failed", "action": note.action, "code": note.code,
                            "message": note.message, "request_id": note.request_id, **moment(note.at)}
                return document, f"{at} ! {note.action} failed: {note.code}: {note.message}"
        return {"event": "unknown", "kind": type(note).__name__, **moment(note.at)}, f"{at} ? {type(note).__name__}"

    async def peer_of(self, session_id: str) -> str:
        """Notifications name sessions by id; the chat list names the peer."""
        if session_id not in self.peers:
            self.peers.update({c.session_id: c.peer for c in (await self.client.get_chat_list()).chats})
        return self.peers.get(session_id, session_id)
