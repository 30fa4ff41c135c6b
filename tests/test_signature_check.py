"""The signature check of a batch of reads alone, which runs while their queries are in the
database (shared.service._SignatureCheck): pure logic, no broker or database."""

import asyncio

import msgspec
from nacl.signing import SigningKey

from shared import envelope
from shared import service
from shared.service import Outcome, _SignatureCheck


def _outcome(*, tampered: bool = False) -> Outcome:
    env = envelope.sign(SigningKey.generate(), target="s", from_=None, action="QueryMessage", data="{}")
    if tampered:
        env = msgspec.structs.replace(env, data='{"Limit":1}')
    return Outcome(delivery=None, env=env)


def _counting_verify(monkeypatch) -> list[str]:
    checked: list[str] = []
    verify = envelope.verify

    def counting(env):
        checked.append(env.id)
        return verify(env)

    monkeypatch.setattr(service.envelopes, "verify", counting)
    return checked


async def test_checked_at_the_loops_next_turn_while_the_task_waits(monkeypatch):
    checked = _counting_verify(monkeypatch)
    good, bad, garbage = _outcome(), _outcome(tampered=True), Outcome(delivery=None)  # garbage: no envelope
    check = _SignatureCheck([good, bad, garbage])
    assert checked == []  # the task that made it has not waited yet
    await asyncio.sleep(0)  # it waits (for the database, in the service): the check runs
    assert checked == [good.env.id, bad.env.id]
    refused = check.refused()
    assert checked == [good.env.id, bad.env.id]  # not checked twice
    assert [(o, e.code) for o, e in refused] == [(bad, "invalid_signature")]


async def test_asked_before_its_turn_it_checks_at_once_and_only_once(monkeypatch):
    checked = _counting_verify(monkeypatch)
    bad = _outcome(tampered=True)
    check = _SignatureCheck([bad])
    assert [o for o, _ in check.refused()] == [bad]
    await asyncio.sleep(0)
    assert checked == [bad.env.id]
