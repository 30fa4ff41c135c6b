"""Fault injection for the reliability tests. Inert unless AODM_FAULTS is set.

AODM_FAULTS is a comma-separated list:
- `crash-after-commit=P`: with probability P, the process dies (os._exit, like kill -9)
  after a request's transaction committed and before its effects, reply and ack;
- `poison`: a request carrying the tag `Fault: poison` makes its handler raise, every time;
- `stall`: a request carrying the tag `Fault: stall` makes its handler hang past the
  handler timeout on its first attempt only;
- `stall-always`: a request tagged `Fault: stall-always` hangs on every attempt.
"""

import asyncio
import os
import random

from aodm.envelope import Envelope


def _parse(spec: str) -> dict[str, float]:
    faults = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, value = item.partition("=")
        faults[name] = float(value or 1)
    return faults


ACTIVE = _parse(os.environ.get("AODM_FAULTS", ""))
_stalled: set[str] = set()


class InjectedFault(RuntimeError):
    pass


def crash_point(name: str) -> None:
    probability = ACTIVE.get(name)
    if probability and random.random() < probability:
        os._exit(137)


async def before_handler(env: Envelope, timeout: float) -> None:
    if not ACTIVE:
        return
    fault = next((t.value for t in env.tags if t.name == "Fault"), None)
    if fault == "poison" and "poison" in ACTIVE:
        raise InjectedFault("injected poison")
    if fault == "stall" and "stall" in ACTIVE and env.id not in _stalled:
        _stalled.add(env.id)
        await asyncio.sleep(timeout * 2)
    if fault == "stall-always" and "stall-always" in ACTIVE:
        await asyncio.sleep(timeout * 2)
