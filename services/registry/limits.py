"""How many sessions a handle may open in an hour, and handles a signing key may register in
a day: counted in the database, so every registry replica sees the same count."""

from dataclasses import dataclass

from aodm.errors import RateLimited

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS


@dataclass(frozen=True)
class RegistryLimits:
    sessions_per_hour: int = 60
    handles_per_day: int = 10


def within(times: list[int], limit: int, window_ms: int, now: int, what: str) -> None:
    """`times` (oldest first) are the ones in the window: refuse the next once `limit` of
    them are, until the oldest that must leave the window has left it."""
    if len(times) >= limit:
        leaves = times[len(times) - limit] + window_ms
        raise RateLimited(f"{what}: {limit} allowed", leaves - now)
