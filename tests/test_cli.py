"""The `aodm` command line, run as a subprocess against the test stack.

The stack's services run in this process's event loop, so the CLI is awaited as an asyncio
subprocess (a blocking `subprocess.run` would stall the services it talks to)."""

import asyncio
import json
import os
import re
import secrets
import sys
import tomllib
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest

from aodm import __version__ as source_version
from aodm.cli import main

ROOT = Path(__file__).resolve().parent.parent
UNREACHABLE = "amqp://guest:guest@127.0.0.1:1/"
TIME = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d\d:\d\d"  # local time, with its offset from UTC


@dataclass
class Run:
    code: int
    out: str
    err: str

    def failed_cleanly(self) -> bool:
        """Exit 1 with exactly one line on stderr and no traceback."""
        return self.code == 1 and "Traceback" not in self.err and len(self.err.strip().splitlines()) == 1


    def json(self) -> dict:
        """The one JSON document a command printed with --json."""
        assert len(self.out.splitlines()) == 1, self.out
        return json.loads(self.out)

    def error(self) -> dict:
        """The JSON error document on stderr, the only line there."""
        assert self.failed_cleanly(), self
        return json.loads(self.err)["error"]


async def start(url: str, home: Path, *args: str, env: dict | None = None, stdin=None):
    env = {**os.environ, "AODM_AMQP_URL": url, "AODM_IDENTITY": str(home / "identity.json"), "HOME": str(home),
           **(env or {})}
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aodm", *args, cwd=ROOT, env=env, stdin=stdin,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )


async def aodm(url: str, home: Path, *args: str, timeout: float = 60, env: dict | None = None) -> Run:
    proc = await start(url, home, *args, env=env)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return Run(proc.returncode, out.decode(), err.decode())


def name(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


@pytest.fixture
def person(stack, tmp_path_factory):
    """Factory: a fresh home with an identity and a registered handle; returns (handle, run)."""

    async def make(prefix: str):
        home = tmp_path_factory.mktemp(prefix)
        handle = name(prefix)

        async def run(*args: str, **kw) -> Run:
            return await aodm(stack.amqp_url, home, *args, **kw)

        assert (await run("identity", "new")).code == 0
        registered = await run("register", handle)
        assert registered.code == 0, registered.err
        run.start = lambda *args, **kw: start(stack.amqp_url, home, *args, **kw)  # a process to talk to (chat)
        return handle, run

    return make


async def test_demo_runs_the_eight_steps(stack, tmp_path):
    result = await aodm(stack.amqp_url, tmp_path, "demo", "--wait", "30")
    assert result.code == 0, result.out + result.err
    for step in range(1, 9):
        assert re.search(rf"^{step}\. ", result.out, re.M), f"step {step} missing:\n{result.out}"
    assert re.search(r'^   bob-[0-9a-f]{4} read: "Hello from alice-[0-9a-f]{4}!', result.out, re.M), result.out
    assert "the same key" in result.out


async def test_demo_reports_an_unreachable_system(tmp_path):
    result = await aodm(UNREACHABLE, tmp_path, "demo", "--wait", "1")
    assert result.failed_cleanly(), result
    assert "did not answer" in result.err


async def test_two_people_chat(person):
    alice, as_alice = await person("alice")
    bob, as_bob = await person("bob")

    opened = await as_alice("open", bob)
    assert opened.code == 0, opened.err
    session_id = opened.out.split()[-1]
    assert "new session" in opened.out and "generation 1" in opened.out

    sent = await as_alice("send", bob, "hello", "bob,", "this", "is", "secret")
    assert sent.code == 0, sent.err
    assert re.match(rf"sent #1 to .* at {TIME} ", sent.out), sent.out

    history = await as_bob("history", alice)
    assert history.code == 0, history.err
    assert re.search(rf"^\[{TIME}\] {alice}: hello bob, this is secret$", history.out, re.M), history.out

    listened = await as_bob("listen", "--once", "--timeout", "10")
    assert listened.code == 0, listened.err
    assert f"message request from {alice}" in listened.out
    assert f"rotated to generation 1 by {alice}" in listened.out
    assert f"] {alice}: hello bob, this is secret" in listened.out

    chats = await as_bob("chats")
    assert chats.code == 0 and alice in chats.out and session_id in chats.out
    assert re.search(rf"^{alice}\s+incoming\s+{TIME}\s+{session_id}$", chats.out, re.M), chats.out


async def test_a_message_request_is_shown_then_accepted_or_blocked(person):
    alice, as_alice = await person("alice")
    bob, as_bob = await person("bob")
    for text in ("one", "two", "three"):
        assert (await as_alice("send", bob, text)).code == 0
    refused = await as_alice("send", bob, "four")
    assert refused.code == 1 and "not_accepted" in refused.err, refused
    shown = await as_bob("requests")
    assert shown.code == 0 and f"request from {alice} (3 messages)" in shown.out, shown
    assert [line.split("] ", 1)[1] for line in shown.out.splitlines() if "] " in line] == [
        f"{alice}: one", f"{alice}: two", f"{alice}: three"]
    accepted = await as_bob("accept", alice)
    assert accepted.code == 0 and f"chat with {alice}: accepted" in accepted.out, accepted
    assert (await as_alice("send", bob, "four")).code == 0
    assert "no message requests" in (await as_bob("requests")).out
    blocked = await as_bob("block", alice)
    assert blocked.code == 0 and "blocked" in blocked.out
    assert "not_accepted" in (await as_alice("send", bob, "five")).err
    assert "accepted" in (await as_bob("unblock", alice)).out
    assert (await as_alice("send", bob, "five")).code == 0


async def test_rotation_keeps_old_messages_readable(person):
    alice, as_alice = await person("alice")
    bob, as_bob = await person("bob")
    assert (await as_alice("send", bob, "first")).code == 0
    rotated = await as_bob("rotate", alice)
    assert rotated.code == 0 and "generation 2" in rotated.out, rotated
    assert (await as_bob("send", alice, "second")).code == 0

    history = await as_alice("history", bob)
    assert [line.split("] ", 1)[1] for line in history.out.splitlines()] == [f"{alice}: first", f"{bob}: second"]
    newest = await as_alice("history", bob, "--desc", "--limit", "1")
    assert newest.out.strip().endswith(f"{bob}: second") and len(newest.out.splitlines()) == 1
    later = await as_alice("history", bob, "--since", "2999-01-01T00:00")
    assert later.code == 0 and later.out == ""


async def test_taken_handle_fails_cleanly(person, stack, tmp_path):
    alice, _ = await person("alice")
    assert (await aodm(stack.amqp_url, tmp_path, "identity", "new")).code == 0
    result = await aodm(stack.amqp_url, tmp_path, "register", alice)
    assert result.failed_cleanly(), result
    assert "already_exists" in result.err


async def test_registering_your_own_handle_again_is_fine(person):
    alice, as_alice = await person("alice")
    again = await as_alice("register", alice)
    assert again.code == 0 and "already yours" in again.out


async def test_unknown_peer_fails_cleanly(person):
    _, as_alice = await person("alice")
    for args in (("send", name("nobody"), "hi"), ("history", name("nobody")), ("open", name("nobody"))):
        result = await as_alice(*args)
        assert result.failed_cleanly(), result
        assert "not_found" in result.err


async def test_missing_identity_fails_cleanly(stack, tmp_path):
    result = await aodm(stack.amqp_url, tmp_path, "send", "someone", "hi")
    assert result.failed_cleanly(), result
    assert "no identity" in result.err and "aodm identity new" in result.err


async def test_unreachable_broker_fails_cleanly(tmp_path):
    assert (await aodm(UNREACHABLE, tmp_path, "identity", "new")).code == 0
    result = await aodm(UNREACHABLE, tmp_path, "chats")
    assert result.failed_cleanly(), result
    assert "broker" in result.err


async def test_identity_is_never_overwritten_by_accident(tmp_path):
    first = await aodm(UNREACHABLE, tmp_path, "identity", "new")
    again = await aodm(UNREACHABLE, tmp_path, "identity", "new")
    assert again.failed_cleanly() and "--force" in again.err
    shown = await aodm(UNREACHABLE, tmp_path, "identity", "show")
    assert first.out.splitlines()[1] in shown.out  # the address is unchanged
    assert (await aodm(UNREACHABLE, tmp_path, "identity", "new", "--force")).code == 0


COMMANDS = [[], ["identity"], ["identity", "new"], ["identity", "show"], ["register"], ["credentials"], ["chats"], ["open"],
            ["send"], ["rotate"], ["history"], ["listen"], ["chat"], ["requests"], ["accept"], ["demo"],
            ["device"], ["device", "code"], ["device", "add"], ["device", "list"], ["device", "remove"],
            ["device", "recovery-key"], ["recover"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "aodm")
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    assert "usage: aodm" in capsys.readouterr().out


# -- times, --json, --version ----------------------------------------------------------


async def test_times_show_their_zone(person):
    alice, as_alice = await person("alice")
    bob, _ = await person("bob")
    sent = (await as_alice("send", bob, "what time is it", "--json", env={"TZ": "XYZ-05:30"})).json()
    assert sent["time"].endswith("+05:30"), sent
    assert round(datetime.fromisoformat(sent["time"]).timestamp() * 1000) == sent["timestamp"]
    for zone, offset in (("XYZ-05:30", "+05:30"), ("UTC", "+00:00"), ("ABC+3", "-03:00")):
        history = await as_alice("history", bob, env={"TZ": zone})
        assert re.fullmatch(rf"\[{TIME}\] {alice}: what time is it\n", history.out), history.out
        assert f":{sent['time'][17:19]} {offset}] " in history.out, (zone, history.out)


async def test_json_output_holds_the_values(person):
    alice, as_alice = await person("alice")
    bob, as_bob = await person("bob")

    shown = (await as_alice("identity", "show", "--json")).json()
    assert shown["handle"] == alice and len(shown["address"]) == 43 and shown["file"].endswith("identity.json")
    assert (await as_alice("--json", "register", alice)).json()["status"] == "already_yours"

    opened = (await as_alice("open", bob, "--json")).json()
    assert opened["peer"] == bob and opened["created"] is True and opened["generation"] == 1
    session = opened["session_id"]
    sent = (await as_alice("send", bob, "hello", "bob", "--json")).json()
    assert {k: sent[k] for k in ("peer", "session_id", "seq", "generation")} == {
        "peer": bob, "session_id": session, "seq": 1, "generation": 1}

    requests = (await as_bob("requests", "--json")).json()
    assert [(r["peer"], [m["text"] for m in r["messages"]]) for r in requests["requests"]] == [(alice, ["hello bob"])]
    assert (await as_bob("accept", alice, "--json")).json() == {"peer": alice, "session_id": session, "state": "accepted"}
    assert (await as_bob("rotate", alice, "--json")).json()["generation"] == 2
    assert (await as_bob("send", alice, "hi", "alice", "--json")).json()["seq"] == 2

    history = (await as_alice("history", bob, "--json")).json()
    assert history["peer"] == bob and history["session_id"] == session
    assert [(m["seq"], m["sender"], m["generation"], m["text"]) for m in history["messages"]] == [
        (1, alice, 1, "hello bob"), (2, bob, 2, "hi alice")]
    assert history["messages"][0]["timestamp"] == sent["timestamp"] and history["messages"][0]["time"] == sent["time"]

    chats = (await as_alice("chats", "--json")).json()
    assert chats["handle"] == alice
    assert [(c["peer"], c["state"], c["session_id"]) for c in chats["chats"]] == [(bob, "accepted", session)]

    listened = await as_bob("listen", "--once", "--timeout", "10", "--json")
    assert listened.code == 0 and listened.err == "", listened
    events = [json.loads(line) for line in listened.out.splitlines()]
    assert {"session_established", "key_rotated", "message"} <= {e["event"] for e in events}, events
    assert [(e["seq"], e["sender"], e["text"]) for e in events if e["event"] == "message"] == [
        (1, alice, "hello bob"), (2, bob, "hi alice")]  # bob's own too: listen catches up the chat


async def test_json_errors(person):
    _, as_alice = await person("alice")
    missing = await as_alice("send", name("nobody"), "hi", "--json")
    assert missing.out == "" and missing.error()["code"] == "not_found", missing
    assert "nobody" in missing.error()["message"]
    empty = await as_alice("--json", "send", name("nobody"), " ")
    assert empty.error() == {"code": "empty_message", "message": "the message is empty: nothing was sent"}
    usage = await as_alice("chats", "--timeout", "0", "--json")
    assert usage.code == 2 and json.loads(usage.err)["error"]["code"] == "usage", usage
    demo = await as_alice("--json", "demo")
    assert demo.code == 2 and "no --json output" in json.loads(demo.err)["error"]["message"]


async def test_version(tmp_path):
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert source_version == declared
    shown = await aodm(UNREACHABLE, tmp_path, "--version")
    assert shown.code == 0 and shown.out == f"aodm {declared}\n", shown
    assert json.loads((await aodm(UNREACHABLE, tmp_path, "--version", "--json")).out) == {"version": declared}


# -- chat -----------------------------------------------------------------------------


class Chat:
    """`aodm chat` in a subprocess: lines go to its stdin, its stdout is read as it comes."""

    def __init__(self, proc) -> None:
        self.proc = proc
        self.lines: list[str] = []

    async def until(self, pattern: str, timeout: float = 30) -> str:
        """Reads stdout up to the first new line matching `pattern`; returns it."""
        async with asyncio.timeout(timeout):
            while True:
                line = (await self.proc.stdout.readline()).decode()
                assert line, f"chat ended before {pattern!r}; it showed:\n" + "".join(self.lines)
                self.lines.append(line)
                if re.search(pattern, line):
                    return line

    async def type(self, line: str) -> None:
        self.proc.stdin.write(line.encode() + b"\n")
        await self.proc.stdin.drain()

    async def end(self, timeout: float = 30) -> Run:
        """Closes its stdin (the end of the input ends the chat) and waits for it."""
        self.proc.stdin.close()
        out, err = await asyncio.wait_for(self.proc.communicate(), timeout)
        self.lines += out.decode().splitlines(keepends=True)
        return Run(self.proc.returncode, "".join(self.lines), err.decode())


@asynccontextmanager
async def chatting(run, *args: str):
    chat = Chat(await run.start("chat", *args, stdin=asyncio.subprocess.PIPE))
    try:
        yield chat
    finally:
        if chat.proc.returncode is None:
            chat.proc.kill()
            await chat.proc.wait()


async def test_chat_shows_history_sends_lines_and_shows_live_messages(person):
    alice, as_alice = await person("alice")
    bob, as_bob = await person("bob")
    carol, as_carol = await person("carol")
    for text in ("one", "two"):
        assert (await as_alice("send", bob, text)).code == 0  # a message request to bob

    async with chatting(as_bob, alice) as chat:
        assert "two" in await chat.until(rf"^\[{TIME}\] {alice}: two$")
        assert [line.split("] ", 1)[1] for line in chat.lines] == [f"{alice}: one\n", f"{alice}: two\n"]

        await chat.type("")  # ignored
        await chat.type("hi alice, from the chat")  # accepts the request
        await chat.until(rf"^\[{TIME}\] {bob}: hi alice, from the chat$")
        history = await as_alice("history", bob)
        assert history.out.splitlines()[-1].endswith(f"{bob}: hi alice, from the chat"), history.out

        assert (await as_carol("send", bob, "psst")).code == 0  # another chat: one line, not its text
        assert (await as_alice("send", bob, "live", "one")).code == 0
        await chat.until(rf"^\[{TIME}\] {alice}: live one$")
        await chat.type("/quit")
        ended = await chat.end()
    assert ended.code == 0, ended
    assert f"* message request from {carol}" in ended.out, ended.out
    assert f"* {carol} wrote in another chat" in ended.out and "psst" not in ended.out, ended.out
    assert "you accepted" in ended.err and "Traceback" not in ended.err, ended.err
    messages = [line.split("] ", 1)[1] for line in ended.out.splitlines() if "] * " not in line]
    assert messages == [f"{alice}: one", f"{alice}: two", f"{bob}: hi alice, from the chat", f"{alice}: live one"]


async def test_chat_as_a_request_in_json(person):
    """A chat opened from nothing: the first line opens the session, a request that holds three
    messages; the fourth is refused with one error line, and the chat goes on to its end."""
    alice, as_alice = await person("alice")
    bob, as_bob = await person("bob")
    async with chatting(as_alice, bob, "--json") as chat:
        first = json.loads(await chat.until(r'"event": "chat"'))
        assert first == {"event": "chat", "handle": alice, "peer": bob, "session_id": None, "state": None}
        for text in ("one", "  ", "two", "three", "four", "five"):
            await chat.type(text)
        await chat.type("six, after the refusals")
        ended = await chat.end()
    assert ended.code == 0, ended
    events = [json.loads(line) for line in ended.out.splitlines()]
    sent = [e for e in events if e["event"] == "sent"]
    assert [(e["seq"], e["sender"], e["text"]) for e in sent] == [(1, alice, "one"), (2, alice, "two"), (3, alice, "three")]
    assert all(e["peer"] == bob and e["time"] for e in sent)
    errors = [json.loads(line)["error"] for line in ended.err.splitlines()]
    assert [e["code"] for e in errors] == ["not_accepted"] * 3, ended.err
    shown = await as_bob("requests", "--json")
    assert [m["text"] for m in shown.json()["requests"][0]["messages"]] == ["one", "two", "three"]

    async with chatting(as_bob, alice, "--json") as chat:  # bob's side: the request, then his reply
        await chat.type("welcome")
        ended = await chat.end()
    events = [json.loads(line) for line in ended.out.splitlines()]
    assert events[0]["state"] == "incoming"
    assert [(e["event"], e["text"]) for e in events if "text" in e] == [
        ("history", "one"), ("history", "two"), ("history", "three"), ("sent", "welcome")]


# -- refusals -------------------------------------------------------------------------


async def test_an_empty_message_is_refused_and_nothing_sent(person):
    _, as_alice = await person("alice")
    bob, _ = await person("bob")
    for text in ("", "   ", "\t\n"):
        refused = await as_alice("send", bob, text)
        assert refused.failed_cleanly() and "empty" in refused.err, refused
    assert (await as_alice("chats", "--json")).json()["chats"] == []  # not even a session opened


@pytest.mark.parametrize("value", ["0", "-5", "0.001", "nan", "inf", "3601", "soon"])
async def test_bad_timeouts_are_refused(tmp_path, value):
    for args in (("chats", "--timeout", value), ("--timeout", value, "chats"), ("listen", "--timeout", value),
                 ("demo", "--wait", value)):
        result = await aodm(UNREACHABLE, tmp_path, *args, timeout=20)
        assert result.code == 2 and "Traceback" not in result.err, result
        assert re.search(r"argument --(timeout|wait): .*(not between 0.1 and 3600|not a number)", result.err), result


async def test_a_tiny_timeout_fails_fast(tmp_path):
    """A broker that accepts the connection and never answers: the connect is cut at --timeout,
    and the process ends (aio-pika's reconnect task, left behind, once kept it alive forever)."""
    held = []  # the connections, kept open and unanswered
    silent = await asyncio.start_server(lambda reader, writer: held.append(writer), "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    try:
        assert (await aodm(UNREACHABLE, tmp_path, "identity", "new")).code == 0
        begun = asyncio.get_running_loop().time()
        result = await aodm(f"amqp://guest:guest@127.0.0.1:{port}/", tmp_path, "chats", "--timeout", "0.1", timeout=20)
        assert result.failed_cleanly() and "no answer from the broker" in result.err and "0.1s" in result.err, result
        assert asyncio.get_running_loop().time() - begun < 10
    finally:
        for writer in held:
            writer.close()
        silent.close()
