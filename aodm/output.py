"""What the command line prints, for people or (with --json) for scripts.

Text: lines for people on stdout; notices ("listening as …") and errors on stderr.
JSON: stdout holds only JSON, one document per line: a command that answers once prints
one document; a stream (`listen`, `chat`) prints one event per line (JSON lines). Notices
are left out. Errors go to stderr as {"error": {"code": …, "message": …}}, one per line:
the exit status says whether the command failed (1) or only one step of a stream did."""

import json
import sys
from datetime import datetime, timedelta
from typing import Any

Document = dict[str, Any]  # one JSON object as --json prints it


def local(ms: int) -> datetime:
    """Epoch milliseconds as a time in the local zone (aware, so its offset is known)."""
    return datetime.fromtimestamp(ms / 1000).astimezone()


def offset(delta: timedelta | None) -> str:
    """+01:00, -05:30, +00:00."""
    minutes = round((delta or timedelta()).total_seconds() / 60)
    sign = "-" if minutes < 0 else "+"
    return f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


def local_time(ms: int) -> str:
    """For people: 2026-12-07 19:31:14 +01:00 (the offset, since a reader may be elsewhere)."""
    when = local(ms)
    return f"{when:%Y-%m-%d %H:%M:%S} {offset(when.utcoffset())}"


def iso_time(ms: int) -> str:
    """For scripts: ISO 8601 with the offset, 2026-12-07T19:31:14.123+01:00."""
    return local(ms).isoformat(timespec="milliseconds")


def moment(ms: int) -> Document:
    """A time in a JSON document: readable and exact."""
    return {"time": iso_time(ms), "timestamp": ms}


# What to do about a service's error code, after its message.
HINTS = {
    "not_found": "check the spelling; `aodm chats` lists your peers",
    "already_exists": "choose another name",
    "unauthorized": "is that handle registered to this identity? See --as",
    "timeout": "are the aodm services running? --timeout S waits longer",
    "not_accepted": "a message request holds a few messages until the peer accepts it",
}


def refusal(code: str, message: str) -> str:
    """A service's error as one line: its code, its message and what to do about it."""
    hint = HINTS.get(code)
    return f"{code}: {message}" + (f" ({hint})" if hint else "")


class Output:
    def __init__(self, as_json: bool = False) -> None:
        self.json = as_json

    def emit(self, document: Document, text: str | None) -> None:
        """One result or event: `document` with --json, else `text` (None: nothing)."""
        if self.json:
            print(json.dumps(document, ensure_ascii=False), flush=True)
        elif text is not None:
            print(text, flush=True)

    def note(self, text: str) -> None:
        """For the person at the terminal only (stderr, and not with --json)."""
        if not self.json:
            print(text, file=sys.stderr, flush=True)

    def error(self, code: str, message: str) -> None:
        """One line on stderr: `aodm: message`, or the JSON error document."""
        print(error_line(code, message, self.json), file=sys.stderr, flush=True)


def error_line(code: str, message: str, as_json: bool) -> str:
    if as_json:
        return json.dumps({"error": {"code": code, "message": message}}, ensure_ascii=False)
    return f"aodm: {message}"
