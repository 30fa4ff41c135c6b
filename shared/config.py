"""Settings from the environment, checked at start with an error that names the variable."""

import os
import re
from collections.abc import Callable
from dataclasses import dataclass


class ConfigError(Exception):
    pass


def _int(lo: int, hi: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        value = int(raw)
        if not lo <= value <= hi:
            raise ValueError(f"must be between {lo} and {hi}")
        return value

    return parse


def _choice(*options: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return raw

    return parse


def _url(*schemes: str, optional: bool = False) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if optional and raw == "":
            return raw
        if not raw.startswith(tuple(f"{s}://" for s in schemes)):
            raise ValueError(f"must {'be empty or ' if optional else ''}start with {' or '.join(s + '://' for s in schemes)}")
        return raw

    return parse


def _user_prefix(raw: str) -> str:
    # Handles never contain a dot, so prefix + handle can never name the service user,
    # the public user or another deployment's user with a different prefix.
    if not re.fullmatch(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.", raw):
        raise ValueError("must be letters, digits, _ or - ending with a dot, e.g. aodm-h.")
    return raw


# name: (default, parser, description) — the documented set; docs/operations.md lists it.
VARIABLES: dict[str, tuple[str, Callable[[str], object], str]] = {
    "AODM_AMQP_URL": ("amqp://guest:guest@127.0.0.1:5672/", _url("amqp", "amqps"), "RabbitMQ URL (with vhost)"),
    "AODM_DATABASE_URL": ("postgresql://root@127.0.0.1:5432/aodm", _url("postgresql", "postgres"), "PostgreSQL DSN; the database is created if missing"),
    "AODM_SESSION_SHARDS": ("8", _int(1, 1024), "number of session shard queues (fixed per deployment)"),
    "AODM_PREFETCH": ("64", _int(1, 10000), "unacknowledged messages per consumer"),
    "AODM_DB_POOL_SIZE": ("10", _int(1, 200), "PostgreSQL connections per service process"),
    "AODM_LOG_FORMAT": ("auto", _choice("auto", "json", "console"), "json in containers, console on a terminal"),
    "AODM_LOG_LEVEL": ("info", _choice("debug", "info", "warning", "error"), "log level"),
    "AODM_HTTP_PORT": ("0", _int(0, 65535), "health (/healthz, /readyz) and /metrics HTTP port; 0 turns it off"),
    "AODM_HANDLER_TIMEOUT_S": ("10", _int(1, 3600), "a handler taking longer is cancelled and retried; after 3 tries the request is dead-lettered"),
    "AODM_DEDUP_RETENTION_S": ("86400", _int(3600, 10**8), "how long request ids are remembered for deduplication"),
    "AODM_SEND_RATE": ("30", _int(1, 10**6), "messages a second one sender may send over all its sessions (bursts of 10 s worth), per session worker"),
    "AODM_SEND_SESSION_RATE": ("20", _int(1, 10**6), "messages a second one sender may send in one session (bursts of 10 s worth)"),
    "AODM_SESSIONS_PER_HOUR": ("60", _int(1, 10**6), "new sessions one handle may open in an hour"),
    "AODM_HANDLES_PER_DAY": ("10", _int(1, 10**6), "handles one signing key may register in a day"),
    "AODM_REQUEST_MESSAGES": ("3", _int(0, 1000), "messages the opener of a session may store before the peer accepts it (a message request)"),
    "AODM_INBOX_MAX_MESSAGES": ("10000", _int(10, 10**8), "notifications a handle's inbox queue holds (a RabbitMQ policy, docs/operations.md); past it the oldest are dropped, every message stays readable with QueryMessage"),
    "AODM_INBOX_MAX_BYTES": ("67108864", _int(65536, 2**40), "bytes of notifications a handle's inbox queue holds (message bodies); past it the oldest are dropped"),
    "AODM_BROKER_ADMIN_URL": ("", _url("http", "https", optional=True), "RabbitMQ management API with admin credentials (http://user:pass@host:15672); set, the registry issues each handle its own broker user (docs/security.md) and the services set the inbox bound policies at start (docs/operations.md); empty turns issuing off"),
    "AODM_BROKER_USER_MAX_CONNECTIONS": ("16", _int(1, 10**6), "connections each issued broker user may hold at once (a RabbitMQ user limit)"),
    "AODM_BROKER_USER_MAX_CHANNELS": ("64", _int(1, 10**6), "channels each issued broker user may hold at once"),
    "AODM_BROKER_VHOST": ("", str, "vhost the issued broker users get permissions on; empty = the vhost of AODM_AMQP_URL"),
    "AODM_BROKER_USER_PREFIX": ("aodm-h.", _user_prefix, "issued broker users are named prefix + handle; unique per deployment sharing a broker"),
}


@dataclass(frozen=True)
class Settings:
    amqp_url: str
    database_url: str
    session_shards: int
    prefetch: int
    db_pool_size: int
    log_format: str
    log_level: str
    http_port: int
    dedup_retention_s: int
    handler_timeout_s: int = 10
    send_rate: int = 30
    send_session_rate: int = 20
    sessions_per_hour: int = 60
    handles_per_day: int = 10
    request_messages: int = 3
    inbox_max_messages: int = 10000
    inbox_max_bytes: int = 67108864
    broker_admin_url: str = ""
    broker_vhost: str = ""
    broker_user_max_connections: int = 16
    broker_user_max_channels: int = 64
    broker_user_prefix: str = "aodm-h."


def load(environ: dict[str, str] | None = None) -> Settings:
    env = os.environ if environ is None else environ
    values: dict[str, object] = {}
    for name, (default, parse, _) in VARIABLES.items():
        raw = env.get(name, default)
        try:
            values[name.removeprefix("AODM_").lower()] = parse(raw)
        except ValueError as exc:
            raise ConfigError(f"{name}={raw!r}: {exc}") from None
    return Settings(**values)  # type: ignore[arg-type]
