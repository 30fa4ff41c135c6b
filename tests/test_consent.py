"""Message requests against a running stack: a session opened by one member is a request to
the other until it accepts; until then it holds a few messages and is notified once; a block
refuses the blocked member's messages and looks to it like a request not accepted."""

import asyncio

import msgspec
import pytest

from aodm import crypto
from aodm.client import Client
from aodm.envelope import MAX_DATA_BYTES
from aodm.errors import Forbidden, MalformedRequest, NotAccepted, PayloadTooLarge, Unauthorized
from aodm.inbox import Inbox
from aodm.notifications import KeyRotated, NewMessage, SessionEstablished
from aodm.session_api import SendMessage, Sent
from tests.test_session import raw_call

REQUEST_MESSAGES = 3  # the default AODM_REQUEST_MESSAGES


async def chat_state(client: Client, session: str) -> str:
    chats = (await client.get_chat_list()).chats
    return next(c.state for c in chats if c.session_id == session)


async def eventually_state(client: Client, session: str, state: str, timeout: float = 10) -> None:
    """The chat lists follow the session worker a moment later (an internal report)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while (now := await chat_state(client, session)) != state:
        assert asyncio.get_running_loop().time() < deadline, f"chat state stayed {now!r}, expected {state!r}"
        await asyncio.sleep(0.1)


@pytest.fixture
async def request_pair(make_client):
    """alice has opened a session with bob (a request to bob) and has a key."""
    alice, bob = await make_client("alice"), await make_client("bob")
    session = (await alice.establish_session(bob.handle)).session_id
    await alice.rotate_session_key(session, bob.handle)
    return alice, bob, session


async def test_a_new_session_is_a_request_to_the_peer_and_its_notification_says_so(make_client):
    alice, bob = await make_client("alice"), await make_client("bob")
    async with Inbox(alice.bus, alice.handle) as alice_inbox, Inbox(bob.bus, bob.handle) as bob_inbox:
        session = (await alice.establish_session(bob.handle)).session_id
        to_bob, to_alice = await bob_inbox.next(timeout=10), await alice_inbox.next(timeout=10)
    assert isinstance(to_bob, SessionEstablished) and to_bob.state == "incoming" and to_bob.peer == alice.handle
    assert isinstance(to_alice, SessionEstablished) and to_alice.state == "outgoing"
    assert await chat_state(bob, session) == "incoming"
    assert await chat_state(alice, session) == "outgoing"


async def test_a_request_holds_a_few_messages_and_is_notified_once(make_client):
    alice, bob = await make_client("alice"), await make_client("bob")
    async with Inbox(bob.bus, bob.handle) as bob_inbox:
        session = (await alice.establish_session(bob.handle)).session_id
        await alice.rotate_session_key(session, bob.handle)
        await alice.rotate_session_key(session, bob.handle)  # a second key: not notified to bob
        sent = [await alice.send_text(session, f"hi {i}") for i in range(REQUEST_MESSAGES)]
        with pytest.raises(NotAccepted):
            await alice.send_text(session, "one too many")
        assert [s.seq for s in sent] == [1, 2, 3]
        # bob reads the request's messages before deciding
        page = (await bob.query_messages(session)).messages
        assert [await bob.read_text(session, m) for m in page] == ["hi 0", "hi 1", "hi 2"]
        assert await bob.accept(session) == "accepted"
        after = await alice.send_text(session, "now you know me")
        # Notifications arrive in order: had more of the request's been sent, they would come first.
        notes = []
        while not (notes and isinstance(notes[-1], NewMessage) and notes[-1].seq == after.seq):
            notes.append(await bob_inbox.next(timeout=10))
    # The request: its session, first key and first message, what bob needs to read it; then 4.
    assert [type(n) for n in notes] == [SessionEstablished, KeyRotated, NewMessage, NewMessage]
    assert [n.seq for n in notes if isinstance(n, NewMessage)] == [1, after.seq] == [1, 4]
    await eventually_state(alice, session, "accepted")
    assert await chat_state(bob, session) == "accepted"


async def test_pipelined_sends_past_the_request_are_refused_one_by_one(request_pair):
    """However the sends share batches, exactly the first few are stored, in order."""
    alice, bob, session = request_pair
    key = (await alice.session_key(session))[1]
    pending = []
    for i in range(REQUEST_MESSAGES + 4):
        env = alice.sign(session, "SendMessage", SendMessage(crypto.encrypt(key, str(i)), 1))
        pending.append((env, await alice.submit(env)))
    results = await asyncio.gather(*(alice.result_of(env, reply) for env, reply in pending), return_exceptions=True)
    stored = [msgspec.json.decode(r, type=Sent).seq for r in results if not isinstance(r, Exception)]
    assert stored == [1, 2, 3]
    assert all(isinstance(r, NotAccepted) for r in results[REQUEST_MESSAGES:])
    assert len((await bob.query_messages(session)).messages) == REQUEST_MESSAGES


async def test_a_reply_accepts_the_request(request_pair):
    """The seed's flow: alice writes, bob answers; from then on it is an ordinary session."""
    alice, bob, session = request_pair
    await alice.send_text(session, "hello bob")
    await bob.send_text(session, "hello alice")
    for i in range(REQUEST_MESSAGES + 2):
        await alice.send_text(session, f"more {i}")
    await eventually_state(alice, session, "accepted")
    await eventually_state(bob, session, "accepted")


async def test_the_opener_cannot_rotate_without_bound_before_acceptance(request_pair):
    alice, bob, session = request_pair
    await alice.rotate_session_key(session, bob.handle)
    await alice.rotate_session_key(session, bob.handle)
    with pytest.raises(NotAccepted):
        await alice.rotate_session_key(session, bob.handle)
    assert await bob.rotate_session_key(session, alice.handle) == 4  # the request's recipient may


async def test_a_block_refuses_the_blocked_and_looks_to_it_like_an_unanswered_request(request_pair):
    alice, bob, session = request_pair
    await alice.send_text(session, "hello")
    assert await bob.block(session) == "blocked"
    with pytest.raises(NotAccepted):
        await alice.send_text(session, "let me in")
    with pytest.raises(NotAccepted):
        await alice.rotate_session_key(session, bob.handle)
    with pytest.raises(Forbidden):  # the blocker must unblock to write
        await bob.send_text(session, "hm")
    await eventually_state(bob, session, "blocked")
    assert await chat_state(alice, session) == "outgoing"
    assert await alice.accept(session) == "outgoing"  # nothing alice can do about it
    assert await bob.block(session) == "blocked"  # again: no change
    assert len((await bob.query_messages(session)).messages) == 1
    assert await bob.unblock(session) == "accepted"
    await alice.send_text(session, "thanks")
    for who in (alice, bob):
        await eventually_state(who, session, "accepted")


async def test_a_block_of_an_accepted_session_stops_its_notifications(make_client):
    alice, bob = await make_client("alice"), await make_client("bob")
    session = (await alice.establish_session(bob.handle)).session_id
    await bob.accept(session)
    await alice.rotate_session_key(session, bob.handle)
    async with Inbox(bob.bus, bob.handle) as bob_inbox:
        await alice.send_text(session, "1")
        await bob.block(session)
        with pytest.raises(NotAccepted):
            await alice.send_text(session, "2")
        await bob.unblock(session)
        last = await alice.send_text(session, "3")
        seqs = []
        while last.seq not in seqs:
            note = await bob_inbox.next(timeout=10)
            if isinstance(note, NewMessage):
                seqs.append(note.seq)
    assert seqs == [1, 2]  # "2" was never stored: "3" took the next Seq, no gap


async def test_consent_actions_are_for_members_only_and_take_no_data(request_pair, make_client):
    alice, bob, session = request_pair
    mallory = await make_client("mallory")
    with pytest.raises(Forbidden):
        await mallory.accept(session)
    with pytest.raises(Forbidden):
        await mallory.block(session)
    with pytest.raises(MalformedRequest):
        await raw_call(bob, session, "Accept", {"As": alice.handle})
    assert await chat_state(bob, session) == "incoming"


@pytest.mark.parametrize("action", ["Accept", "Block", "Unblock"])
async def test_a_consent_change_signed_by_another_key_or_oversized_changes_nothing(request_pair, make_client, action):
    """mallory cannot act as bob (his key did not sign), and an oversized Data is refused
    before anything runs: bob's request stays incoming."""
    alice, bob, session = request_pair
    mallory = await make_client("mallory")
    with pytest.raises(Unauthorized):
        await raw_call(mallory, session, action, {}, from_=bob.handle)
    with pytest.raises((PayloadTooLarge, MalformedRequest)):
        await raw_call(bob, session, action, '{"Pad":"' + "x" * (MAX_DATA_BYTES + 1) + '"}')
    assert await chat_state(bob, session) == "incoming"
    with pytest.raises(NotAccepted):  # alice's request is still limited: nothing was accepted
        for i in range(REQUEST_MESSAGES + 1):
            await alice.send_text(session, f"m{i}")
