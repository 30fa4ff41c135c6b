"""What a service declares and its handlers get: `Action` (request type, handler, mode) and
`Context` (arq style: `async def handler(ctx, req)`), and how an action's Data is decoded."""

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import asyncpg
import msgspec

from aodm import strict_json
from aodm.envelope import Envelope
from aodm.errors import AodmError, InvalidArgument, MalformedRequest
from aodm.notifications import AnyNotification, notification_id
from shared.effects import Effects, Outgoing

_encoder = msgspec.json.Encoder()

FENCED = "fenced"  # a handler's answer, and the outcome's code, for a request left to a shard's new owner


@dataclass
class Context:
    """What a handler gets besides its request."""

    conn: asyncpg.Connection
    envelope: Envelope
    caller: str
    scope: Any
    now: int
    app: Any = None  # what the service handed its Processor for its handlers (arq's ctx holds the same)
    effects: Effects = field(default_factory=Effects)
    # For an action that keeps its own record (Action.own_record): why the request may not
    # be taken if it is new (its timestamp is out of the window), and whether the handler
    # found it stored before (then it answers as the first time).
    stale: AodmError | None = None
    stored_before: bool = False
    # The lease the request was delivered under (Delivery.lease): a handler that writes with
    # one statement of its own checks it there, and answers FENCED for what it may not take.
    lease: Any = None
    committed: list[Callable[[], None]] = field(default_factory=list)

    def emit(self, exchange: str, routing_key: str, message: object) -> None:
        self.effects.messages.append(Outgoing(exchange, routing_key, _encoder.encode(message)))

    def notify(self, kind: type[AnyNotification], recipients: list[str], *, at: int | None = None, **fields: Any) -> None:
        """One notification per recipient, its Id derived from the request's."""
        self.effects.notifications += [
            kind(id=notification_id(self.envelope.id, kind.__name__, handle), handle=handle,
                 at=self.now if at is None else at, **fields)
            for handle in recipients
        ]

    def on_commit(self, callback: Callable[[], None]) -> None:
        """Run `callback` once what the handler wrote has committed (never if it rolls back):
        for in-memory state derived from the database, like the session's activity feed."""
        self.committed.append(callback)


Handler = Callable[[Context, Any], Awaitable[object]]
# A batched action's handler takes a run of consecutive requests and answers each with its
# result or a typed error; it must have written nothing for a request it answers with an error.
BatchHandler = Callable[[list[Context], list[Any]], Awaitable[list[object]]]


@dataclass(frozen=True)
class Action:
    request: type[msgspec.Struct]
    handler: Handler | BatchHandler
    mode: Literal["send", "dryrun"]
    needs_handle: bool = True  # From must be a handle, not the bare signer address
    batched: bool = False  # `handler` is a BatchHandler (send actions only)
    # The handler keeps the record of the requests it took, keyed by their Ids, and writes
    # with one statement: a request stored before is answered from that record (setting
    # ctx.stored_before) and a new one whose ctx.stale is set is refused with it. Such a run
    # needs no transaction, no lock and no stored reply (send actions only).
    own_record: bool = False
    decoder: msgspec.json.Decoder = field(init=False, repr=False, compare=False)
    data: strict_json.FlatObject = field(init=False, repr=False, compare=False)  # Data's keys, for duplicates

    def __post_init__(self) -> None:
        object.__setattr__(self, "decoder", msgspec.json.Decoder(self.request))
        object.__setattr__(self, "data", strict_json.FlatObject(self.request))


# Resolves who is calling: returns (caller, scope) or raises Unauthorized/Forbidden/NotFound.
Authenticate = Callable[[asyncpg.Connection, Envelope, Action], Awaitable[tuple[str, Any]]]

_RANGE_ERROR = re.compile(r"Expected `[^`]+` (>=|<=|>|<|of length)|Invalid enum value|match pattern")


def decode_data(action: Action, data: str) -> msgspec.Struct:
    """An action's Data as its request type; a value out of range is invalid_argument, any
    other shape malformed_request, and a key given twice is refused."""
    try:
        request = action.decoder.decode(data)
    except msgspec.ValidationError as exc:
        if _RANGE_ERROR.search(str(exc)):
            raise InvalidArgument(f"Data: {exc}") from exc
        raise MalformedRequest(f"Data: {exc}") from exc
    except (msgspec.DecodeError, UnicodeError) as exc:
        raise MalformedRequest(f"Data is not JSON: {exc}") from exc
    if duplicates := action.data.duplicates(data):
        raise MalformedRequest(f"Data: a key appears twice: {', '.join(duplicates)}")
    return request
