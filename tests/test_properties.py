"""A property: whatever a user (or two threads of users) does in whatever order, every reply is the one plain
transformers gives, every turn's books balance, and closing leaves no tensor and no Redis key behind."""

from __future__ import annotations

import gc
import random
import threading
import weakref

import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import live_keys, tiered
from tests.test_session import SYSTEMS, assert_exact, assert_kv_agrees, random_message

SLOTS = 2  # sessions per thread
op = st.one_of(
    st.tuples(st.just("open"), st.integers(0, SLOTS - 1), st.integers(0, len(SYSTEMS) - 1)),
    st.tuples(st.just("send"), st.integers(0, SLOTS - 1), st.integers(0, 10**6)),
    st.tuples(st.just("stream_cancel"), st.integers(0, SLOTS - 1), st.integers(0, 4)),
    st.tuples(st.just("edit"), st.integers(0, SLOTS - 1), st.integers(0, 10**6)),
    st.tuples(st.just("regenerate"), st.integers(0, SLOTS - 1), st.just(0)),
    st.tuples(st.just("demote"), st.integers(0, SLOTS - 1), st.just(0)),
    st.tuples(st.just("close"), st.integers(0, SLOTS - 1), st.just(0)),
)


def play(rt, ops, refs: list) -> None:
    """One user's actions over their own sessions; checks every reply as it comes."""
    slots = [None] * SLOTS
    for kind, slot, arg in ops:
        s = slots[slot]
        if kind == "open":
            if s is None:
                slots[slot] = rt.open_session(system_prompt=SYSTEMS[arg])
            continue
        if s is None:
            continue
        has_reply = bool(s.messages)
        if kind == "send":
            assert_exact(s, s.send(random_message(random.Random(arg))), 12)
        elif kind == "stream_cancel":
            pieces = s.stream(random_message(random.Random(arg)))
            for _, _ in zip(range(arg), pieces, strict=False):
                pass
            pieces.close()
            if s.last_turn is not None and arg:
                assert s.last_turn.finish_reason in ("cancelled", "length", "stop")
            assert_kv_agrees(s)
        elif kind == "edit" and has_reply:
            assert_exact(s, s.edit(random_message(random.Random(arg))), 12)
        elif kind == "regenerate" and has_reply:
            assert_exact(s, s.regenerate(), 12)
        elif kind == "demote":
            rt.tiers.demote(s.id)
        elif kind == "close":
            s.close()
            slots[slot] = None
        if slots[slot] is not None and s.kv is not None:
            refs.append(weakref.ref(s.kv.keys[0]))
    for s in slots:
        if s is not None:
            s.close()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(users=st.lists(st.lists(op, min_size=3, max_size=12), min_size=1, max_size=2))
def test_any_sequence_of_actions_stays_exact_and_leaves_nothing(tiny_lm, redis_url, users):
    client = redis.Redis.from_url(redis_url)
    client.flushall()
    refs: list = []
    errors: list[BaseException] = []
    rt = tiered(tiny_lm, redis_url, device_sessions=2, host_sessions=1)

    def user(ops) -> None:
        try:
            play(rt, ops, refs)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=user, args=(ops,)) for ops in users]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    if errors:
        raise errors[0]
    stats = rt.stats()
    assert stats.prompt_tokens == stats.reused_tokens + stats.prefilled_tokens
    assert stats.sessions_open == 0 and all(u.bytes == 0 and u.sessions == 0 for u in stats.tiers.values())
    rt.close()
    gc.collect()
    assert [r() for r in refs] == [None] * len(refs)
    assert live_keys(client) == []
    client.close()
