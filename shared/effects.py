"""Outgoing effects: messages a request publishes once its transaction has committed.

A batch of requests yields many small events; `merge` folds them so the notifier gets one
ordered Fanout per batch and the registry one activity update per session."""

import msgspec

from shared import topology
from shared.notifications import Fanout, event_decoder
from shared.registry_api import Activity, ActivityReport


class Outgoing(msgspec.Struct, array_like=True):
    exchange: str
    routing_key: str
    body: bytes


effects_decoder = msgspec.json.Decoder(list[Outgoing])
_activity_decoder = msgspec.json.Decoder(Activity)
_encoder = msgspec.json.Encoder()

MAX_FANOUT = 256


def encode(effects: list[Outgoing]) -> bytes:
    return _encoder.encode(effects)


def merge(effects: list[Outgoing]) -> list[Outgoing]:
    """Same messages, fewer publishes: everything else first in its order (a Spawn or a
    HandleRegistered must precede notifications about it), then the notifications in their
    order, then one report of the latest activity per session."""
    passthrough: list[Outgoing] = []
    notifications = []
    activity: dict[str, int] = {}
    for effect in effects:
        if effect.exchange == topology.INTERNAL and effect.routing_key == topology.NOTIFIER_ROUTING_KEY:
            event = event_decoder.decode(effect.body)
            if isinstance(event, Fanout):
                notifications += event.notifications
                continue
        elif effect.exchange == topology.INTERNAL and effect.routing_key == topology.ACTIVITY_ROUTING_KEY:
            seen = _activity_decoder.decode(effect.body)
            activity[seen.session_id] = max(activity.get(seen.session_id, 0), seen.at)
            continue
        passthrough.append(effect)
    merged = passthrough
    for start in range(0, len(notifications), MAX_FANOUT):
        chunk = Fanout(notifications[start : start + MAX_FANOUT])
        merged.append(Outgoing(topology.INTERNAL, topology.NOTIFIER_ROUTING_KEY, _encoder.encode(chunk)))
    if activity:
        report = ActivityReport([Activity(session_id, at) for session_id, at in activity.items()])
        merged.append(Outgoing(topology.INTERNAL, topology.ACTIVITY_ROUTING_KEY, _encoder.encode(report)))
    return merged
