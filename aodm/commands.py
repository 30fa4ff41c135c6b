"""What each CLI command does, given its parsed arguments. Parsing and error reporting live
in `aodm.cli`; every function here returns the exit status and prints to stdout."""

import asyncio
import sys
import time
from contextlib import asynccontextmanager
from datetime import datetime
from urllib.parse import urlsplit

from aodm import catchup
from aodm import state as files
from aodm.client import Client, with_credentials
from aodm.crypto import DecryptionFailed, Identity
from aodm.inbox import Inbox
from aodm.state import CliError, State
from shared.errors import AodmError, NoSessionKey, NotFound
from shared.notifications import KeyRotated, NewMessage, RequestFailed, SessionEstablished
from shared.session_api import MAX_PAGE, StoredMessage
from shared.transport import LoginRefused

DRAIN_QUIET_S = 1.0  # `listen --once`: how long the queue must stay quiet to count as drained
SAVE_EVERY_S = 2.0  # `listen`: how often, at most, it writes where it got to while messages come


def local_time(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S")


def safe_url(url: str) -> str:
    """The broker URL without its password, for messages."""
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or 5672}{parts.path or '/'}"


def line(when: int, sender: str, text: str) -> str:
    return f"[{local_time(when)}] {sender}: {text}"


class Context:
    """The identity, its state and a connection, opened only by the commands that need them."""

    def __init__(self, args) -> None:
        self.args = args
        self.path = files.identity_path(args.identity)

    @property
    def identity(self) -> Identity:
        if not hasattr(self, "_identity"):
            self._identity = files.load_identity(self.path)
        return self._identity

    @property
    def state(self) -> State:
        if not hasattr(self, "_state"):
            self._state = State.load(self.path, self.identity)
        return self._state

    def broker_login(self, handle: str | None) -> dict[str, str] | None:
        """The handle's own broker user and password, when this state holds them."""
        return self.state.brokers.get(handle) if handle else None

    @asynccontextmanager
    async def client(self, *, need_handle: bool = True, own_login: bool = True):
        """A connected client acting as the chosen handle (when the command needs one). It
        logs in to the broker as the handle's own broker user when the state holds one
        (host, port and vhost still come from --amqp-url), else with --amqp-url's login."""
        identity = self.identity
        known = (self.args.as_handle or self.state.default_handle) if need_handle else None
        login = self.broker_login(known) if own_login else None
        url = with_credentials(self.args.amqp_url, login["user"], login["password"]) if login else self.args.amqp_url
        connect = Client.connect(url, identity, timeout=self.args.timeout)
        try:
            client = await asyncio.wait_for(connect, self.args.timeout)
        except TimeoutError:
            where = safe_url(self.args.amqp_url)
            raise CliError(f"no answer from the broker at {where} within {self.args.timeout:g}s") from None
        except LoginRefused:
            if not login:
                raise
            raise CliError(
                f"the broker refused {known}'s stored broker login (user {login['user']}); "
                f"`aodm credentials --as {known}` issues a new password"
            ) from None
        try:
            if need_handle:
                client.handle = await self.handle(client)
            yield client
        finally:
            await client.close()

    async def handle(self, client: Client) -> str:
        """--as, else the remembered default, else the identity's only registered handle."""
        if self.args.as_handle:
            return self.args.as_handle
        if self.state.default_handle:
            return self.state.default_handle
        handles = sorted(h.handle for h in await client.get_handles())
        if not handles:
            raise CliError("this identity has no handle yet; register one with `aodm register NAME`")
        if len(handles) > 1:
            raise CliError(f"this identity has several handles ({', '.join(handles)}); choose one with --as")
        self.state.default_handle = handles[0]
        self.state.save()
        return handles[0]


# -- identity -------------------------------------------------------------------------


def identity_new(ctx: Context) -> int:
    identity = files.create_identity(ctx.path, ctx.args.force)
    State(files.state_path(ctx.path), identity.address).save()
    print(f"created {ctx.path}")
    return print_identity(identity)


def identity_show(ctx: Context) -> int:
    print(f"file:    {ctx.path}")
    print_identity(ctx.identity)
    print(f"handle:  {ctx.state.default_handle or '(none yet; aodm register NAME)'}")
    return 0


def print_identity(identity: Identity) -> int:
    print(f"address: {identity.address}")
    print(f"box key: {identity.box_public}")
    return 0


# -- registry -------------------------------------------------------------------------


async def register(ctx: Context) -> int:
    """Registering a handle this identity already owns is a no-op, not an error."""
    async with ctx.client(need_handle=False) as client:
        try:
            info = await client.register(ctx.args.handle)
            note = "registered"
        except AodmError as exc:
            if exc.code != "already_exists":
                raise
            info = await client.query_handle(ctx.args.handle)
            if info.sign_key != ctx.identity.address:
                raise CliError(f"already_exists: the handle {ctx.args.handle!r} is taken by someone else") from None
            note = "already yours"
    ctx.state.default_handle = info.handle
    ctx.state.save()
    print(f"{note}: {info.handle} (since {local_time(info.created_at)}); it is now the default handle")
    if client.broker_user and client.broker_password:
        ctx.state.remember_broker(info.handle, client.broker_user, client.broker_password)
        print(f"broker login: {client.broker_user} (it may read only {info.handle}'s notifications); "
              f"kept in {ctx.state.path}")
    return 0


async def credentials(ctx: Context) -> int:
    """Issue a new password for the handle's own broker user and keep it in the state. It
    logs in with --amqp-url's login, since the stored one may be the lost or stale one."""
    async with ctx.client(own_login=False) as client:
        url = await client.issue_broker_credentials()
    if url is None or client.broker_user is None or client.broker_password is None:
        print(f"the broker at {safe_url(ctx.args.amqp_url)} issues no per-handle broker users; "
              "--amqp-url's login is used for everything")
        return 0
    ctx.state.remember_broker(client.handle, client.broker_user, client.broker_password)
    print(f"new broker password for {client.broker_user} ({client.handle}); the old one no longer logs in. "
          f"Kept in {ctx.state.path}")
    return 0


async def chats(ctx: Context) -> int:
    async with ctx.client() as client:
        chat_list = (await client.get_chat_list()).chats
    if not chat_list:
        print(f"{client.handle} has no chats yet; start one with `aodm open PEER`")
        return 0
    width = max(len("PEER"), *(len(c.peer) for c in chat_list))
    print(f"{'PEER':<{width}}  {'STATE':<8}  {'LAST ACTIVITY':<19}  SESSION")
    for chat in sorted(chat_list, key=lambda c: c.last_activity, reverse=True):
        ctx.state.remember_session(client.handle, chat.peer, chat.session_id)
        print(f"{chat.peer:<{width}}  {chat.state:<8}  {local_time(chat.last_activity)}  {chat.session_id}")
    return 0


# -- message requests ---------------------------------------------------------------


async def requests(ctx: Context) -> int:
    """The sessions others opened with you that you have not accepted, with what they hold."""
    async with ctx.client() as client:
        incoming = [c for c in (await client.get_chat_list()).chats if c.state == "incoming"]
        if not incoming:
            print(f"{client.handle} has no message requests")
            return 0
        for chat in incoming:
            ctx.state.remember_session(client.handle, chat.peer, chat.session_id)
            messages = (await client.query_messages(chat.session_id)).messages
            print(f"request from {chat.peer} ({len(messages)} message{'s' * (len(messages) != 1)}):")
            for m in messages:
                print("  " + line(m.timestamp, m.sender, await readable(client, chat.session_id, m.generation, m.content)))
    print("answer with `aodm accept PEER` or `aodm block PEER`")
    return 0


async def session_with(ctx: Context, client: Client, peer: str) -> str:
    session_id = await client.query_session(client.handle, peer)
    if session_id is None:
        raise CliError(f"{client.handle} has no chat with {peer}")
    ctx.state.remember_session(client.handle, peer, session_id)
    return session_id


def consent(change: str):
    """`aodm accept|block|unblock PEER`."""
    async def run(ctx: Context) -> int:
        async with ctx.client() as client:
            session_id = await session_with(ctx, client, ctx.args.peer)
            state = await getattr(client, change)(session_id)
        print(f"chat with {ctx.args.peer}: {state}")
        return 0
    return run


# -- sessions -------------------------------------------------------------------------


async def ensure_session(ctx: Context, client: Client, peer: str) -> tuple[str, bool, int]:
    """Establish (or find) the chat with `peer`; give it a first key if it has none.
    Returns the session id, whether it is new, and the current key generation."""
    established = await client.establish_session(peer)
    session_id = established.session_id
    ctx.state.remember_session(client.handle, peer, session_id)
    try:
        generation, _ = await client.session_key(session_id)
    except NoSessionKey:
        generation = await client.rotate_session_key(session_id, peer)
    return session_id, established.created, generation


async def open_chat(ctx: Context) -> int:
    async with ctx.client() as client:
        session_id, created, generation = await ensure_session(ctx, client, ctx.args.peer)
    print(f"{'new' if created else 'existing'} session with {ctx.args.peer} (key generation {generation}):")
    print(session_id)
    return 0


async def send(ctx: Context) -> int:
    text = " ".join(ctx.args.text)
    async with ctx.client() as client:
        session_id, _, _ = await ensure_session(ctx, client, ctx.args.peer)
        sent = await client.send_text(session_id, text)
    print(f"sent #{sent.seq} to {ctx.args.peer} at {local_time(sent.timestamp)} (key generation {sent.generation})")
    return 0


async def rotate(ctx: Context) -> int:
    async with ctx.client() as client:
        session_id = (await client.establish_session(ctx.args.peer)).session_id
        ctx.state.remember_session(client.handle, ctx.args.peer, session_id)
        generation = await client.rotate_session_key(session_id, ctx.args.peer)
    print(f"rotated the key of the session with {ctx.args.peer}: now generation {generation}")
    return 0


async def history(ctx: Context) -> int:
    async with ctx.client() as client:
        session_id = await client.query_session(client.handle, ctx.args.peer)
        if session_id is None:
            await client.query_handle(ctx.args.peer)  # not_found when the peer does not exist
            raise CliError(f"{client.handle} has no chat with {ctx.args.peer} yet; `aodm open {ctx.args.peer}` starts one")
        ctx.state.remember_session(client.handle, ctx.args.peer, session_id)
        for message in await fetch(client, session_id, ctx.args):
            text = await readable(client, session_id, message.generation, message.content)
            print(line(message.timestamp, message.sender, text))
    return 0


async def fetch(client: Client, session_id: str, args) -> list:
    """All matching messages, or at most --limit of them (pages are capped at MAX_PAGE)."""
    query = {"from_": args.since, "order": "desc" if args.desc else "asc"}
    if args.limit is None:
        return await client.history(session_id, limit=MAX_PAGE, **query)
    messages, cursor = [], None
    while len(messages) < args.limit:
        size = min(MAX_PAGE, args.limit - len(messages))
        page = await client.query_messages(session_id, limit=size, cursor=cursor, **query)
        messages += page.messages
        if (cursor := page.next_cursor) is None:
            break
    return messages


async def readable(client: Client, session_id: str, generation: int, content: str) -> str:
    """The plaintext, or why it cannot be shown (one bad message must not hide the rest)."""
    try:
        return await client.decrypt(session_id, generation, content)
    except (DecryptionFailed, NotFound) as exc:
        return f"<cannot decrypt (generation {generation}): {exc}>"


# -- notifications --------------------------------------------------------------------


async def listen(ctx: Context) -> int:
    """Print notifications as they come. With --once: what is waiting (or the first to
    arrive within --timeout), then exit. Without: until Ctrl-C or --timeout of silence.

    First it catches up every chat (the chat list) from where the last `listen` got to (the
    state file's cursors; a chat without one: its last page), then it shows each message
    once, in `Seq` order: a NewMessage past a gap (its notifications were dropped from a
    full inbox, or are the handle's own) comes after the messages it skipped, read back."""
    async with ctx.client() as client:
        await client.query_handle(client.handle)  # a typo must not create a queue for nobody
        peers: dict[str, str] = {}
        marks = Marks(ctx.state, client.handle)
        try:
            async with Inbox(client.bus, client.handle) as inbox:
                shown = await catch_up_chats(client, marks, peers)
                print(f"listening as {client.handle} (Ctrl-C to stop)", file=sys.stderr, flush=True)
                wait = DRAIN_QUIET_S if ctx.args.once and shown else ctx.args.wait
                while True:
                    try:
                        note = await inbox.next(wait)
                    except TimeoutError:
                        break
                    shown += await show(client, note, marks, peers)
                    if ctx.args.once:
                        wait = DRAIN_QUIET_S
        finally:
            marks.save()
    if not shown:
        print(f"no notifications within {ctx.args.wait}s", file=sys.stderr)
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


# Chats not caught up: a message request not accepted yet (`aodm requests` shows it; its
# messages come once it is accepted, as a gap) and a chat the handle blocked.
UNSHOWN = {"incoming", "blocked"}


async def catch_up_chats(client: Client, marks: Marks, peers: dict[str, str]) -> int:
    """Every chat from its mark; one that cannot be read back is said on stderr, the rest go on."""
    chats = (await client.get_chat_list()).chats
    peers.update({chat.session_id: chat.peer for chat in chats})
    shown = 0
    for chat in sorted(chats, key=lambda c: c.last_activity):
        if getattr(chat, "state", "accepted") not in UNSHOWN:  # servers before message requests: all accepted
            shown += await catch_up(client, chat.session_id, marks, peers)
    marks.save()
    return shown


async def catch_up(client: Client, session_id: str, marks: Marks, peers: dict[str, str],
                   before: NewMessage | None = None) -> int:
    """The messages of a session past its mark (and before `before`), each with a line."""
    mark, shown = marks.marks.get(session_id), 0
    try:
        async for message in catchup.missed(client, session_id, mark, before):
            if marks.seen(session_id, message.seq):
                continue
            if not shown:
                print(await catching_up(client, session_id, mark, message, peers), flush=True)
            text = await readable(client, session_id, message.generation, message.content)
            print(line(message.timestamp, message.sender, text), flush=True)
            marks.advance(session_id, message.seq, message.timestamp)
            shown += 1
    except AodmError as exc:  # refused (a blocked chat, say): the others and the new ones still come
        peer = peers.get(session_id, session_id)
        print(f"aodm: cannot catch up the chat with {peer}: {exc}", file=sys.stderr, flush=True)
    return shown


async def catching_up(client: Client, session_id: str, mark: catchup.Mark | None, first: StoredMessage,
                      peers: dict[str, str]) -> str:
    """The line before a catch-up: from which message, and what it leaves to `aodm history`."""
    peer = await peer_of(client, session_id, peers)
    after = mark.seq if mark else 0
    skipped = f" (#{after + 1}–#{first.seq - 1} not shown: `aodm history {peer}`)" if first.seq > after + 1 else ""
    return f"[{local_time(first.timestamp)}] * catching up the chat with {peer} from #{first.seq}{skipped}"


async def show(client: Client, note, marks: Marks, peers: dict[str, str]) -> int:
    """One notification; a NewMessage past a gap after the messages it skipped, one already
    shown not again. Returns how many lines of messages or events it printed."""
    if not isinstance(note, NewMessage):
        print(await describe(client, note, peers), flush=True)
        return 1
    if marks.seen(note.session_id, note.seq):
        return 0
    shown = await catch_up(client, note.session_id, marks, peers, before=note) if marks.gap(note) else 0
    print(await describe(client, note, peers), flush=True)
    marks.advance(note.session_id, note.seq, note.timestamp)
    return shown + 1


async def describe(client: Client, note, peers: dict[str, str]) -> str:
    match note:
        case NewMessage():
            return line(note.timestamp, note.sender, await readable(client, note.session_id, note.generation, note.content))
        case SessionEstablished():
            peers[note.session_id] = note.peer
            if note.state == "incoming":
                return f"[{local_time(note.at)}] * message request from {note.peer}: `aodm requests` shows it"
            return f"[{local_time(note.at)}] * session established with {note.peer} ({note.session_id})"
        case KeyRotated():
            peer = await peer_of(client, note.session_id, peers)
            what = f"key of the chat with {peer} rotated to generation {note.generation} by {note.rotated_by}"
            return f"[{local_time(note.at)}] * {what}"
        case RequestFailed():
            return f"[{local_time(note.at)}] ! {note.action} failed: {note.code}: {note.message}"
    return f"[{local_time(note.at)}] ? {type(note).__name__}"


async def peer_of(client: Client, session_id: str, peers: dict[str, str]) -> str:
    """Notifications name sessions by id; the chat list names the peer."""
    if session_id not in peers:
        peers.update({c.session_id: c.peer for c in (await client.get_chat_list()).chats})
    return peers.get(session_id, session_id)
