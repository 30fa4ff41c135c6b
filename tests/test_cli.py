"""The `aodm` command line, run as a subprocess against the test stack.

The stack's services run in this process's event loop, so the CLI is awaited as an asyncio
subprocess (a blocking `subprocess.run` would stall the services it talks to)."""

import asyncio
import os
import re
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from aodm.cli import main

ROOT = Path(__file__).resolve().parent.parent
UNREACHABLE = "amqp://guest:guest@127.0.0.1:1/"


@dataclass
class Run:
    code: int
    out: str
    err: str

    def failed_cleanly(self) -> bool:
        """Exit 1 with exactly one line on stderr and no traceback."""
        return self.code == 1 and "Traceback" not in self.err and len(self.err.strip().splitlines()) == 1


async def aodm(url: str, home: Path, *args: str, timeout: float = 60) -> Run:
    env = {**os.environ, "AODM_AMQP_URL": url, "AODM_IDENTITY": str(home / "identity.json"), "HOME": str(home)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aodm", *args, cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
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
    assert re.match(r"sent #1 to .* at \d{4}-\d\d-\d\d \d\d:\d\d:\d\d", sent.out)

    history = await as_bob("history", alice)
    assert history.code == 0, history.err
    assert re.search(rf"^\[\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d\] {alice}: hello bob, this is secret$", history.out, re.M)

    listened = await as_bob("listen", "--once", "--timeout", "10")
    assert listened.code == 0, listened.err
    assert f"message request from {alice}" in listened.out
    assert f"rotated to generation 1 by {alice}" in listened.out
    assert f"] {alice}: hello bob, this is secret" in listened.out

    chats = await as_bob("chats")
    assert chats.code == 0 and alice in chats.out and session_id in chats.out
    assert re.search(rf"^{alice}\s+incoming\s", chats.out, re.M), chats.out


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
            ["send"], ["rotate"], ["history"], ["listen"], ["demo"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "aodm")
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    assert "usage: aodm" in capsys.readouterr().out
