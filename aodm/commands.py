"""What each CLI command does, given its parsed arguments. Parsing and error reporting live
in `aodm.cli`; every function here returns the exit status and shows its result through
`ctx.out` (text for people, or one JSON document with --json: aodm/output.py). `listen`
and `chat` live in aodm/listen.py and aodm/chat.py."""

import argparse
import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

from aodm import state as files
from aodm import views
from aodm.client import Client, with_credentials
from aodm.crypto import Identity
from aodm.errors import AodmError, NoSessionKey
from aodm.output import Document, Output, local_time, moment
from aodm.registry_api import Chat
from aodm.session_api import MAX_PAGE, Order, StoredMessage
from aodm.state import CliError, State
from aodm.transport import LoginRefused


def safe_url(url: str) -> str:
    """The broker URL without its password, for messages."""
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or 5672}{parts.path or '/'}"


class Context:
    """The identity, its state and a connection, opened only by the commands that need them."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.path = files.identity_path(args.identity)
        self.out = Output(getattr(args, "json", False))

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
    async def client(self, *, need_handle: bool = True, own_login: bool = True) -> AsyncIterator[Client]:
        """A connected client acting as the chosen handle (when the command needs one). It
        logs in to the broker as the handle's own broker user when the state holds one
        (host, port and vhost still come from --amqp-url), else with --amqp-url's login."""
        identity = self.identity
        known = (self.args.as_handle or self.state.default_handle) if need_handle else None
        login = self.broker_login(known) if own_login else None
        url = with_credentials(self.args.amqp_url, login["user"], login["password"]) if login else self.args.amqp_url
        connect = Client.connect(url, identity, timeout=self.args.timeout)
        try:  # a connect cut short here leaves a task behind: aodm.cli.run does not wait for it
            client = await asyncio.wait_for(connect, self.args.timeout)
        except TimeoutError:
            where = safe_url(self.args.amqp_url)
            raise CliError(f"no answer from the broker at {where} within {self.args.timeout:g}s", "timeout") from None
        except LoginRefused:
            if not login:
                raise
            raise CliError(
                f"the broker refused {known}'s stored broker login (user {login['user']}); "
                f"`aodm credentials --as {known}` issues a new password", "broker_login_refused"
            ) from None
        try:
            if need_handle:
                client.handle = await self.handle(client)
            yield client
        finally:
            await client.close()

    async def handle(self, client: Client) -> str:
        """--as, else the remembered default, else the identity's only registered handle."""
        chosen: str | None = self.args.as_handle
        if chosen:
            return chosen
        if self.state.default_handle:
            return self.state.default_handle
        handles = sorted(h.handle for h in await client.get_handles())
        if not handles:
            raise CliError("this identity has no handle yet; register one with `aodm register NAME`", "no_handle")
        if len(handles) > 1:
            raise CliError(f"this identity has several handles ({', '.join(handles)}); choose one with --as",
                           "ambiguous_handle")
        self.state.default_handle = handles[0]
        self.state.save()
        return handles[0]


# -- identity -------------------------------------------------------------------------


def identity_new(ctx: Context) -> int:
    identity = files.create_identity(ctx.path, ctx.args.force)
    State(files.state_path(ctx.path), identity.address).save()
    ctx.out.emit({"file": str(ctx.path), **public_keys(identity)},
                 f"created {ctx.path}\n" + identity_lines(identity))
    return 0


def identity_show(ctx: Context) -> int:
    handle = ctx.state.default_handle
    ctx.out.emit({"file": str(ctx.path), **public_keys(ctx.identity), "handle": handle},
                 f"file:    {ctx.path}\n{identity_lines(ctx.identity)}\n"
                 f"handle:  {handle or '(none yet; aodm register NAME)'}")
    return 0


def public_keys(identity: Identity) -> Document:
    return {"address": identity.address, "box_key": identity.box_public}


def identity_lines(identity: Identity) -> str:
    return f"address: {identity.address}\nbox key: {identity.box_public}"


# -- registry -------------------------------------------------------------------------


async def register(ctx: Context) -> int:
    """Registering a handle this identity already owns is a no-op, not an error."""
    async with ctx.client(need_handle=False) as client:
        try:
            info = await client.register(ctx.args.handle)
            status = "registered"
        except AodmError as exc:
            if exc.code != "already_exists":
                raise
            info = await client.query_handle(ctx.args.handle)
            if info.sign_key != ctx.identity.address:
                raise CliError(f"already_exists: the handle {ctx.args.handle!r} is taken by someone else",
                               "already_exists") from None
            status = "already_yours"
    ctx.state.default_handle = info.handle
    ctx.state.save()
    text = f"{status.replace('_', ' ')}: {info.handle} (since {local_time(info.created_at)}); it is now the default handle"
    password = client.broker_password
    broker_user = client.broker_user if password else None
    if broker_user and password:
        ctx.state.remember_broker(info.handle, broker_user, password)
        text += (f"\nbroker login: {broker_user} (it may read only {info.handle}'s notifications); "
                 f"kept in {ctx.state.path}")
    ctx.out.emit({"handle": info.handle, "status": status, "created_at": moment(info.created_at),
                  "default": True, "broker_user": broker_user}, text)
    return 0


async def credentials(ctx: Context) -> int:
    """Issue a new password for the handle's own broker user and keep it in the state. It
    logs in with --amqp-url's login, since the stored one may be the lost or stale one."""
    async with ctx.client(own_login=False) as client:
        url = await client.issue_broker_credentials()
    if url is None or client.broker_user is None or client.broker_password is None:
        ctx.out.emit({"handle": client.handle, "issued": False, "broker_user": None},
                     f"the broker at {safe_url(ctx.args.amqp_url)} issues no per-handle broker users; "
                     "--amqp-url's login is used for everything")
        return 0
    ctx.state.remember_broker(client.acting_as, client.broker_user, client.broker_password)
    ctx.out.emit({"handle": client.handle, "issued": True, "broker_user": client.broker_user,
                  "state_file": str(ctx.state.path)},
                 f"new broker password for {client.broker_user} ({client.handle}); the old one no longer logs in. "
                 f"Kept in {ctx.state.path}")
    return 0


async def chats(ctx: Context) -> int:
    async with ctx.client() as client:
        chat_list = sorted((await client.get_chat_list()).chats, key=lambda c: c.last_activity, reverse=True)
    for chat in chat_list:
        ctx.state.remember_session(client.acting_as, chat.peer, chat.session_id)
    document = {"handle": client.handle, "chats": [
        {"peer": c.peer, "state": c.state, "session_id": c.session_id, "last_activity": moment(c.last_activity)}
        for c in chat_list]}
    ctx.out.emit(document, chat_table(chat_list) if chat_list else
                 f"{client.handle} has no chats yet; start one with `aodm open PEER`")
    return 0


def chat_table(chat_list: list[Chat]) -> str:
    width = max(len("PEER"), *(len(c.peer) for c in chat_list))
    rows = [f"{'PEER':<{width}}  {'STATE':<8}  {'LAST ACTIVITY':<26}  SESSION"]
    rows += [f"{c.peer:<{width}}  {c.state:<8}  {local_time(c.last_activity)}  {c.session_id}" for c in chat_list]
    return "\n".join(rows)


# -- message requests ---------------------------------------------------------------


async def requests(ctx: Context) -> int:
    """The sessions others opened with you that you have not accepted, with what they hold."""
    found, lines = [], []
    async with ctx.client() as client:
        incoming = [c for c in (await client.get_chat_list()).chats if c.state == "incoming"]
        for chat in incoming:
            ctx.state.remember_session(client.acting_as, chat.peer, chat.session_id)
            messages = (await client.query_messages(chat.session_id)).messages
            shown = [await views.stored(client, chat.session_id, chat.peer, m) for m in messages]
            found.append({"peer": chat.peer, "session_id": chat.session_id, "messages": [doc for doc, _ in shown]})
            lines.append(f"request from {chat.peer} ({len(messages)} message{'s' * (len(messages) != 1)}):")
            lines += ["  " + text for _, text in shown]
    lines.append("answer with `aodm accept PEER` or `aodm block PEER`" if found
                 else f"{client.handle} has no message requests")
    ctx.out.emit({"handle": client.handle, "requests": found}, "\n".join(lines))
    return 0


async def session_with(ctx: Context, client: Client, peer: str) -> str:
    session_id = await client.query_session(client.acting_as, peer)
    if session_id is None:
        raise CliError(f"{client.handle} has no chat with {peer}", "no_chat")
    ctx.state.remember_session(client.acting_as, peer, session_id)
    return session_id


def consent(change: str) -> Callable[[Context], Awaitable[int]]:
    """`aodm accept|block|unblock PEER`."""
    async def run(ctx: Context) -> int:
        async with ctx.client() as client:
            session_id = await session_with(ctx, client, ctx.args.peer)
            state = await getattr(client, change)(session_id)
        ctx.out.emit({"peer": ctx.args.peer, "session_id": session_id, "state": state},
                     f"chat with {ctx.args.peer}: {state}")
        return 0
    return run


# -- sessions -------------------------------------------------------------------------


async def ensure_session(ctx: Context, client: Client, peer: str) -> tuple[str, bool, int]:
    """Establish (or find) the chat with `peer`; give it a first key if it has none.
    Returns the session id, whether it is new, and the current key generation."""
    established = await client.establish_session(peer)
    session_id = established.session_id
    ctx.state.remember_session(client.acting_as, peer, session_id)
    try:
        generation, _ = await client.session_key(session_id)
    except NoSessionKey:
        generation = await client.rotate_session_key(session_id, peer)
    return session_id, established.created, generation


async def open_chat(ctx: Context) -> int:
    async with ctx.client() as client:
        session_id, created, generation = await ensure_session(ctx, client, ctx.args.peer)
    ctx.out.emit({"peer": ctx.args.peer, "session_id": session_id, "created": created, "generation": generation},
                 f"{'new' if created else 'existing'} session with {ctx.args.peer} (key generation {generation}):\n"
                 f"{session_id}")
    return 0


def message_text(words: list[str]) -> str:
    """The words of `aodm send`, joined; a message with nothing to read is refused."""
    text = " ".join(words)
    if not text.strip():
        raise CliError("the message is empty: nothing was sent", "empty_message")
    return text


async def send(ctx: Context) -> int:
    text = message_text(ctx.args.text)
    async with ctx.client() as client:
        session_id, _, _ = await ensure_session(ctx, client, ctx.args.peer)
        sent = await client.send_text(session_id, text)
    ctx.out.emit({"peer": ctx.args.peer, "session_id": session_id, "seq": sent.seq, **moment(sent.timestamp),
                  "generation": sent.generation},
                 f"sent #{sent.seq} to {ctx.args.peer} at {local_time(sent.timestamp)} (key generation {sent.generation})")
    return 0


async def rotate(ctx: Context) -> int:
    async with ctx.client() as client:
        session_id = (await client.establish_session(ctx.args.peer)).session_id
        ctx.state.remember_session(client.acting_as, ctx.args.peer, session_id)
        generation = await client.rotate_session_key(session_id, ctx.args.peer)
    ctx.out.emit({"peer": ctx.args.peer, "session_id": session_id, "generation": generation},
                 f"rotated the key of the session with {ctx.args.peer}: now generation {generation}")
    return 0


async def history(ctx: Context) -> int:
    peer = ctx.args.peer
    async with ctx.client() as client:
        session_id = await client.query_session(client.acting_as, peer)
        if session_id is None:
            await client.query_handle(peer)  # not_found when the peer does not exist
            raise CliError(f"{client.handle} has no chat with {peer} yet; `aodm open {peer}` starts one", "no_chat")
        ctx.state.remember_session(client.acting_as, peer, session_id)
        shown = [await views.stored(client, session_id, peer, m) for m in await fetch(client, session_id, ctx.args)]
    document = {"peer": peer, "session_id": session_id, "messages": [doc for doc, _ in shown]}
    ctx.out.emit(document, "\n".join(text for _, text in shown) if shown else None)
    return 0


async def fetch(client: Client, session_id: str, args: argparse.Namespace) -> list[StoredMessage]:
    """All matching messages, or at most --limit of them (pages are capped at MAX_PAGE)."""
    order: Order = "desc" if args.desc else "asc"
    if args.limit is None:
        return await client.history(session_id, from_=args.since, order=order, limit=MAX_PAGE)
    messages: list[StoredMessage] = []
    cursor = None
    while len(messages) < args.limit:
        size = min(MAX_PAGE, args.limit - len(messages))
        page = await client.query_messages(session_id, from_=args.since, order=order, limit=size, cursor=cursor)
        messages += page.messages
        if (cursor := page.next_cursor) is None:
            break
    return messages
