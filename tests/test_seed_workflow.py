"""The eight steps of the seed workflow, end to end, with real crypto and two clients;
B is offline (no consumer on its queue) until step 8."""

import urllib.parse

from aodm import crypto, topology
from aodm.inbox import Inbox
from aodm.notifications import KeyRotated, NewMessage, SessionEstablished
from tests.conftest import management
from tests.helpers import open_pair


async def test_eight_steps_with_b_offline(make_client):
    alice = await make_client("alice")
    bob = await make_client("bob")
    session = (await alice.establish_session(bob.handle)).session_id

    # 1–3: alice makes SK and seals it to herself and to bob's registered box key.
    sk = crypto.new_session_key()
    bob_box = (await alice.query_handle(bob.handle)).box_key
    assert bob_box == bob.identity.box_public
    # 4: both sealed keys go to the session process.
    generation = await alice.rotate_session_key(session, bob.handle, sk)
    assert generation == 1
    # 5–6: alice encrypts with SK and sends.
    sent = await alice.send_message(session, crypto.encrypt(sk, "hello bob"), generation)
    assert sent.generation == 1 and sent.seq == 1

    # 7–8: bob comes online and finds the notifications waiting in his durable queue.
    async with Inbox(bob.bus, bob.handle) as inbox:
        kinds = []
        while True:
            note = await inbox.next(timeout=10)
            kinds.append(type(note))
            if isinstance(note, NewMessage):
                break
    assert kinds == [SessionEstablished, KeyRotated, NewMessage]
    assert note.sender == alice.handle and note.session_id == session
    batch = await bob.get_key_by_generation(session, note.generation)
    mine = next(k for k in batch.keys if k.handle == bob.handle)
    assert crypto.open_session_key(mine.sealed_key, bob.identity.box_key) == sk
    assert await bob.decrypt(session, note.generation, note.content) == "hello bob"
    # The stored copy reads back the same.
    history = await bob.history(session)
    assert [await bob.read_text(session, m) for m in history] == ["hello bob"]
    assert history[0].sender_key == alice.identity.address


async def test_a_deleted_inbox_is_recreated_and_the_notification_delivered(stack, make_client):
    """The services publish notifications straight into the handle's queue; when it is not
    there (an operator deleted it), the notifier creates it again and delivers."""
    alice = await make_client("alice")
    bob = await make_client("bob")
    session, key = await open_pair(alice, bob)
    vhost = urllib.parse.quote(stack.amqp_url.rsplit("/", 1)[1], safe="")
    management("DELETE", f"/queues/{vhost}/{urllib.parse.quote(topology.inbox_queue(bob.handle), safe='')}")
    sent = await alice.send_message(session, crypto.encrypt(key, "still delivered"), 1)
    async with Inbox(bob.bus, bob.handle) as inbox:
        note = await inbox.next(timeout=10)
    assert isinstance(note, NewMessage) and note.message_id == sent.message_id
    assert await bob.decrypt(session, note.generation, note.content) == "still delivered"
