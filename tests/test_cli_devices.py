"""`aodm device …` and `aodm recover` against the test stack: a second machine becomes a
device of a handle with a code carried from it, both list the same verified devices, and
a removed device is refused."""

import json
import re

from tests.test_cli import aodm, name


async def test_a_second_machine_is_added_listed_and_removed(stack, tmp_path):
    laptop, phone = tmp_path / "laptop", tmp_path / "phone"
    handle = name("bob")
    for home in (laptop, phone):
        assert (await aodm(stack.amqp_url, home, "identity", "new")).code == 0
    assert (await aodm(stack.amqp_url, laptop, "register", handle)).code == 0
    code = (await aodm(stack.amqp_url, phone, "--json", "device", "code", handle)).json()
    added = await aodm(stack.amqp_url, laptop, "--json", "device", "add", code["code"])
    assert added.json() == {"handle": handle, "device_id": code["device_id"], "seq": 2, "rotated": 0,
                            "keys_shared": 0}, added.err
    heard = await aodm(stack.amqp_url, laptop, "--json", "listen", "--once", "--timeout", "5")
    events = [json.loads(line) for line in heard.out.splitlines()]
    assert {"event": "devices_changed", "handle": handle, "change": "added", "device_id": code["device_id"],
            "seq": 2}.items() <= next(e for e in events if e["event"] == "devices_changed").items(), heard.out
    listed = [(await aodm(stack.amqp_url, home, "--json", "device", "list")).json() for home in (laptop, phone)]
    assert listed[0]["head"] == listed[1]["head"] and listed[0]["seq"] == 2
    assert [d["this_device"] for d in listed[1]["devices"]] == [False, True]
    chats = await aodm(stack.amqp_url, phone, "chats")  # the phone acts as the handle
    assert chats.code == 0, chats.err
    removed = await aodm(stack.amqp_url, laptop, "device", "remove", code["device_id"])
    assert removed.code == 0 and "refused from now on" in removed.out, removed.err
    refused = await aodm(stack.amqp_url, phone, "--json", "chats")
    assert refused.error()["code"] == "unauthorized"


async def test_a_recovery_secret_brings_a_handle_back_to_a_new_machine(stack, tmp_path):
    lost, new = tmp_path / "lost", tmp_path / "new"
    handle = name("carol")
    for home in (lost, new):
        assert (await aodm(stack.amqp_url, home, "identity", "new")).code == 0
    assert (await aodm(stack.amqp_url, lost, "register", handle)).code == 0
    secret = (await aodm(stack.amqp_url, lost, "--json", "device", "recovery-key")).json()["recovery_secret"]
    assert re.fullmatch("[0-9a-f]{64}", secret), secret  # never read as an option (base64url could start with "-")
    recovered = await aodm(stack.amqp_url, new, "--json", "recover", handle, secret)
    assert recovered.json()["seq"] == 3, recovered.err
    kinds = sorted(d["kind"] for d in (await aodm(stack.amqp_url, new, "--json", "device", "list")).json()["devices"])
    assert kinds == ["device", "device", "recovery"]
    wrong = await aodm(stack.amqp_url, new, "--json", "recover", handle, "not-a-secret")
    assert wrong.error()["code"] == "malformed_request"
