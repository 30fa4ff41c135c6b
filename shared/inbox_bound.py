"""The inbox bound: at most `AODM_INBOX_MAX_MESSAGES` notifications and
`AODM_INBOX_MAX_BYTES` bytes wait in a handle's queue; past either, the broker drops the
oldest (docs/reliability.md, "When an inbox is full"; the policies are in aodm/topology.py).

The broker enforces it, through a policy and an operator policy on `^aodm\\.inbox\\.`. They
need the management API (AMQP cannot set a policy), so every service that has
`AODM_BROKER_ADMIN_URL` sets them when it starts: idempotent PUTs, which also bring the
queues of a running deployment under the bound, and a changed bound into force. Without
the URL the broker must get them another way (deploy/rabbitmq/definitions.json in compose,
or `rabbitmqctl`, docs/operations.md); the notifier, which keeps the inbox queues, says so."""

import asyncio

from aodm import topology
from shared.config import Settings
from shared.logs import log
from shared.management import ManagementApi, ManagementUnavailable, vhost_of

RETRY_S = (1, 2, 5, 10, 30)  # waits between attempts while the API does not answer; then every 30 s


def apply(settings: Settings) -> None:
    """Both policies on the services' vhost (blocking). Raises ManagementUnavailable."""
    api, vhost = ManagementApi(settings.broker_admin_url), vhost_of(settings.amqp_url)
    for kind, body in topology.inbox_policies(settings.inbox_max_messages, settings.inbox_max_bytes).items():
        api.put(kind, vhost, topology.INBOX_POLICY, body=body)


async def keep(settings: Settings, stop: asyncio.Event) -> None:
    """Set the bound, trying again until the API answers; the service works meanwhile (the
    queues keep whatever bound the broker had)."""
    if not settings.broker_admin_url:
        return
    attempt, reported = 0, None
    while True:
        try:
            await asyncio.to_thread(apply, settings)
        except ManagementUnavailable as exc:
            if str(exc) != reported:  # once per distinct failure, not once per attempt
                log.warning("inbox bound not set yet, trying again", policy=topology.INBOX_POLICY, error=str(exc))
                reported = str(exc)
        else:
            log.info("inbox bound set", policy=topology.INBOX_POLICY, vhost=vhost_of(settings.amqp_url),
                     max_messages=settings.inbox_max_messages, max_bytes=settings.inbox_max_bytes)
            return
        try:
            await asyncio.wait_for(stop.wait(), RETRY_S[min(attempt, len(RETRY_S) - 1)])
            return
        except TimeoutError:
            attempt += 1


def warn_if_unset(settings: Settings) -> None:
    """Once, from the notifier: without the admin URL no service can set or check the bound."""
    if settings.broker_admin_url:
        return
    vhost = vhost_of(settings.amqp_url)
    policies = topology.inbox_policies(settings.inbox_max_messages, settings.inbox_max_bytes)
    log.warning(
        "inbox bound: no service here can set it (AODM_BROKER_ADMIN_URL is empty); unless the broker has "
        f"policy and operator policy {topology.INBOX_POLICY!r} on vhost {vhost!r} (definitions.json, rabbitmqctl: "
        "docs/operations.md), an inbox nobody reads grows without bound",
        policy=policies["policies"]["definition"],
    )
