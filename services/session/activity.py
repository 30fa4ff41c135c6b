"""The chat lists' last activity, reported to the registry a few times a second.

Reporting with every batch cost a registry transaction per batch: at a steady load, most of
the registry's CPU and a good share of the database's, and it doubled the latency of the
notifications. Activity is derived data (session.sessions.last_timestamp is the durable
truth), so the worker keeps the latest per session and sends one ActivityReport per
interval; on start it re-reports the sessions active lately, so what a crash loses is
restored when the worker comes back.

Handlers report with `touch`, which takes effect once their write has committed."""

import asyncio

import asyncpg
import msgspec

from aodm import topology
from aodm.envelope import now_ms
from aodm.registry_api import Activity, ActivityReport
from aodm.transport import BrokerError, Bus, Unroutable
from shared.actions import Context
from shared.logs import log

INTERVAL_S = 0.2
RECOVER_S = 600  # at start, re-report sessions active this recently
_encoder = msgspec.json.Encoder()


def touch(ctx: Context, session_id: str, at: int) -> None:
    """The session was active at `at` (its members' chat lists sort by it), once what the
    handler wrote has committed (the worker's feed is ctx.app.feed)."""
    feed: ActivityFeed = ctx.app.feed
    ctx.on_commit(lambda: feed.add([Activity(session_id, at)]))


class ActivityFeed:
    def __init__(self, bus: Bus) -> None:
        self._bus = bus
        self._latest: dict[str, int] = {}

    def add(self, activity: list[Activity]) -> None:
        for seen in activity:
            if seen.at > self._latest.get(seen.session_id, 0):
                self._latest[seen.session_id] = seen.at

    async def serve(self, pool: asyncpg.Pool) -> None:
        """Until cancelled (after the consumers have drained); a last report then."""
        rows = await pool.fetch(
            "SELECT session_id, last_timestamp FROM session.sessions WHERE last_timestamp > $1",
            now_ms() - RECOVER_S * 1000,
        )
        self.add([Activity(row["session_id"], row["last_timestamp"]) for row in rows])
        try:
            while True:
                await self.flush()
                await asyncio.sleep(INTERVAL_S)
        finally:
            await self.flush()

    async def flush(self) -> None:
        if not self._latest:
            return
        latest, self._latest = self._latest, {}
        report = ActivityReport([Activity(session_id, at) for session_id, at in latest.items()])
        try:
            await self._bus.publish(topology.INTERNAL, topology.ACTIVITY_ROUTING_KEY, _encoder.encode(report))
        except (*BrokerError, Unroutable) as exc:
            log.warning("activity report not sent; retrying", sessions=len(latest), error=repr(exc))
            self.add(report.sessions)
