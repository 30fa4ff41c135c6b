"""A client in another language interoperates: examples/node (written from docs/protocol.md
and tests/vectors/ alone) passes the vectors, and runs the seed workflow against the real
services with the Python client on the other side, both directions decrypting; a
message request (docs/protocol.md §11.6) from Node, which the Python client accepts; and
device logs (§10.8) made by one client and replayed by the other.

Node.js and npm are required (CI installs them: scripts/test.sh, prepare_node); without
them these tests fail, they do not skip.
"""

import asyncio
import json
import os
import secrets
import shutil
import subprocess
import urllib.error
import urllib.parse
from pathlib import Path

import pytest

from aodm import crypto, devices, topology
from aodm.client import Client
from aodm.crypto import Identity
from aodm.encoding import b64decode
from aodm.errors import NotAccepted
from aodm.inbox import Inbox
from aodm.notifications import KeyRotated, NewMessage, SessionEstablished
from tests.conftest import MANAGEMENT, isolated_settings, management, running_services

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "node"
LINE_TIMEOUT = 60


def require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(
            f"`{tool}` is not installed: the Node.js example client (examples/node) is tested "
            "against the services. Install Node.js 18+ and npm (scripts/test.sh does, with "
            "apt-get: nodejs npm)."
        )
    return path


def npm_ci(directory: Path) -> None:
    if (directory / "node_modules").is_dir():
        return
    done = subprocess.run(
        [require("npm"), "ci", "--no-audit", "--no-fund"], cwd=directory, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"npm ci in {directory} failed:\n{done.stdout}\n{done.stderr}"


def test_node_client_passes_the_vectors():
    node = require("node")
    npm_ci(EXAMPLE)
    done = subprocess.run(
        [node, "--test", "examples/node/"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"node --test examples/node/ failed:\n{done.stdout[-6000:]}\n{done.stderr[-3000:]}"
    assert "# fail 0" in done.stdout


class NodeSeed:
    """`node examples/node/<script>.mjs` as a subprocess, read as JSON lines."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    async def stderr(self) -> str:
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        return (await self.process.stderr.read()).decode(errors="replace")

    async def next(self, event: str) -> dict:
        try:
            raw = await asyncio.wait_for(self.process.stdout.readline(), LINE_TIMEOUT)
        except TimeoutError:
            pytest.fail(f"node printed nothing within {LINE_TIMEOUT}s waiting for {event!r}:\n{await self.stderr()}")
        if not raw:
            pytest.fail(f"node exited ({await self.process.wait()}) before {event!r}:\n{await self.stderr()}")
        line = json.loads(raw)
        if line.get("event") != event:
            pytest.fail(f"node: expected {event!r}, got {line}\n{await self.stderr()}")
        return line

    async def tell(self, line: str) -> None:
        self.process.stdin.write(line.encode() + b"\n")
        await self.process.stdin.drain()


async def seed_workflow(amqp_url: str, python: Client, reply_queue: str = "direct", node_handle: str | None = None) -> dict:
    """Node registers and does steps 1–6; Python does 7–8 and replies; Node reads the reply.
    Returns Node's `registered` line."""
    node = require("node")
    npm_ci(EXAMPLE)
    node_handle = node_handle or f"node-{secrets.token_hex(4)}"
    process = await asyncio.create_subprocess_exec(
        node, str(EXAMPLE / "seed.mjs"), "--peer", python.handle, "--handle", node_handle, "--reply-queue", reply_queue,
        cwd=ROOT,
        env={**os.environ, "AODM_AMQP_URL": amqp_url},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    seed = NodeSeed(process)
    try:
        # Node registered; the registry holds the keys Node derived.
        registered = await seed.next("registered")
        assert registered["handle"] == node_handle
        info = await python.query_handle(node_handle)
        assert (info.sign_key, info.box_key) == (registered["address"], registered["boxKey"])

        # Steps 1–6 in Node: session, key sealed to both, rotated in, message sent.
        sent = await seed.next("sent")
        session = sent["session"]
        assert sent["peer"] == python.handle and sent["seq"] == 1 and sent["generation"] == 1
        assert await python.query_session(python.handle, node_handle) == session

        # 7. Python finds the notifications in its durable queue: the session is Node's
        # message request to it, which holds the first key and message (§11.6).
        async with Inbox(python.bus, python.handle) as inbox:
            notes = []
            while not (notes and isinstance(notes[-1], NewMessage)):
                notes.append(await inbox.next(timeout=30))
        assert [type(n) for n in notes] == [SessionEstablished, KeyRotated, NewMessage]
        assert (notes[0].session_id, notes[0].peer, notes[0].state) == (session, node_handle, "incoming")
        note = notes[-1]
        assert (note.session_id, note.sender, note.message_id) == (session, node_handle, sent["messageId"])

        # 8. Python opens the key Node sealed to it, and decrypts Node's message.
        batch = await python.get_key_by_generation(session, note.generation)
        assert batch.rotated_by == node_handle and [k.handle for k in batch.keys] == sorted([node_handle, python.handle])
        mine = next(k for k in batch.keys if k.handle == python.handle)
        assert len(crypto.open_session_key(mine.sealed_key, python.identity.box_key)) == 32
        assert await python.decrypt(session, note.generation, note.content) == sent["text"]
        stored = (await python.history(session))[0]
        assert stored.sender_key == registered["address"]  # Node's signature authenticated it

        # Python replies; Node reads it from its own inbox and decrypts it, and its history.
        reply = f"hello {node_handle}, from Python ✓ 😀"
        await python.send_text(session, reply)
        read = await seed.next("read")
        assert read["text"] == reply and read["sender"] == python.handle and read["seq"] == 2
        assert [(m["Seq"], m["Sender"], m["Text"]) for m in read["history"]] == [
            (1, node_handle, sent["text"]),
            (2, python.handle, reply),
        ]
        assert read["notifications"] == ["SessionEstablished", "KeyRotated", "NewMessage"]
        assert read["checks"] and all(read["checks"].values()), read["checks"]
        assert await asyncio.wait_for(process.wait(), 30) == 0, await seed.stderr()
        return registered
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


@pytest.mark.parametrize("reply_queue", ["direct", "exclusive"])
async def test_node_and_python_clients_talk_both_ways(stack, make_client, reply_queue):
    """Replies via RabbitMQ direct reply-to, or via the client's own exclusive queue."""
    registered = await seed_workflow(stack.amqp_url, await make_client("py"), reply_queue)
    assert registered["brokerUser"] is None  # this deployment issues no per-handle broker users


async def test_node_client_as_its_own_least_privilege_broker_user():
    """Where the registry issues each handle its own broker user (configure nothing, write
    aodm.requests, read its own inbox), Node opens the sealed password, reconnects as that
    user and does everything with direct reply-to."""
    prefix = f"aodm-node-{secrets.token_hex(3)}."
    python_handle, node_handle = f"py-{secrets.token_hex(4)}", f"node-{secrets.token_hex(4)}"
    async with isolated_settings(broker_admin_url=MANAGEMENT, broker_user_prefix=prefix) as settings:
        try:
            async with running_services(settings):
                python = await Client.connect(settings.amqp_url, Identity.generate())
                try:
                    await python.register(python_handle)
                    registered = await seed_workflow(settings.amqp_url, python, "direct", node_handle)
                finally:
                    await python.close()
            assert registered["brokerUser"] == prefix + node_handle
        finally:
            for handle in (python_handle, node_handle):
                try:
                    management("DELETE", f"/users/{urllib.parse.quote(prefix + handle, safe='')}")
                except urllib.error.HTTPError as exc:
                    if exc.code != 404:
                        raise


async def next_message(inbox: Inbox, seq: int) -> tuple[list, NewMessage]:
    """The notifications up to the NewMessage of `seq`, and that one."""
    notes = []
    while not (notes and isinstance(notes[-1], NewMessage) and notes[-1].seq == seq):
        notes.append(await inbox.next(timeout=30))
    return notes, notes[-1]


async def test_a_node_message_request_holds_three_messages_until_python_accepts(stack, make_client):
    """examples/node/requests.mjs opens a session with Python: Node's message request. It
    holds three messages (Node's fourth is NotAccepted, and a fourth key generation too);
    Python is told of the request, reads it, accepts it, and Node's next messages go and are
    notified. Then Node blocks Python (Python is answered not_accepted, as if the request
    were unanswered), lifts the block, and they talk both ways."""
    python = await make_client("py")
    node = require("node")
    npm_ci(EXAMPLE)
    node_handle = f"node-{secrets.token_hex(4)}"
    process = await asyncio.create_subprocess_exec(
        node, str(EXAMPLE / "requests.mjs"), "--peer", python.handle, "--handle", node_handle,
        cwd=ROOT,
        env={**os.environ, "AODM_AMQP_URL": stack.amqp_url},
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    run = NodeSeed(process)
    try:
        await run.next("registered")
        request = await run.next("request")
        session = request["session"]
        assert (request["established"], request["chatState"]) == ("outgoing", "outgoing")
        assert request["seqs"] == [1, 2, 3]
        assert (request["refused"], request["refusedAs"]) == ("not_accepted", "NotAccepted")
        assert (request["generations"], request["rotationRefused"]) == ([1, 2, 3], "not_accepted")
        assert request["ownAccept"] == "outgoing"  # only the recipient can accept it

        # Python has one request waiting, and reads all of it before deciding.
        chats = (await python.get_chat_list()).chats
        assert [(c.session_id, c.peer, c.state) for c in chats] == [(session, node_handle, "incoming")]
        history = await python.history(session)
        assert [(m.seq, m.sender) for m in history] == [(1, node_handle), (2, node_handle), (3, node_handle)]
        assert [await python.read_text(session, m) for m in history] == request["texts"]

        async with Inbox(python.bus, python.handle) as inbox:
            assert await python.accept(session) == "accepted"
            accepted = await run.next("accepted")
            assert accepted["seqs"] == [4, 5]
            notes, _ = await next_message(inbox, 5)
            # Told of the request once: at most its first key and message, none of the rest.
            established = [n for n in notes if isinstance(n, SessionEstablished)]
            assert [(n.session_id, n.peer, n.state) for n in established] == [(session, node_handle, "incoming")]
            assert {n.generation for n in notes if isinstance(n, KeyRotated)} <= {1}
            after = [n for n in notes if isinstance(n, NewMessage) and n.seq > 1]
            assert [n.seq for n in after] == [4, 5]
            assert [await python.decrypt(session, n.generation, n.content) for n in after] == accepted["texts"]

            # Node blocks Python: to Python it looks like a request not accepted yet.
            blocked = await run.next("blocked")
            assert blocked["states"] == {"block": "blocked", "blockAgain": "blocked"}
            assert blocked["ownSend"] == "forbidden"
            with pytest.raises(NotAccepted):
                await python.send_text(session, "let me in")
            assert await python.accept(session) == "outgoing"  # nothing Python can do about it
            await run.tell("go on")

            unblocked = await run.next("unblocked")
            assert unblocked["states"] == {"accept": "accepted", "block": "blocked", "unblock": "accepted"}
            assert unblocked["seq"] == 6  # Python's refused message took no Seq
            _, note = await next_message(inbox, 6)
            assert await python.decrypt(session, note.generation, note.content) == unblocked["text"]

        reply = f"welcome, {node_handle} ✓"
        sent = await python.send_text(session, reply)
        read = await run.next("read")
        assert (read["text"], read["sender"], read["seq"]) == (reply, python.handle, sent.seq) == (reply, python.handle, 7)
        # Node's own: its request's SessionEstablished, its three rotations, Python's reply.
        assert read["notifications"] == ["SessionEstablished", "KeyRotated", "KeyRotated", "KeyRotated", "NewMessage"]
        assert await asyncio.wait_for(process.wait(), 30) == 0, await run.stderr()
        # The chat list follows the session a moment later (§10.6).
        deadline = asyncio.get_running_loop().time() + 10
        while (states := [c.state for c in (await python.get_chat_list()).chats]) != ["accepted"]:
            assert asyncio.get_running_loop().time() < deadline, states
            await asyncio.sleep(0.1)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_node_and_python_verify_each_other_s_device_logs(stack, make_client):
    """examples/node/devices.mjs replays the device log of a Python handle with two devices;
    then adds a device to its own handle and removes it, and the Python client replays
    that log of Node-signed entries."""
    python = await make_client("py")
    phone = Identity.generate()
    await python.add_device(devices.device_code(python.handle, phone.signing_key, phone.box_public))
    mine = await python.device_log()
    node = require("node")
    npm_ci(EXAMPLE)
    node_handle = f"node-{secrets.token_hex(4)}"
    process = await asyncio.create_subprocess_exec(
        node, str(EXAMPLE / "devices.mjs"), "--peer", python.handle, "--handle", node_handle,
        cwd=ROOT,
        env={**os.environ, "AODM_AMQP_URL": stack.amqp_url},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    run = NodeSeed(process)
    try:
        peer_log = await run.next("peerLog")
        assert (peer_log["handle"], peer_log["seq"], peer_log["head"]) == (python.handle, 2, mine.head)
        assert {d["DeviceId"]: (d["Kind"], d["SignKey"], d["BoxKey"], d["AddedSeq"]) for d in peer_log["devices"]} == {
            d.device_id: (d.kind, d.sign_key, d.box_key, d.added_seq) for d in mine.devices.values()
        }
        assert set(mine.devices) == {python.device_id, devices.device_id(bytes(phone.signing_key.verify_key))}

        registered = await run.next("registered")
        assert registered["deviceId"] == devices.device_id(b64decode(registered["address"]))
        added = await run.next("added")
        assert added["seq"] == 2 and set(added["devices"]) == {registered["deviceId"], added["deviceId"]}
        assert added["queue"] == topology.device_inbox(node_handle, added["deviceId"], 2)
        assert added["chats"] == 0
        removed = await run.next("removed")
        assert removed["selfRemoval"] == "forbidden"
        assert (removed["seq"], removed["devices"]) == (3, [registered["deviceId"]])
        assert await asyncio.wait_for(process.wait(), 30) == 0, await run.stderr()

        log = await python.device_log(node_handle)  # Node's entries, replayed by Python's rules
        assert (log.seq, log.head, set(log.devices)) == (3, removed["head"], {registered["deviceId"]})
        assert log.ever == {registered["deviceId"], added["deviceId"]}
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
