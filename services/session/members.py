"""Who belongs to a session: created by the registry's Spawn, read on every request.

Members never change once spawned, so they are cached in memory after the first read. Who
may act as a member is any current device of its handle (devices.py): the one Spawn gave
until the registry tells of others."""

from collections import OrderedDict
from dataclasses import dataclass

import asyncpg
import msgspec

from aodm.encoding import b64decode
from aodm.envelope import Envelope, now_ms
from aodm.errors import Forbidden, NotFound, Unauthorized
from aodm.session_api import Spawn
from services.session import store
from services.session.devices import Devices
from shared.actions import Action


@dataclass(frozen=True)
class Members:
    sign_keys: dict[str, bytes]
    box_keys: dict[str, bytes]

    @property
    def handles(self) -> list[str]:
        return sorted(self.sign_keys)

    def other(self, handle: str) -> str:
        return next(h for h in self.sign_keys if h != handle)


class MemberDirectory:
    def __init__(self, devices: Devices | None = None, capacity: int = 100_000) -> None:
        self._cache: OrderedDict[str, Members] = OrderedDict()
        self._batches: OrderedDict[tuple[str, int], frozenset[tuple[str, bytes]]] = OrderedDict()
        self._capacity = capacity
        self.devices = devices or Devices()

    async def sealed_to(self, conn: asyncpg.Connection, session_id: str, generation: int) -> frozenset[tuple[str, bytes]] | None:
        """Whose devices a key batch seals to (a batch never changes: cached); None if there is none."""
        key = (session_id, generation)
        if key not in self._batches:
            rows = await store.sealed_to(conn, session_id, generation)
            if not rows:
                return None
            self._batches[key] = frozenset((row["handle"], bytes(row["box_key"])) for row in rows)
            if len(self._batches) > self._capacity:
                self._batches.popitem(last=False)
        return self._batches[key]

    def forget_batch(self, session_id: str, generation: int) -> None:
        """A batch got keys for more devices (ShareKeys); elsewhere a cached copy lacks them,
        which can only refuse a send (key_outdated), never take one it should not."""
        self._batches.pop((session_id, generation), None)

    async def devices_now(self, conn: asyncpg.Connection, members: Members) -> frozenset[tuple[str, bytes]]:
        """(handle, box key) of every current device of both members: what a batch must seal to."""
        now = []
        for handle in members.handles:
            now += [(handle, box) for box in (await self.device_keys(conn, members, handle)).values()]
        return frozenset(now)

    async def device_keys(self, conn: asyncpg.Connection, members: Members, handle: str) -> dict[bytes, bytes]:
        """The current devices of a member: signing key -> box key."""
        known = await self.devices.of(conn, handle)
        return known if known is not None else {members.sign_keys[handle]: members.box_keys[handle]}

    async def lookup(self, conn: asyncpg.Connection, session_id: str) -> Members | None:
        members = self._cache.get(session_id)
        if members is None:
            rows = await store.members(conn, session_id)
            if len(rows) != 2:
                return None
            members = Members(
                {r["handle"]: bytes(r["sign_key"]) for r in rows}, {r["handle"]: bytes(r["box_key"]) for r in rows}
            )
            self._cache[session_id] = members
            if len(self._cache) > self._capacity:
                self._cache.popitem(last=False)
        return members

    async def authenticate(self, conn: asyncpg.Connection, env: Envelope, action: Action) -> tuple[str, Members]:
        """Only the two members may call a session, reads included, each with its own key."""
        members = await self.lookup(conn, env.target)
        if members is None:
            raise NotFound(f"no session {env.target!r}")
        if env.from_ not in members.sign_keys:
            raise Forbidden(f"{env.from_!r} is not a member of this session")
        if b64decode(env.owner, field="Owner", length=32) not in await self.device_keys(conn, members, env.from_):
            raise Unauthorized(f"the key that signed is no current device of {env.from_!r}")
        return env.from_, members


spawn_decoder = msgspec.json.Decoder(Spawn)


async def spawn(pool: asyncpg.Pool, body: bytes) -> None:
    message = spawn_decoder.decode(body)
    members = [(m.handle, b64decode(m.sign_key, length=32), b64decode(m.box_key, length=32)) for m in message.members]
    if len(members) != 2:
        raise msgspec.ValidationError("a session has exactly two members")
    handles = [m.handle for m in message.members]
    if message.opened_by is not None and message.opened_by not in handles:
        raise msgspec.ValidationError("a session is opened by one of its members")
    # A request to the member that did not open it (None: accepted from the start).
    pending_for = next((h for h in handles if h != message.opened_by), None) if message.opened_by else None
    async with pool.acquire() as conn:
        await store.create_session(conn, message.session_id, now_ms(), members, pending_for)
