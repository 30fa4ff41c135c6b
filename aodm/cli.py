"""`aodm`: the command line. Argument parsing, dispatch, and the one place that turns every
error a user can cause into one line on stderr and exit status 1 (never a traceback).

Exit status: 0 done; 1 an error (one line on stderr: `aodm: …`, or with --json the
document {"error": {"code": …, "message": …}}); 2 a usage error (argparse's, JSON too
with --json); 130 interrupted (Ctrl-C; it ends `listen` and `chat` with 0)."""

import argparse
import asyncio
import inspect
import json
import logging
import math
import os
import sys
from collections.abc import Awaitable, Callable
from datetime import datetime
from importlib import metadata
from typing import Any, NoReturn, Protocol

import aiormq

import aodm
from aodm import chat, commands, demo, device_commands, listen
from aodm.commands import Context, safe_url
from aodm.crypto import DecryptionFailed
from aodm.errors import AodmError
from aodm.inbox import InboxUnavailable
from aodm.output import error_line, refusal
from aodm.state import CliError
from aodm.transport import BrokerError

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
MIN_TIMEOUT_S, MAX_TIMEOUT_S = 0.1, 3600.0  # below: nothing could answer; above: a typo (ms for s?)
ENDED_BY_CTRL_C = {listen.listen, chat.chat}  # Ctrl-C is how these end: exit status 0
# What `explain` turns into one line on stderr and exit status 1.
USER_ERRORS: tuple[type[BaseException], ...] = (
    CliError, AodmError, DecryptionFailed, InboxUnavailable, *BrokerError, OSError,
    aiormq.exceptions.ChannelInvalidStateError,
)

Run = Callable[[Context], int | Awaitable[int]]  # a command: aodm/commands.py and the like


class Subcommands(Protocol):
    """What `ArgumentParser.add_subparsers` returns, as far as the commands are added to it."""

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser: ...


# -- parsing --------------------------------------------------------------------------


def since(raw: str) -> int:
    """--since takes epoch milliseconds or an ISO 8601 time (local time when no zone)."""
    if raw.isdigit():
        return int(raw)
    try:
        return int(datetime.fromisoformat(raw).timestamp() * 1000)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is neither epoch milliseconds nor an ISO 8601 time") from None


def seconds(raw: str) -> float:
    """A wait in seconds: a number from MIN_TIMEOUT_S to MAX_TIMEOUT_S."""
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a number of seconds") from None
    if not math.isfinite(value) or not MIN_TIMEOUT_S <= value <= MAX_TIMEOUT_S:
        raise argparse.ArgumentTypeError(f"{raw} is not between {MIN_TIMEOUT_S:g} and {MAX_TIMEOUT_S:g} seconds")
    return value


def positive(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def add_globals(parser: argparse.ArgumentParser, *, top: bool, timeout: bool = True, as_json: bool = True) -> None:
    """Global options are accepted before or after the command. After it they default to
    SUPPRESS, so they override the value given before it only when actually present."""
    default = (lambda value: value) if top else (lambda value: argparse.SUPPRESS)
    group = parser.add_argument_group("global options")
    group.add_argument("--identity", metavar="PATH", default=default(None),
                       help="identity file (default: $AODM_IDENTITY or ~/.config/aodm/identity.json)")
    group.add_argument("--as", dest="as_handle", metavar="HANDLE", default=default(None),
                       help="act as this handle (default: the one last registered)")
    group.add_argument("--amqp-url", metavar="URL", default=default(os.environ.get("AODM_AMQP_URL", DEFAULT_AMQP_URL)),
                       help=f"RabbitMQ URL (default: $AODM_AMQP_URL or {DEFAULT_AMQP_URL})")
    if timeout:
        group.add_argument("--timeout", type=seconds, metavar="S", default=default(15.0),
                           help=f"seconds to wait for each reply, {MIN_TIMEOUT_S:g} to {MAX_TIMEOUT_S:g} (default: 15)")
    if as_json:
        group.add_argument("--json", action="store_true", default=default(False),
                           help="machine-readable output: one JSON document on stdout (JSON lines for listen "
                           'and chat); errors as {"error": {"code": ..., "message": ...}} on stderr')


def command(sub: Subcommands, name: str, run: Run, help: str, description: str, *, timeout: bool = True,
            as_json: bool = True) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help, description=description,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(run=run, narrated=not as_json)
    add_globals(parser, top=False, timeout=timeout, as_json=as_json)
    return parser


class Parser(argparse.ArgumentParser):
    """argparse's parser, its usage errors as JSON documents when the line has --json (the
    sub-parsers are made of the same class)."""

    json_errors = False

    def error(self, message: str) -> NoReturn:
        if not self.json_errors:
            super().error(message)
        self.exit(2, error_line("usage", f"{self.prog}: {message}", True) + "\n")


class JsonParser(Parser):
    json_errors = True


def version() -> str:
    """The installed package's version; the source's own when it is not installed."""
    try:
        return metadata.version("aodm")
    except metadata.PackageNotFoundError:
        return aodm.__version__


def build_parser(as_json: bool = False) -> argparse.ArgumentParser:
    parser = (JsonParser if as_json else Parser)(
        prog="aodm",
        description="Encrypted direct messages between handles. Keys never leave this machine: "
        "the services only ever see sealed keys and ciphertext.",
        epilog="Start with: aodm identity new; aodm register NAME; aodm send PEER hello. "
        "--json gives any command but demo machine-readable output. "
        "Exit status: 0 done, 1 an error (one line on stderr), 2 a usage error.",
    )
    parser.add_argument("--version", action="version",
                        version=json.dumps({"version": version()}) if as_json else f"aodm {version()}")
    add_globals(parser, top=True)
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    add_identity(sub)
    add_devices(sub)
    add_chat_commands(sub)
    p = command(sub, "demo", demo.run, "run the whole DM workflow between two fresh handles",
                "Creates two fresh identities and handles (alice-xxxx, bob-xxxx) in memory and runs\n"
                "the eight steps of the workflow, narrating each: alice generates a session key,\n"
                "seals it to both box keys, sends both sealed keys and an encrypted message while bob\n"
                "is offline; bob then finds the notification, fetches and opens his sealed key and\n"
                "decrypts. Waits for the services to answer first, so it can start with the stack.\n"
                "It narrates for people: it has no --json output.", as_json=False)
    p.add_argument("--wait", type=seconds, default=30.0, metavar="S",
                   help="how long to wait for the services to answer (default: 30)")
    return parser


def add_identity(sub: Subcommands) -> None:
    identity = sub.add_parser("identity", help="create or show this machine's identity (your keys)",
                              description="An identity is a signing key (it signs every request) and a box "
                              "key (session keys are sealed to it). It lives in one file; keep it private.")
    add_globals(identity, top=False)
    isub = identity.add_subparsers(title="identity commands", metavar="ACTION", required=True)
    p = command(isub, "new", commands.identity_new, "create a new identity file",
                "Generate a new identity and save it (mode 600). Prints its address (the public\n"
                "signing key) and its public box key. Refuses to replace an existing file.")
    p.add_argument("--force", action="store_true", help="replace an existing identity file (its handles are lost)")
    command(isub, "show", commands.identity_show, "print the identity's public keys",
            "Print the identity file's path, address, public box key and default handle.")


def add_devices(sub: Subcommands) -> None:
    device = sub.add_parser("device", help="your handle's devices: add, list, remove, recovery key",
                            description="Each machine's identity is a device of its own (a copy of an identity file "
                            "is the same device, and two copies split its notifications). Every device gets every "
                            "notification; the devices of a handle are a signed log anyone can verify.")
    add_globals(device, top=False)
    dsub = device.add_subparsers(title="device commands", metavar="ACTION", required=True)
    p = command(dsub, "code", device_commands.code, "on a new machine: print the code that adds it to HANDLE",
                "Print this identity's device code for HANDLE (its keys and their signed claim) and\n"
                "make HANDLE the default here. Carry the code to a device of HANDLE and run\n"
                "`aodm device add CODE` there.")
    p.add_argument("handle", metavar="HANDLE")
    p = command(dsub, "add", device_commands.add, "add the device whose CODE was printed on it",
                "Add the device of CODE (from `aodm device code` on the new machine) to your handle,\n"
                "signed by this device. The new device gets every notification from then on.")
    p.add_argument("code", metavar="CODE")
    p = command(dsub, "list", device_commands.listing, "list the devices of your handle (or HANDLE), verified",
                "Fetch the handle's device log, verify every entry here (signatures, chain, claims),\n"
                "and list the devices and recovery keys it holds now.")
    p.add_argument("handle", metavar="HANDLE", nargs="?")
    p = command(dsub, "remove", device_commands.remove, "remove another device of your handle",
                "Remove device ID (see `aodm device list`): its key is refused from then on, and its\n"
                "notification queue and broker login are deleted. A device cannot remove itself.")
    p.add_argument("device_id", metavar="ID")
    command(dsub, "recovery-key", device_commands.recovery_key, "add a recovery key and print its secret",
            "Add a recovery key to your handle and print its secret once. Keep it offline: with it,\n"
            "`aodm recover HANDLE SECRET` adds a new machine when every device is lost. Without\n"
            "any device or recovery secret, a handle is lost.")
    p = command(sub, "recover", device_commands.recover, "make this machine a device of HANDLE with its recovery secret",
                "Every device of HANDLE lost: add this identity as a device of HANDLE, signed by the\n"
                "recovery key whose SECRET `aodm device recovery-key` printed.")
    p.add_argument("handle", metavar="HANDLE")
    p.add_argument("secret", metavar="SECRET")


def add_chat_commands(sub: Subcommands) -> None:
    p = command(sub, "register", commands.register, "claim a handle for this identity",
                "Register HANDLE (3-32 of a-z 0-9 _ -) with this identity's keys and make it the\n"
                "default handle for later commands. Fails with already_exists if someone has it.")
    p.add_argument("handle", metavar="HANDLE")
    command(sub, "credentials", commands.credentials, "issue a new broker password for your handle",
            "Where the deployment gives each handle its own broker user (docs/security.md), ask\n"
            "the registry for a new password for it (lost, or to rotate it) and keep it in the\n"
            "state file beside the identity; later commands log in with it. The old password\n"
            "stops working for new connections. Logs in with --amqp-url's user to ask.")
    command(sub, "chats", commands.chats, "list your chats",
            "List the chats of your handle: peer, state, last activity (local time) and session id.\n"
            "State: accepted; incoming (a message request to you: `aodm requests`); outgoing\n"
            "(yours, not accepted yet: it holds a few messages until it is); blocked (by you).")
    command(sub, "requests", commands.requests, "show the message requests waiting for you",
            "List the chats others opened with you that you have not accepted, each with the\n"
            "few messages it holds (you were notified once per request, not per message).\n"
            "Replying to one, or `aodm accept PEER`, accepts it; `aodm block PEER` refuses it.")
    for change, what in (("accept", "accept PEER's message request (or lift your block)"),
                         ("block", "refuse PEER's messages from now on"),
                         ("unblock", "lift your block of PEER")):
        p = command(sub, change, commands.consent(change), what,
                    what[0].upper() + what[1:] + ". A blocked peer is answered not_accepted, as if\n"
                    "its request had not been answered: it is not told that it was blocked.")
        p.add_argument("peer", metavar="PEER")
    p = command(sub, "open", commands.open_chat, "start (or find) the chat with PEER",
                "Establish the session with PEER (or find the existing one), give it a first key\n"
                "if it has none, and print its session id.")
    p.add_argument("peer", metavar="PEER")
    p = command(sub, "send", commands.send, "send an encrypted message to PEER",
                "Encrypt TEXT with the session's current key and send it to PEER, opening the\n"
                "chat first if needed. Prints the message's sequence number and time. An empty\n"
                "message (or only spaces) is refused.")
    p.add_argument("peer", metavar="PEER")
    p.add_argument("text", metavar="TEXT", nargs="+", help="the message (several words are joined by spaces)")
    p = command(sub, "rotate", commands.rotate, "give the chat with PEER a new key",
                "Generate a new session key, seal it to both members' box keys and make it the\n"
                "current generation. Older messages stay readable with their own generation.")
    p.add_argument("peer", metavar="PEER")
    add_history(sub)
    add_listen(sub)
    add_chat(sub)


def add_history(sub: Subcommands) -> None:
    p = command(sub, "history", commands.history, "show the decrypted messages of the chat with PEER",
                "Fetch and decrypt the chat with PEER, one line per message, in local time with\n"
                "its offset from UTC:\n"
                "  [2026-11-26 18:03:12 +01:00] alice: hello\n"
                "With --json: one document, {\"peer\", \"session_id\", \"messages\": [{\"seq\", \"sender\",\n"
                "\"time\" (ISO 8601 with offset), \"timestamp\" (epoch ms), \"generation\", \"text\"}]}.")
    p.add_argument("peer", metavar="PEER")
    p.add_argument("--limit", type=positive, metavar="N", help="at most N messages")
    p.add_argument("--desc", action="store_true", help="newest first")
    p.add_argument("--since", type=since, metavar="TIME",
                   help="only messages from TIME on: ISO 8601 (2026-11-26T18:00) or epoch milliseconds")


def add_listen(sub: Subcommands) -> None:
    p = command(sub, "listen", listen.listen, "print your notifications as they arrive",
                "Consume your handle's notification queue and print each event: new messages\n"
                "(decrypted, with sender and time), sessions established, keys rotated, and\n"
                "requests that failed (with their error code). Notifications wait in the queue\n"
                "while you are offline, the newest up to a bound. First it shows, chat by chat,\n"
                "the messages since the last `listen` (from the state file; a chat it has not\n"
                "seen: the last 50), and a message whose notification the full queue dropped\n"
                "is read back before the next one: each message once, in order. Ctrl-C stops.\n"
                "With --json: one event per line (JSON lines), {\"event\": \"message\", ...}; the other\n"
                "events are catching_up, session_established, key_rotated, devices_changed and request_failed.",
                timeout=False)
    p.add_argument("--once", action="store_true",
                   help="print what is waiting (or the first to arrive within --timeout), then exit")
    p.add_argument("--timeout", dest="wait", type=seconds, metavar="S",
                   help="stop after S seconds without a notification (default: never)")


def add_chat(sub: Subcommands) -> None:
    p = command(sub, "chat", chat.chat, "talk with PEER: recent messages, new ones live, lines you type sent",
                f"Show the last {chat.RECENT} messages of the chat with PEER, then its new messages as\n"
                "they arrive, and send each line read from stdin as a message (empty lines are\n"
                f"ignored; {chat.QUIT}, Ctrl-D or the end of the input leaves). stdin may be a pipe, so\n"
                "a script can drive it. Another chat's message, or a request from someone else, is\n"
                "one line (`listen` still shows such a message). A message request works as\n"
                "elsewhere: replying to one accepts it; yours holds a few messages until the peer\n"
                "accepts, and a refused line (not_accepted) is one line on stderr while the chat\n"
                "goes on.\n"
                "With --json: one event per line (JSON lines): chat (first: the session and its\n"
                "state), history, message, sent (yours), elsewhere (another chat's message),\n"
                "message_request, session_established.")
    p.add_argument("peer", metavar="PEER")


# -- running --------------------------------------------------------------------------


def explain(exc: BaseException, url: str) -> tuple[str, str]:
    """A code for scripts, and one line that says what went wrong and what to do about it."""
    match exc:
        case CliError():
            return exc.code, str(exc)
        case InboxUnavailable():
            return "inbox_unavailable", str(exc)
        case AodmError():
            return exc.code, refusal(exc.code, exc.message)
        case DecryptionFailed():
            return "cannot_decrypt", f"cannot decrypt: {exc}"
        case OSError() if exc.filename:
            return "file_error", f"{exc.filename}: {exc.strerror}"
        case aiormq.exceptions.ChannelNotFoundEntity():
            return "no_services", (f"the broker at {safe_url(url)} has no aodm exchanges: "
                                   f"are the services running there? ({exc})")
        case aiormq.exceptions.ProbableAuthenticationError():
            return "broker_login_refused", (f"the broker at {safe_url(url)} refused the login: "
                                            "check the user and password in --amqp-url")
        case _:
            return "broker_unreachable", f"cannot talk to the broker at {safe_url(url)}: {exc or type(exc).__name__}"


async def dispatch(args: argparse.Namespace) -> int:
    run: Run = args.run
    result = run(Context(args))
    return await result if inspect.isawaitable(result) else result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    as_json = "--json" in argv  # before parsing: argparse's own errors are JSON too then
    parser = build_parser(as_json)
    args = parser.parse_args(argv)
    if args.json and args.narrated:
        parser.error("demo narrates the workflow for people: it has no --json output")
    for library in ("aio_pika", "aiormq"):  # their connection chatter would bury our one line
        logging.getLogger(library).setLevel(logging.CRITICAL)
    try:
        return asyncio.run(dispatch(args))
    except KeyboardInterrupt:
        return 0 if args.run in ENDED_BY_CTRL_C else 130
    except USER_ERRORS as exc:
        print(error_line(*explain(exc, args.amqp_url), args.json), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
