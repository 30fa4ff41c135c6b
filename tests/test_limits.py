"""Send limits (services/session/limits.py) on a clock of the test's: pure logic."""

from services.session.limits import SendLimits


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_then_the_rate_and_a_refusal_takes_nothing():
    clock = Clock()
    limits = SendLimits.per_second(sender=100, session=2, clock=clock)  # a session: 20 at once, then 2 a second
    assert all(limits.take("alice", "s1") is None for _ in range(20))
    refused = limits.take("alice", "s1")
    assert refused is not None and refused.code == "rate_limited" and refused.retry_after_ms == 500
    clock.now += 0.5
    assert limits.take("alice", "s1") is None  # the token that refill made
    assert limits.take("alice", "s1") is not None
    assert limits.take("alice", "s2") is None  # another session: its own bucket
    assert limits.take("bob", "s1") is None  # another sender too


def test_the_sender_limit_spans_its_sessions():
    clock = Clock()
    limits = SendLimits.per_second(sender=1, session=100, clock=clock)  # 10 at once over all sessions
    assert [limits.take("alice", f"s{i}") is None for i in range(11)] == [True] * 10 + [False]
    clock.now += 1.0
    assert limits.take("alice", "s99") is None
