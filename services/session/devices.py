"""Every current device of a handle acts as it in its sessions (protocol §10.8).

The registry sends the session service a handle's devices after each change (`DevicesOf`,
internal, carrying the device log's Seq). Whichever worker takes it stores the newest set
(session.handle_devices: an older Seq never replaces a newer one) and, in the same
transaction, NOTIFYs; every worker listens and forgets the handle, so its next request
reads the new set. A handle the registry never told of has the one device Spawn gave it.
While a worker's listening connection is away it may have missed a change: it forgets
every handle when it listens again."""

import asyncio
from collections import OrderedDict

import asyncpg
import msgspec

from aodm.encoding import b64decode
from aodm.session_api import DevicesOf
from services.session import store
from shared.db import DatabaseUnavailable
from shared.logs import log

CHANNEL = "session_devices"
RELISTEN_S = 1.0
devices_decoder = msgspec.json.Decoder(DevicesOf)


class Devices:
    """The devices of the handles this worker has seen lately, each forgotten when it changes."""

    def __init__(self, capacity: int = 100_000) -> None:
        self._cache: OrderedDict[str, dict[bytes, bytes] | None] = OrderedDict()  # signing key -> box key
        self._capacity = capacity

    async def of(self, conn: asyncpg.Connection, handle: str) -> dict[bytes, bytes] | None:
        """A handle's current devices, signing key -> box key; None: the registry never told
        of any (the first device, as Spawn gave it)."""
        if handle in self._cache:
            self._cache.move_to_end(handle)
            return self._cache[handle]
        row = await store.handle_devices(conn, handle)
        found = None if row is None else {bytes(s): bytes(b) for s, b in zip(row["sign_keys"], row["box_keys"], strict=True)}
        self._cache[handle] = found
        if len(self._cache) > self._capacity:
            self._cache.popitem(last=False)
        return found

    def forget(self, handle: str) -> None:
        self._cache.pop(handle, None)

    def forget_all(self) -> None:
        self._cache.clear()

    async def listen(self, dsn: str, stop: asyncio.Event) -> None:
        """Until `stop`: forget each handle the moment another worker stores its change."""
        while not stop.is_set():
            try:
                conn = await asyncpg.connect(dsn)
            except (*DatabaseUnavailable, asyncpg.PostgresError) as exc:
                log.warning("device changes not heard yet", error=repr(exc))
                await asyncio.sleep(RELISTEN_S)
                continue
            try:
                await conn.add_listener(CHANNEL, lambda _c, _pid, _channel, handle: self.forget(handle))
                self.forget_all()  # what changed while nobody listened
                while not stop.is_set():
                    try:
                        await asyncio.wait_for(stop.wait(), RELISTEN_S)
                    except TimeoutError:  # still listening? (a silent cut shows only when used)
                        await asyncio.wait_for(conn.fetchval("SELECT 1"), RELISTEN_S)
            except Exception as exc:  # whatever cut it: listen again (a cache nobody corrects must not stay)
                log.warning("device changes: listening again", error=repr(exc))
            finally:
                conn.terminate()  # a listener holds nothing to finish
                self.forget_all()  # no change is heard until it listens again: read them afresh


async def store_devices(pool: asyncpg.Pool, body: bytes) -> None:
    """A DevicesOf from the registry: kept if newer than what is stored, and announced."""
    told = devices_decoder.decode(body)
    sign = [b64decode(d.sign_key, length=32) for d in told.devices]
    box = [b64decode(d.box_key, length=32) for d in told.devices]
    async with pool.acquire() as conn, conn.transaction():
        if await store.set_handle_devices(conn, told.handle, told.seq, sign, box):
            await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, told.handle)
