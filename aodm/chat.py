"""`aodm chat PEER`: the recent messages of one chat, then its new ones as they arrive, and
every line read from stdin sent as a message.

It reads the handle's notifications like `listen` (the Inbox), but shows only this chat's
messages: a message of another chat, or a message request from someone else, is one line
(`listen` still shows such a message later: it catches up by `Seq`). A gap in this chat's `Seq` (a notification dropped from a full
inbox, a message sent from another device) is read back first (aodm/catchup.py), so each
message shows once, in order. It leaves `listen`'s place in the state file alone.

stdin may be a terminal, a pipe or a file: a thread reads it, so a script can drive a chat.
Empty lines are ignored; `/quit` or the end of the input ends it. A message the service
refuses (a request the peer has not accepted: `not_accepted`) is one line on stderr, and
the chat goes on.

With --json, stdout holds one event per line: "chat" (first: the peer, the session and its
state), "history" (the recent messages), "message" (new ones), "sent" (yours), "elsewhere"
(another chat's message), "message_request" (from someone else), "session_established"
(the peer opened this chat meanwhile)."""

import asyncio
import codecs
import os
import threading

from aodm import catchup, views
from aodm.client import Client
from aodm.commands import Context, ensure_session
from aodm.errors import AodmError
from aodm.inbox import Inbox
from aodm.notifications import AnyNotification, NewMessage, SessionEstablished
from aodm.output import local_time, moment, refusal
from aodm.session_api import Sent, StoredMessage
from aodm.state import CliError

RECENT = 20  # messages shown when the chat opens
QUIT = "/quit"

STATES = {  # what the chat's consent state means for what you type (docs/protocol.md §11.6)
    None: "no messages yet: what you send opens the chat, a message request until {peer} accepts it",
    "incoming": "{peer}'s message request: what you send accepts it (`aodm block {peer}` refuses it)",
    "outgoing": "your message request, not accepted yet: it holds a few messages until {peer} accepts it",
    "blocked": "you blocked {peer}: `aodm unblock {peer}` before you write",
}


async def chat(ctx: Context) -> int:
    async with ctx.client() as client:
        if ctx.args.peer == client.handle:
            raise CliError(f"{client.handle} is you: chat with someone else", "forbidden")
        await client.query_handle(ctx.args.peer)  # not_found before anything else
        conversation = Conversation(ctx, client, ctx.args.peer)
        queue = await client.inbox_queue()  # this device's own
        async with Inbox(client.bus, client.acting_as, queue=queue) as inbox:  # before the history: nothing falls between
            await conversation.open()
            await conversation.run(inbox, Lines())
    return 0


class Conversation:
    def __init__(self, ctx: Context, client: Client, peer: str) -> None:
        self.ctx, self.client, self.peer, self.out = ctx, client, peer, ctx.out
        self.session_id: str | None = None
        self.state: str | None = None  # None: no session yet
        self.keyed = False  # ensure_session done: the session exists and has a key
        self.seen = catchup.Tracker()

    @property
    def session(self) -> str:
        """The chat's session id: every step that needs one comes after `adopt`."""
        if self.session_id is None:
            raise RuntimeError(f"the chat with {self.peer} has no session yet")
        return self.session_id

    # -- opening ------------------------------------------------------------------------

    async def open(self) -> None:
        """Find the chat, say what state it is in and show its recent messages."""
        found = [c for c in (await self.client.get_chat_list()).chats if c.peer == self.peer]
        if found:
            self.adopt(found[0].session_id, found[0].state)
        self.out.emit({"event": "chat", "handle": self.client.handle, "peer": self.peer,
                       "session_id": self.session_id, "state": self.state}, None)
        self.out.note(f"* chat with {self.peer} as {self.client.handle}: type a message and Enter to send it; "
                      f"{QUIT} or Ctrl-D leaves")
        if self.state in STATES:
            self.out.note("* " + STATES[self.state].format(peer=self.peer))
        if self.session_id is not None:
            await self.show_recent()

    def adopt(self, session_id: str, state: str) -> None:
        self.session_id, self.state = session_id, state
        self.ctx.state.remember_session(self.client.acting_as, self.peer, session_id)

    async def show_recent(self) -> None:
        page = await self.client.query_messages(self.session, order="desc", limit=RECENT)
        recent = sorted(page.messages, key=lambda m: m.seq)
        if recent and recent[0].seq > 1:
            self.out.note(f"* the last {len(recent)} messages (#1–#{recent[0].seq - 1}: `aodm history {self.peer}`)")
        for message in recent:
            await self.show(message, "history")

    # -- running ------------------------------------------------------------------------

    async def run(self, inbox: Inbox, lines: "Lines") -> None:
        """Until /quit or the end of stdin: notifications and typed lines, one at a time."""
        reading = asyncio.create_task(lines.next())
        waiting = asyncio.create_task(inbox.next())
        try:
            while True:
                done, _ = await asyncio.wait({reading, waiting}, return_when=asyncio.FIRST_COMPLETED)
                if waiting in done:
                    await self.on_notification(waiting.result())
                    waiting = asyncio.create_task(inbox.next())
                if reading in done:
                    line = reading.result()
                    if line is None or line.strip() == QUIT:
                        return
                    if line.strip():
                        await self.send(line)
                    reading = asyncio.create_task(lines.next())
        finally:
            for task in (reading, waiting):
                task.cancel()
            await asyncio.gather(reading, waiting, return_exceptions=True)

    async def on_notification(self, note: AnyNotification) -> None:
        match note:
            case NewMessage() if self.session_id is None and note.sender == self.peer:
                self.adopt(note.session_id, "incoming")  # its SessionEstablished came before the chat opened
                await self.on_message(note)
            case NewMessage() if note.session_id == self.session_id:
                await self.on_message(note)
            case NewMessage():
                self.out.emit({"event": "elsewhere", "peer": note.sender, "session_id": note.session_id,
                               "seq": note.seq, **moment(note.timestamp)},
                              f"[{local_time(note.timestamp)}] * {note.sender} wrote in another chat "
                              f"(`aodm chat {note.sender}`)")
            case SessionEstablished() if note.peer == self.peer and note.session_id != self.session_id:
                self.adopt(note.session_id, note.state)
                self.out.emit({"event": "session_established", "peer": self.peer, "session_id": note.session_id,
                               "state": note.state, **moment(note.at)},
                              f"[{local_time(note.at)}] * {STATES.get(note.state, 'session established')}"
                              .format(peer=self.peer))
            case SessionEstablished(state="incoming"):  # its one notification: taken here, `listen` won't say it
                self.out.emit({"event": "message_request", "peer": note.peer, "session_id": note.session_id,
                               **moment(note.at)},
                              f"[{local_time(note.at)}] * message request from {note.peer} (`aodm requests`)")
            # Key rotations (`listen` shows them), other chats' sessions, and failures of
            # requests sent without a reply address (this client always gives one): not here.

    async def on_message(self, note: NewMessage) -> None:
        if self.seen.seen(note.session_id, note.seq):
            return
        if self.seen.gap(note):
            await self.catch_up(note)
        await self.show(note, "message")

    async def catch_up(self, before: NewMessage | Sent) -> None:
        """This chat's messages between the newest shown and `before` (anything with the
        `seq` and `timestamp` of a later message: a NewMessage, or what a send answered)."""
        try:
            async for message in catchup.missed(self.client, self.session, self.seen.marks.get(self.session), before):
                await self.show(message, "message")
        except AodmError as exc:
            self.out.error(exc.code, f"cannot read back the messages before #{before.seq}: {refusal(exc.code, exc.message)}")

    async def show(self, message: StoredMessage | NewMessage, event: str) -> None:
        if self.seen.seen(self.session, message.seq):
            return
        document, text = await views.stored(self.client, self.session, self.peer, message)
        self.out.emit({"event": event, **document}, text)
        self.seen.advance(self.session, message.seq, message.timestamp)

    # -- sending ------------------------------------------------------------------------

    async def send(self, text: str) -> None:
        """Send one line; a refusal is one line on stderr and the chat goes on."""
        try:
            if not self.keyed:
                session_id, created, _ = await ensure_session(self.ctx, self.client, self.peer)
                if session_id != self.session_id:  # opened now, by this line or (just before) by the peer
                    self.adopt(session_id, "outgoing" if created else "incoming")
                self.keyed = True
            sent = await self.client.send_text(self.session, text)
        except AodmError as exc:
            self.out.error(exc.code, refusal(exc.code, exc.message))
            return
        if sent.seq > self.newest() + 1:  # the peer's, not notified yet: they come first
            await self.catch_up(sent)
        document, line = views.message(self.session, self.peer, sent.seq, self.client.acting_as, sent.timestamp,
                                       sent.generation, text)
        self.out.emit({"event": "sent", **document}, line)
        self.seen.advance(self.session, sent.seq, sent.timestamp)
        if self.state == "incoming":
            self.state = "accepted"
            self.out.note(f"* you accepted {self.peer}'s message request")

    def newest(self) -> int:
        mark = self.seen.marks.get(self.session)
        return mark.seq if mark else 0


class Lines:
    """The lines of stdin, read by a daemon thread with os.read: a blocking read works on a
    terminal, a pipe and a file alike, and a daemon thread never keeps the process alive
    (nor holds sys.stdin's lock at exit). Yields None at the end of the input."""

    def __init__(self, fd: int = 0) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[str | None] = asyncio.Queue()
        threading.Thread(target=self._pump, args=(fd,), name="aodm-stdin", daemon=True).start()

    async def next(self) -> str | None:
        return await self._queue.get()

    def _pump(self, fd: int) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        pending = ""
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                chunk = b""
            pending += decoder.decode(chunk, final=not chunk)
            *complete, pending = pending.split("\n")
            for line in complete:
                if not self._put(line.removesuffix("\r")):
                    return
            if not chunk:
                if pending:
                    self._put(pending)
                self._put(None)
                return

    def _put(self, line: str | None) -> bool:
        """False once the chat has ended (its loop closed): nothing more to read for."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, line)
            return True
        except RuntimeError:
            return False
