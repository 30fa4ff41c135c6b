"""The Python client: a typed method per action, plus the crypto that makes it a DM client.

    async with Client.connect(url, identity, handle="alice") as client:
        session = (await client.establish_session("bob")).session_id
        await client.rotate_session_key(session, "bob")
        await client.send_text(session, "hello")

`await Client.connect(...)` gives the same client without the block; close it with
`await client.close()`.
"""

import asyncio
import secrets
from collections.abc import Awaitable, Callable, Generator
from typing import Any, Generic, Self, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

import msgspec
from nacl.signing import SigningKey

from aodm import crypto, devices, envelope, topology
from aodm.devices import DeviceLog
from aodm.encoding import b64encode
from aodm.errors import (
    Forbidden,
    InvalidArgument,
    KeyOutdated,
    MalformedRequest,
    NoSessionKey,
    NotAccepted,
    Timeout,
    error_for,
)
from aodm.registry_api import (
    REGISTRY_TARGET,
    AddDevice,
    BrokerCredentials,
    ChatList,
    DeviceChange,
    DeviceKeys,
    DeviceLogPage,
    Established,
    EstablishSession,
    GetChatList,
    GetDeviceLog,
    GetHandles,
    HandleInfo,
    HandleList,
    IssueBrokerCredentials,
    QueryHandle,
    QuerySession,
    Register,
    Registered,
    RemoveDevice,
    SessionRef,
)
from aodm.replies import Err, reply_decoder
from aodm.session_api import (
    Accept,
    Block,
    Consent,
    ConsentState,
    GetCurrentKey,
    GetKeyByGeneration,
    KeyBatch,
    MessagePage,
    Order,
    QueryMessage,
    Rotated,
    RotateSessionKey,
    SealedKey,
    SendMessage,
    Sent,
    Shared,
    ShareKeys,
    StoredMessage,
    Unblock,
)
from aodm.transport import Bus

__all__ = ["Client", "Connecting", "NoHandle", "with_credentials"]

T = TypeVar("T")
C = TypeVar("C", bound="Client")
_encoder = msgspec.json.Encoder()
_DEVICES_SETTLE_TRIES = 6  # a rotation refused for a device list the session has not caught up with: ~2 s


async def _once_devices_settle(call: Callable[[], Awaitable[T]]) -> T:
    """`call()`, again a moment later while it is refused for a device list the session
    workers have not caught up with (they learn of a change a moment after the registry)."""
    for attempt in range(1, _DEVICES_SETTLE_TRIES):
        try:
            return await call()
        except InvalidArgument as exc:
            if "current device" not in exc.message:
                raise
            await asyncio.sleep(0.1 * attempt)
    return await call()


def _recovery_seed(secret: str) -> bytes:
    """The 32-byte seed of a recovery secret (64 hex digits); MalformedRequest otherwise."""
    try:
        seed = bytes.fromhex(secret.strip())
    except ValueError:
        seed = b""
    if len(seed) != 32:
        raise MalformedRequest("a recovery secret is 64 hex digits (as `aodm device recovery-key` printed it)")
    return seed


def with_credentials(url: str, user: str, password: str) -> str:
    """`url` (host, port, vhost, query) logging in as `user` instead."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class NoHandle(Exception):
    """The action needs a handle and the client acts as none yet."""


class Connecting(Generic[C]):
    """What `Client.connect` returns: `await` it for a connected client, or enter it with
    `async with` for one that is closed when the block ends, however it ends.

    Nothing connects until one of the two happens (a plain coroutine would warn that it was
    never awaited if only entered)."""

    def __init__(self, open_client: Callable[[], Awaitable[C]]) -> None:
        self._open_client = open_client
        self._client: C | None = None

    def __await__(self) -> Generator[Any, None, C]:
        return self._open_client().__await__()

    async def __aenter__(self) -> C:
        self._client = await self._open_client()
        return self._client

    async def __aexit__(self, *exc_info: object) -> None:
        if self._client is not None:
            await self._client.close()


class Client:
    """A connection to an aodm deployment acting for one identity (and, once chosen or
    registered, one of its handles). Every request is signed by `identity`; session keys are
    opened with its box key and cached per (session, generation).

    Build one with `Client.connect` (or from an open `Bus`); it is an async context manager
    that closes its connection at the end of the block."""

    def __init__(
        self, bus: Bus, identity: crypto.Identity, handle: str | None = None, *, timeout: float = 15.0
    ) -> None:
        """`timeout`: seconds to wait for each reply before raising `Timeout`."""
        self.bus = bus
        self.identity = identity
        self.handle = handle
        self.timeout = timeout
        self._keys: dict[tuple[str, int], bytes] = {}
        self._current: dict[str, int] = {}
        # The handle's own broker login, once issued (Register, IssueBrokerCredentials).
        self.broker_user: str | None = None
        self.broker_password: str | None = None

    @classmethod
    def connect(
        cls, url: str, identity: crypto.Identity, handle: str | None = None, *, timeout: float = 15.0
    ) -> Connecting[Self]:
        """Connect to the broker at `url` (amqp://user:password@host:port/vhost) as `identity`,
        acting as `handle` if given. Use as `await Client.connect(...)` or
        `async with Client.connect(...) as client:` (closed at the end of the block)."""

        async def open_client() -> Self:
            bus = await Bus.connect(url, name=f"aodm-client-{handle or identity.address[:8]}")
            return cls(bus, identity, handle, timeout=timeout)

        return Connecting(open_client)

    async def close(self) -> None:
        """Close the connection (pending replies are cancelled)."""
        await self.bus.close()

    async def __aenter__(self) -> Self:
        """The client itself: `async with client:` closes it at the end of the block."""
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Close the connection, however the block ended."""
        await self.close()

    # -- the envelope round trip -------------------------------------------------------

    def sign(self, target: str, action: str, data: msgspec.Struct, *, as_handle: bool = True) -> envelope.Envelope:
        """A signed envelope for `action` on `target` carrying `data`, from this client's handle
        (`as_handle`) or from the identity's own address (actions that need no handle)."""
        return envelope.sign(
            self.identity.signing_key,
            target=target,
            from_=self.handle if as_handle else None,
            action=action,
            data=_encoder.encode(data).decode(),
            anchor=b64encode(secrets.token_bytes(16)),
        )

    async def send_envelope(self, env: envelope.Envelope) -> msgspec.Raw:
        """Publish, wait for the reply, raise the typed error of an `Err`."""
        return await self.result_of(env, await self.submit(env))

    async def submit(self, env: envelope.Envelope) -> "asyncio.Future[bytes]":
        """Publish (confirmed) without waiting for the reply: requests keep their order."""
        return await self.bus.request(topology.REQUESTS, env.target, envelope.encode(env))

    async def result_of(self, env: envelope.Envelope, reply: "asyncio.Future[bytes]") -> msgspec.Raw:
        """The reply to a `submit`ted envelope: its raw result, or the typed error of an `Err`;
        `Timeout` after `timeout` seconds."""
        try:
            body = await asyncio.wait_for(reply, self.timeout)
        except TimeoutError:
            raise Timeout(f"no reply to {env.action} within {self.timeout}s") from None
        decoded = reply_decoder.decode(body)
        if isinstance(decoded, Err):
            raise error_for(decoded.code, decoded.message, decoded.retry_after)
        return decoded.result

    async def call(self, target: str, data: msgspec.Struct, result: type[T], *, as_handle: bool = True) -> T:
        """Sign `data` as the action named by its type, send it to `target`, decode the result."""
        env = self.sign(target, type(data).__name__, data, as_handle=as_handle)
        return msgspec.json.decode(await self.send_envelope(env), type=result)

    # -- registry ----------------------------------------------------------------------

    async def register(self, handle: str) -> HandleInfo:
        """Claim `handle`. When the deployment issues per-handle broker users, the result
        also carries one: its password is opened here, and `broker_url` is then ready."""
        info = await self.call(REGISTRY_TARGET, Register(handle, self.identity.box_public), Registered, as_handle=False)
        self.handle = handle
        self._take(info.broker_user, info.sealed_broker_password)
        return HandleInfo(handle=info.handle, sign_key=info.sign_key, box_key=info.box_key, created_at=info.created_at)

    async def issue_broker_credentials(self) -> str | None:
        """A new password for this handle's broker user (the old one stops working for new
        connections). Returns the new `broker_url`, or None when the deployment issues none."""
        issued = await self.call(REGISTRY_TARGET, IssueBrokerCredentials(), BrokerCredentials)
        self._take(issued.broker_user, issued.sealed_broker_password)
        return self.broker_url if issued.broker_user else None

    def _take(self, user: str | None, sealed: str | None) -> None:
        if user and sealed:
            self.broker_user = user
            self.broker_password = crypto.open_sealed(sealed, self.identity.box_key).decode()

    @property
    def acting_as(self) -> str:
        """The handle this client acts as; `NoHandle` while it has none."""
        if self.handle is None:
            raise NoHandle("this client acts as no handle: register one, or connect with handle=")
        return self.handle

    @property
    def broker_url(self) -> str | None:
        """This connection's URL (host, port, vhost) with the handle's own broker login."""
        if self.broker_user is None or self.broker_password is None:
            return None
        return with_credentials(self.bus.url, self.broker_user, self.broker_password)

    async def query_handle(self, handle: str) -> HandleInfo:
        """A handle's public keys and creation time (`NotFound` if nobody registered it)."""
        return await self.call(REGISTRY_TARGET, QueryHandle(handle), HandleInfo, as_handle=False)

    async def get_handles(self, owner: str | None = None) -> list[HandleInfo]:
        """The handles registered by `owner` (an identity's address; default: this identity)."""
        result = await self.call(REGISTRY_TARGET, GetHandles(owner or self.identity.address), HandleList, as_handle=False)
        return result.handles

    async def query_session(self, handle_a: str, handle_b: str) -> str | None:
        """The id of the session between two handles, or None if there is none yet."""
        return (await self.call(REGISTRY_TARGET, QuerySession(handle_a, handle_b), SessionRef, as_handle=False)).session_id

    async def establish_session(self, peer: str) -> Established:
        """Open (or find) the session between this client's handle and `peer`; `created` says
        which. A new session is a message request to `peer` until it accepts."""
        return await self.call(REGISTRY_TARGET, EstablishSession(peer), Established)

    async def get_chat_list(self) -> ChatList:
        """Every session of this client's handle, with its peer, last activity and consent state."""
        return await self.call(REGISTRY_TARGET, GetChatList(), ChatList)

    # -- devices -----------------------------------------------------------------------

    async def device_log(self, handle: str | None = None) -> DeviceLog:
        """`handle`'s device log (default: this client's), every page of it, replayed here
        by the protocol's rules (aodm.devices): the devices it has now, whatever the server
        says. `InvalidArgument` (or the entry's own error) if the log does not hold."""
        handle = handle or self.acting_as
        entries: list[bytes] = []
        while True:
            page = await self.call(REGISTRY_TARGET, GetDeviceLog(handle, len(entries)), DeviceLogPage, as_handle=False)
            entries += [e.entry.encode() for e in page.entries]
            if len(entries) >= page.seq or not page.entries:
                break
        log = devices.verify_log(handle, entries)
        if log.head != page.head or set(log.devices) != {d.device_id for d in page.devices}:
            raise InvalidArgument(f"the registry's device list of {handle!r} is not what its log says")
        return log

    async def inbox_queue(self) -> str:
        """This device's own notification queue (every device of a handle gets every
        notification, each in its own queue)."""
        mine = self.device_id
        log = await self.device_log()
        if mine not in log.devices:
            raise NoHandle(f"this identity is no current device of {self.acting_as!r}")
        return topology.device_inbox(log.handle, mine, log.devices[mine].added_seq)

    @property
    def device_id(self) -> str:
        """This identity's device id (the same in every handle it is a device of)."""
        return devices.device_id(bytes(self.identity.signing_key.verify_key))

    async def add_device(self, code: str) -> DeviceChange:
        """Add the device whose `code` (aodm.devices.device_code, made on the new device) is
        given, signed by this device."""
        handle, keys, proof = devices.read_device_code(code)
        if handle != self.acting_as:
            raise InvalidArgument(f"the code is for {handle!r}, not {self.acting_as!r}")
        log = await self.device_log()
        return await self.call(REGISTRY_TARGET, AddDevice(keys, proof, log.head), DeviceChange)

    async def remove_device(self, device_id: str) -> DeviceChange:
        """Remove another device of this handle: its queue and broker login go, and its key
        is refused from then on."""
        log = await self.device_log()
        return await self.call(REGISTRY_TARGET, RemoveDevice(device_id, log.head), DeviceChange)

    async def add_recovery_key(self) -> str:
        """A new recovery key for this handle, added by this device: returns its secret, 64
        hex digits (keep it offline; with it `recover` adds a device when every device is
        lost). Hex, not base64url: a secret starting with "-" would read as an option on a
        command line."""
        recovery = SigningKey.generate()
        await self.add_device(devices.device_code(self.acting_as, recovery, None))
        return bytes(recovery).hex()

    async def rotate_all(self) -> list[str]:
        """A new key, sealed to the devices of now, in every session of this handle that
        takes one (accepted, or a request of its own): run it after the handle's devices
        change, so that a removed device reads nothing sent after and a new one reads it
        all. Returns the sessions rotated."""
        rotated = []
        for chat in (await self.get_chat_list()).chats:
            if chat.state in ("accepted", "outgoing"):
                try:
                    await self.rotate_session_key(chat.session_id, chat.peer)
                except (NotAccepted, Forbidden):
                    continue  # a request past its generations, or a block: its next key comes later
                rotated.append(chat.session_id)
        return rotated

    async def recover(self, handle: str, recovery_secret: str) -> DeviceChange:
        """Make this identity a device of `handle` with the handle's recovery key (every
        device lost): the AddDevice is signed by the recovery key."""
        recovery = SigningKey(_recovery_seed(recovery_secret))
        keys = DeviceKeys(self.identity.sign_public, self.identity.box_public)
        proof = devices.sign_claim(self.identity.signing_key, handle, keys)
        log = await self.device_log(handle)
        env = envelope.sign(recovery, target=REGISTRY_TARGET, from_=handle, action="AddDevice",
                            data=_encoder.encode(AddDevice(keys, proof, log.head)).decode(),
                            anchor=b64encode(secrets.token_bytes(16)))
        change = msgspec.json.decode(await self.send_envelope(env), type=DeviceChange)
        self.handle = handle
        return change

    # -- session -----------------------------------------------------------------------

    async def rotate_session_key(self, session_id: str, peer: str, session_key: bytes | None = None) -> int:
        """Seal a fresh key to every current device of both members, each read from the
        member's device log as verified here (steps 1–4 of the seed, for every device)."""
        new_key = session_key or crypto.new_session_key()

        async def rotate() -> int:
            keys = []
            for handle in sorted({self.acting_as, peer}):
                for box_key in await self._device_boxes(handle):
                    keys.append(SealedKey(handle, box_key, crypto.seal_session_key(new_key, box_key)))
            return (await self.call(session_id, RotateSessionKey(keys), Rotated)).generation

        generation = await _once_devices_settle(rotate)
        self._keys[(session_id, generation)] = new_key
        self._current[session_id] = generation
        return generation

    async def _device_boxes(self, handle: str) -> list[str]:
        """The box keys of `handle`'s current devices, oldest first, from its verified log."""
        log = await self.device_log(handle)
        return [d.box_key for d in sorted(log.devices.values(), key=lambda d: d.added_seq)
                if d.kind == "device" and d.box_key]

    async def share_keys(self, session_id: str) -> int:
        """Give this handle's other current devices every key of the session that this
        device can open and they lack (a device added after those keys were sealed), so
        they read the history too. Returns how many keys were added."""
        try:
            current = (await self.get_current_key(session_id)).generation
        except NoSessionKey:
            return 0
        added = 0
        boxes = await self._device_boxes(self.acting_as)
        for generation in range(1, current + 1):
            batch = await self.get_key_by_generation(session_id, generation)
            have = {k.box_key for k in batch.keys if k.handle == self.acting_as}
            missing = [box for box in boxes if box not in have]
            if self.identity.box_public not in have or not missing:
                continue  # not this device's to give, or nothing to give
            key = self._open(session_id, batch)
            keys = [SealedKey(self.acting_as, box, crypto.seal_session_key(key, box)) for box in missing]

            async def share(keys: list[SealedKey] = keys, generation: int = generation) -> int:
                return (await self.call(session_id, ShareKeys(generation, keys), Shared)).added

            added += await _once_devices_settle(share)
        return added

    async def share_history(self) -> int:
        """`share_keys` in every session of this handle: run it on an old device after adding
        a new one. Returns how many keys were added."""
        return sum([await self.share_keys(chat.session_id) for chat in (await self.get_chat_list()).chats])

    async def get_current_key(self, session_id: str) -> KeyBatch:
        """The session's newest key batch (`NoSessionKey` before the first rotation)."""
        return await self.call(session_id, GetCurrentKey(), KeyBatch)

    async def get_key_by_generation(self, session_id: str, generation: int) -> KeyBatch:
        """The session's key batch of `generation` (to read messages sent under an older key)."""
        return await self.call(session_id, GetKeyByGeneration(generation), KeyBatch)

    async def send_message(self, session_id: str, content: str, generation: int) -> Sent:
        """`generation`: the key batch `content` is encrypted under (the service requires it:
        it cannot know which key a sender used)."""
        return await self.call(session_id, SendMessage(content, generation), Sent)

    async def query_messages(
        self,
        session_id: str,
        *,
        from_: int | None = None,
        until: int | None = None,
        limit: int = 50,
        order: Order = "asc",
        cursor: str | None = None,
    ) -> MessagePage:
        """One page of stored messages, `from_`/`until` bounding their timestamps (ms), oldest
        first for `order="asc"`; pass the page's `next_cursor` as `cursor` for the next one."""
        return await self.call(session_id, QueryMessage(from_, until, limit, order, cursor), MessagePage)

    async def accept(self, session_id: str) -> ConsentState:
        """Accept the peer's message request (or lift your own block); answers the state now."""
        return (await self.call(session_id, Accept(), Consent)).state

    async def block(self, session_id: str) -> ConsentState:
        """Refuse the peer's messages from now on (it is answered `not_accepted`)."""
        return (await self.call(session_id, Block(), Consent)).state

    async def unblock(self, session_id: str) -> ConsentState:
        """Lift your block of the peer: the session is accepted again; answers the state now."""
        return (await self.call(session_id, Unblock(), Consent)).state

    # -- plaintext on top --------------------------------------------------------------

    def _open(self, session_id: str, batch: KeyBatch) -> bytes:
        mine = next((k for k in batch.keys if k.handle == self.handle and k.box_key == self.identity.box_public), None)
        if mine is None:
            raise crypto.DecryptionFailed(
                f"generation {batch.generation} holds no key for this device of {self.handle!r} "
                f"(sealed before it was added: a newer generation is)")
        key = crypto.open_session_key(mine.sealed_key, self.identity.box_key)
        self._keys[(session_id, batch.generation)] = key
        return key

    async def session_key(self, session_id: str, generation: int | None = None) -> tuple[int, bytes]:
        """The key of a generation (default: current), fetched and opened once, then cached."""
        if generation is None:
            generation = self._current.get(session_id)
            if generation is None:
                batch = await self.get_current_key(session_id)
                self._current[session_id] = batch.generation
                return batch.generation, self._open(session_id, batch)
        if (session_id, generation) not in self._keys:
            self._open(session_id, await self.get_key_by_generation(session_id, generation))
        return generation, self._keys[(session_id, generation)]

    async def send_text(self, session_id: str, text: str) -> Sent:
        """Encrypt `text` under the session's current key and send it. If a member's
        devices changed since that key (`KeyOutdated`), seal a new one to the devices of now
        and send under it (the refused message was not stored)."""
        generation, key = await self.session_key(session_id)
        try:
            return await self.send_message(session_id, crypto.encrypt(key, text), generation)
        except KeyOutdated:
            batch = await self.get_current_key(session_id)
            peer = next((k.handle for k in batch.keys if k.handle != self.acting_as), self.acting_as)
            generation = await self.rotate_session_key(session_id, peer)
            _, key = await self.session_key(session_id, generation)
            return await self.send_message(session_id, crypto.encrypt(key, text), generation)

    async def decrypt(self, session_id: str, generation: int, content: str) -> str:
        """The plaintext of `content`, encrypted under the session key of `generation`."""
        _, key = await self.session_key(session_id, generation)
        return crypto.decrypt(key, content)

    async def read_text(self, session_id: str, message: StoredMessage) -> str:
        """The plaintext of a stored message (`crypto.DecryptionFailed` if it does not open)."""
        return await self.decrypt(session_id, message.generation, message.content)

    async def history(
        self,
        session_id: str,
        *,
        from_: int | None = None,
        until: int | None = None,
        limit: int = 50,
        order: Order = "asc",
        cursor: str | None = None,
    ) -> list[StoredMessage]:
        """Every message matching the query (as in `query_messages`; `limit` is the page
        size), following cursors to the end."""
        messages: list[StoredMessage] = []
        while True:
            page = await self.query_messages(
                session_id, from_=from_, until=until, limit=limit, order=order, cursor=cursor
            )
            messages += page.messages
            if page.next_cursor is None:
                return messages
            cursor = page.next_cursor
