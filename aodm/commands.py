"""What each CLI command does, given its parsed arguments. Parsing and error reporting live
in `aodm.cli`; every function here returns the exit status and prints to stdout."""

import asyncio
import sys
from contextlib import asynccontextmanager
from datetime import datetime
from urllib.parse import urlsplit

from aodm import state as files
from aodm.client import Client, with_credentials
from aodm.crypto import DecryptionFailed, Identity
from aodm.inbox import Inbox
from aodm.state import CliError, State
from shared.errors import AodmError, NoSessionKey, NotFound
from shared.notifications import KeyRotated, NewMessage, RequestFailed, SessionEstablished
from shared.session_api import MAX_PAGE
from shared.transport import LoginRefused

DRAIN_QUIET_S = 1.0  # `listen --once`: how long the queue must stay quiet to count as drained


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
    print(f"{'PEER':<{width}}  {'LAST ACTIVITY':<19}  SESSION")
    for chat in sorted(chat_list, key=lambda c: c.last_activity, reverse=True):
        ctx.state.remember_session(client.handle, chat.peer, chat.session_id)
        print(f"{chat.peer:<{width}}  {local_time(chat.last_activity)}  {chat.session_id}")
    return 0


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
    arrive within --timeout), then exit. Without: until Ctrl-C or --timeout of silence."""
    async with ctx.client() as client:
        await client.query_handle(client.handle)  # a typo must not create a queue for nobody
        peers: dict[str, str] = {}
        async with Inbox(client.bus, client.handle) as inbox:
            print(f"listening as {client.handle} (Ctrl-C to stop)", file=sys.stderr, flush=True)
            wait, shown = ctx.args.wait, 0
            while True:
                try:
                    note = await inbox.next(wait)
                except TimeoutError:
                    break
                print(await describe(client, note, peers), flush=True)
                shown += 1
                if ctx.args.once:
                    wait = DRAIN_QUIET_S
    if not shown:
        print(f"no notifications within {ctx.args.wait}s", file=sys.stderr)
    return 0


async def describe(client: Client, note, peers: dict[str, str]) -> str:
    match note:
        case NewMessage():
            return line(note.timestamp, note.sender, await readable(client, note.session_id, note.generation, note.content))
        case SessionEstablished():
            peers[note.session_id] = note.peer
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
