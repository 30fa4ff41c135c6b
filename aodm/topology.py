"""Every exchange, queue and routing key name, the arguments they are declared with, and
the policy that bounds the inboxes.

Names read well on the management UI: `aodm.<owner>.<what>`, so a session shard, a
handle's inbox and the dead letters are told apart at a glance.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the declarations are the services'; a client only needs the names
    from aodm.transport import Bus

__all__ = [
    "REQUESTS",
    "SESSIONS",
    "SESSIONS_TYPE",
    "INTERNAL",
    "INBOX",
    "INBOX_QUEUE_PREFIX",
    "DEAD_LETTERS",
    "REGISTRY_ROUTING_KEY",
    "REGISTRY_QUEUE",
    "ACTIVITY_ROUTING_KEY",
    "ACTIVITY_QUEUE",
    "NOTIFIER_ROUTING_KEY",
    "NOTIFIER_QUEUE",
    "WORKERS_QUEUE",
    "SESSION_DEVICES_ROUTING_KEY",
    "SESSION_DEVICES_QUEUE",
    "DEAD_LETTER_QUEUE",
    "may_reply_to",
    "shard_queue",
    "inbox_queue",
    "device_inbox",
    "INBOX_POLICY",
    "INBOX_POLICY_PATTERN",
    "INBOX_POLICY_PRIORITY",
    "inbox_policies",
    "declare_exchanges",
    "declare_registry",
    "declare_session_shards",
    "declare_notifier",
    "declare_inbox",
    "declare_new_inbox",
    "declare_all",
]

# Clients publish every request here with routing key = Target.
REQUESTS = "aodm.requests"
# Session requests fall through REQUESTS (alternate exchange) into this modulus-hash
# exchange, which spreads session ids over the shard queues; Spawn is published here directly.
SESSIONS = "aodm.sessions"
# The rabbitmq_sharding plugin's exchange type: a session id's shard is its hash modulo the
# shard count, over the bound queues in name order, so it is the same after a broker
# restart. The consistent-hash exchange numbers its buckets in the order bindings are added,
# and a restart adds them again in another order (measured on RabbitMQ 3.10.8: 264 of 300
# session ids moved to another shard), which would split a session over two shards while
# the old one still holds some of its requests.
SESSIONS_TYPE = "x-modulus-hash"
# Service-to-service events (never written by clients).
INTERNAL = "aodm.internal"
# The notifier publishes here; routing key = handle; one queue per handle.
INBOX = "aodm.inbox"
INBOX_QUEUE_PREFIX = "aodm.inbox."
# Rejected poison messages land here.
DEAD_LETTERS = "aodm.dead-letters"

REGISTRY_ROUTING_KEY = "registry"
REGISTRY_QUEUE = "aodm.registry.requests"
ACTIVITY_ROUTING_KEY = "registry.activity"
ACTIVITY_QUEUE = "aodm.registry.activity"
NOTIFIER_ROUTING_KEY = "notifier.events"
NOTIFIER_QUEUE = "aodm.notifier.events"
WORKERS_QUEUE = "aodm.session.workers"
SESSION_DEVICES_ROUTING_KEY = "session.devices"
SESSION_DEVICES_QUEUE = "aodm.session.devices"
DEAD_LETTER_QUEUE = "aodm.dead-letters"

_DEAD = {"x-dead-letter-exchange": DEAD_LETTERS}

# Where a reply may go: RabbitMQ's direct reply-to, which the broker rewrites to name the
# requester's own channel and a random key, or a server-named queue (`amq.gen-`, made by the
# broker for the connection that declared it). Never a named queue: one naming a service's
# or a handle's queue would have the services write there for whoever asked.
_REPLY_TO = re.compile(r"amq\.rabbitmq\.reply-to(\.[A-Za-z0-9+/=._-]{1,200})?|amq\.gen-[A-Za-z0-9_-]{1,64}")


def may_reply_to(reply_to: str) -> bool:
    return _REPLY_TO.fullmatch(reply_to) is not None


def shard_queue(shard: int) -> str:
    return f"aodm.session.shard.{shard:02d}"


def inbox_queue(handle: str) -> str:
    """The handle's queue: its first device's (the one that registered)."""
    return INBOX_QUEUE_PREFIX + handle


def device_inbox(handle: str, device_id: str, added_seq: int) -> str:
    """A device's own queue, bound like every other of the handle to its routing key on
    INBOX, so the broker copies each notification to every device. The first device (entry
    1 of the device log) keeps the handle's queue, as before devices existed."""
    return inbox_queue(handle) if added_seq == 1 else f"{INBOX_QUEUE_PREFIX}{handle}.{device_id}"


# The inbox bound (docs/reliability.md, "When an inbox is full"). A policy, not queue
# arguments: it applies at once to queues declared before it existed (redeclaring one with
# other x-arguments fails with PRECONDITION_FAILED), and it can change without a redeploy.
# Two of the same name: the operator policy holds the bound even where a user policy of
# higher priority replaces ours on these queues (the broker applies the lower of the two
# limits); RabbitMQ 3.10 refuses `overflow` in an operator policy, so drop-head (the
# default, stated in ours) keeps the newest notifications. Policies need the management
# API or rabbitmqctl: AMQP cannot set them.
INBOX_POLICY = "aodm-inbox-bound"
INBOX_POLICY_PATTERN = "^" + INBOX_QUEUE_PREFIX.replace(".", "\\.")
# A queue gets one policy and one operator policy, each the matching one of highest
# priority: above catch-alls at the default 0, ours are the ones the inboxes get.
INBOX_POLICY_PRIORITY = 10


def inbox_policies(max_messages: int, max_bytes: int) -> dict[str, dict[str, Any]]:
    """The management API's kind of policy ("policies", "operator-policies") -> its body."""
    bound = {"max-length": max_messages, "max-length-bytes": max_bytes}
    common = {"pattern": INBOX_POLICY_PATTERN, "apply-to": "queues", "priority": INBOX_POLICY_PRIORITY}
    return {
        "policies": {**common, "definition": {**bound, "overflow": "drop-head"}},
        "operator-policies": {**common, "definition": bound},
    }


async def declare_exchanges(bus: Bus) -> None:
    """Idempotent; every service runs it at start so start order does not matter."""
    await bus.declare_exchange(SESSIONS, SESSIONS_TYPE, replacing=True)  # versions before: x-consistent-hash
    await bus.declare_exchange(REQUESTS, "direct", arguments={"alternate-exchange": SESSIONS})
    await bus.declare_exchange(INTERNAL, "direct")
    await bus.declare_exchange(INBOX, "direct")
    await bus.declare_exchange(DEAD_LETTERS, "fanout")
    await bus.declare_queue(DEAD_LETTER_QUEUE)
    await bus.bind(DEAD_LETTER_QUEUE, DEAD_LETTERS, "")


async def declare_registry(bus: Bus) -> None:
    await bus.declare_queue(REGISTRY_QUEUE, arguments=_DEAD)
    await bus.bind(REGISTRY_QUEUE, REQUESTS, REGISTRY_ROUTING_KEY)
    await bus.declare_queue(ACTIVITY_QUEUE, arguments=_DEAD)
    await bus.bind(ACTIVITY_QUEUE, INTERNAL, ACTIVITY_ROUTING_KEY)


async def declare_session_shards(bus: Bus, shards: int) -> None:
    # The modulus-hash exchange ignores the binding key.
    for shard in range(shards):
        await bus.declare_queue(shard_queue(shard), arguments=_DEAD)
        await bus.bind(shard_queue(shard), SESSIONS, "1")
    await bus.declare_queue(WORKERS_QUEUE, arguments={"x-max-length": 0})
    await bus.declare_queue(SESSION_DEVICES_QUEUE, arguments=_DEAD)
    await bus.bind(SESSION_DEVICES_QUEUE, INTERNAL, SESSION_DEVICES_ROUTING_KEY)


async def declare_notifier(bus: Bus) -> None:
    await bus.declare_queue(NOTIFIER_QUEUE, arguments=_DEAD)
    await bus.bind(NOTIFIER_QUEUE, INTERNAL, NOTIFIER_ROUTING_KEY)


async def declare_inbox(bus: Bus, handle: str) -> None:
    await bus.declare_queue(inbox_queue(handle))
    await bus.bind(inbox_queue(handle), INBOX, handle)


async def declare_new_inbox(bus: Bus, handle: str, queue: str | None = None) -> None:
    """The registry's, at every Register and AddDevice: the handle's (or a device's) queue
    and its binding, not remembered for a reconnect (see Bus.declare_bound_queue)."""
    await bus.declare_bound_queue(queue or inbox_queue(handle), INBOX, handle)


async def declare_all(bus: Bus, shards: int) -> None:
    """The static topology. Every service declares all of it, so none depends on another
    having started first and no publish finds its queue missing."""
    await declare_exchanges(bus)
    await declare_registry(bus)
    await declare_session_shards(bus, shards)
    await declare_notifier(bus)
