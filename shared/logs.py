"""structlog set-up: JSON lines in containers, readable console output on a terminal.

The libraries' own logs (aio-pika, aiormq, asyncpg, asyncio, warnings) go through the
standard library's logging: a handler on its root logger renders them the same way, so
in JSON mode every line a service writes is one JSON object."""

import logging
import re
import sys

import msgspec
import structlog

# JSON lines by msgspec, as bytes straight to stderr: a service writes one per request, and
# this costs a third less than structlog's default (the standard library's json).
_json = msgspec.json.Encoder(enc_hook=repr)
# The libraries mask passwords in the URLs they log (aio-pika, aiormq), but not all of
# them and not everywhere: whatever looks like user:password@ in their lines is masked.
_CREDENTIALS = re.compile(r"(\w+://[^:/@\s]+:)[^@\s]+@")
_handler: logging.Handler | None = None  # the one this module put on the root logger


def _render_json(_logger: object, _name: str, event: dict) -> bytes:
    return _json.encode(event)


def _render_json_text(logger: object, name: str, event: dict) -> str:
    return _render_json(logger, name, event).decode()


def _mask_credentials(_logger: object, _name: str, event: dict) -> dict:
    event["event"] = _CREDENTIALS.sub(r"\1***@", str(event["event"]))
    if "exception" in event:
        event["exception"] = _CREDENTIALS.sub(r"\1***@", event["exception"])
    return event


def _bridge(level: int, console: bool) -> None:
    """The standard library's records, rendered like structlog's own, on stderr."""
    global _handler
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.stdlib.add_logger_name,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _mask_credentials,
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.dev.ConsoleRenderer() if console else _render_json_text,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    if _handler is not None:  # set up again (the tests do): replace ours, keep any other
        root.removeHandler(_handler)
    root.addHandler(handler)
    root.setLevel(level)
    _handler = handler
    logging.captureWarnings(True)  # warnings.warn(...) as records of the "py.warnings" logger


def setup(level: str = "info", fmt: str = "auto") -> None:
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    console = fmt == "console"
    threshold = logging.getLevelName(level.upper())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.dev.ConsoleRenderer() if console else _render_json,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr) if console else structlog.BytesLoggerFactory(sys.stderr.buffer),
        cache_logger_on_first_use=True,
    )
    _bridge(threshold, console)


log = structlog.get_logger()
