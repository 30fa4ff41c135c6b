"""How fast one sender may send: over all its sessions, and in one session (token buckets).

A session's requests all reach the worker that holds its shard, so the per-session limit
is exact. A sender's sessions may be spread over several workers, each counting on its own:
with N workers a sender may reach N times the per-sender rate. Defaults are far above what
a person types (docs/security.md); each is an AODM_* setting."""

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from aodm.errors import RateLimited

REQUEST_MESSAGES = 3  # messages a message request holds until it is accepted (consent.py)
MAX_KEYS = 100_000  # buckets kept; the least recently used is dropped (it is as good as full)


class Buckets:
    """`rate` tokens a second per key, up to `burst`; a request takes one."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self._clock = rate, burst, clock
        self._keys: OrderedDict[Hashable, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)

    def wait(self, key: Hashable) -> float:
        """Seconds until `key` has a token (0: it has one now)."""
        tokens, _ = self._refilled(key)
        return 0.0 if tokens >= 1 else (1 - tokens) / self.rate

    def take(self, key: Hashable) -> None:
        tokens, now = self._refilled(key)
        self._keys[key] = (tokens - 1, now)
        self._keys.move_to_end(key)
        if len(self._keys) > MAX_KEYS:
            self._keys.popitem(last=False)

    def _refilled(self, key: Hashable) -> tuple[float, float]:
        now = self._clock()
        tokens, at = self._keys.get(key, (self.burst, now))
        return min(self.burst, tokens + (now - at) * self.rate), now


@dataclass
class SendLimits:
    per_sender: Buckets
    per_session: Buckets
    request_messages: int = REQUEST_MESSAGES

    @classmethod
    def per_second(
        cls, sender: int, session: int, clock: Callable[[], float] = time.monotonic, request_messages: int = REQUEST_MESSAGES
    ) -> "SendLimits":
        """Bursts of ten seconds' worth."""
        return cls(Buckets(sender, 10 * sender, clock), Buckets(session, 10 * session, clock), request_messages)

    def take(self, sender: str, session: str) -> RateLimited | None:
        """Take one message's tokens, or say how long to wait (nothing is taken then)."""
        wait = max(self.per_sender.wait(sender), self.per_session.wait((sender, session)))
        if wait:
            return RateLimited(f"{sender} is sending faster than this deployment allows", round(wait * 1000))
        self.per_sender.take(sender)
        self.per_session.take((sender, session))
        return None
