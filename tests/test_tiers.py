"""The tier ladder: idle caches move device → host → Redis by LRU and come back exact; busy ones never move;
closed sessions leave nothing behind; sessions outlive their process in Redis."""

import gc
import json
import random
import subprocess
import sys
import time
import weakref

import pytest

from chatrt import ChatRuntime, Config
from chatrt.errors import SessionClosed, SessionLeased
from tests.conftest import live_keys, reference_reply, tiered, tiny_llama
from tests.test_session import assert_exact, chat_in_threads, random_message


def chat_round_robin(rt, sessions, rounds: int, seed: int = 0):
    """Every session answers in turn; each reply checked against plain transformers. Returns the replies."""
    rng = random.Random(seed)
    replies = []
    for _ in range(rounds):
        for s in sessions:
            reply = s.send(random_message(rng))
            assert_exact(s, reply, 12)
            replies.append(reply)
    return replies


def demotions(rt, src: str) -> list[str]:
    return [m.session_id for m in rt.tiers.moves if m.src == src and m.dst != "device"]


def test_device_to_host_and_back_is_exact(tiny_lm):
    with tiered(tiny_lm, device_sessions=1) as rt:
        sessions = [rt.open_session(system_prompt="You are terse.") for _ in range(2)]
        replies = chat_round_robin(rt, sessions, rounds=3)
        later = [r.stats for r in replies[2:]]
        assert all(t.kv_source == "host" and t.reused_session_tokens > 0 for t in later)
        assert sessions[0].tier == "host" and sessions[1].tier == "device"
        c = rt.stats().tier_counters
        assert (c.demotions, c.promotions, c.recomputes) == (5, 4, 0)


def test_lru_demotes_the_least_recently_used_idle_session_first(tiny_lm):
    with tiered(tiny_lm, device_sessions=2) as rt:
        sessions = [rt.open_session(session_id=f"s{i}") for i in range(8)]
        chat_round_robin(rt, sessions, rounds=2)
        # After each turn the device holds the two most recently used: the one used two turns ago goes down.
        assert demotions(rt, "device") == [f"s{i % 8}" for i in range(14)]
        assert [s.tier for s in sessions] == ["host"] * 6 + ["device"] * 2
        promoted = [m.session_id for m in rt.tiers.moves if m.dst == "device"]
        assert promoted == [f"s{i}" for i in range(8)]  # the second round brought each one back once


def test_a_byte_budget_moves_caches_down_as_soon_as_they_are_idle(tiny_lm):
    with tiered(tiny_lm, device_bytes=1) as rt:
        s = rt.open_session()
        s.send("hello")
        usage = rt.stats().tiers
        assert usage["device"].bytes == 0 and usage["host"].bytes == s.kv.nbytes > 0


def test_a_generating_session_is_pinned(tiny_lm):
    with tiered(tiny_lm, device_sessions=1) as rt:
        busy, other = rt.open_session(session_id="busy"), rt.open_session(session_id="other")
        busy.send("warm up")
        stream = busy.stream("tell me a long story")
        try:
            next(stream)  # generating now
            for text in ("one", "two", "three"):
                assert_exact(other, other.send(text), 12)
            assert "busy" not in demotions(rt, "device")  # over budget, yet only the idle session moved
            assert busy.tier == "device" and other.tier == "host" and rt.stats().tiers["device"].sessions == 1
        finally:
            "".join(stream)  # the stream holds the session until it ends
        prompt = rt.template.render(busy.transcript[:-1])
        assert busy.messages[-1].token_ids == reference_reply(tiny_lm, prompt, 12)


def test_redis_round_trip_is_exact_and_counted(tiny_lm, redis_url, redis_client):
    with tiered(tiny_lm, redis_url, device_sessions=1, host_sessions=1) as rt:
        sessions = [rt.open_session(system_prompt="Shared.") for _ in range(3)]
        replies = chat_round_robin(rt, sessions, rounds=3)
        assert all(r.stats.kv_source == "redis" and r.stats.restore_s > 0 for r in replies[3:])
        assert all("restore" in r.stats.kv_decision for r in replies[3:])
        c = rt.stats().tier_counters
        assert c.restores == 6 and c.recomputes == 0 and c.redis_errors == 0
        assert sessions[0].tier == "redis" and rt.stats().tiers["redis"].sessions == 1


def test_without_redis_the_bottom_of_the_ladder_drops_and_recomputes_exactly(tiny_lm):
    with tiered(tiny_lm, device_sessions=1, host_sessions=1) as rt:
        sessions = [rt.open_session() for _ in range(3)]
        replies = chat_round_robin(rt, sessions, rounds=2)
        assert [r.stats.kv_source for r in replies[3:]] == ["none", "none", "none"]
        assert rt.stats().tier_counters.drops == 4  # each turn of round two pushes one cache off the host tier


def test_a_cost_model_that_says_recompute_is_obeyed(tiny_lm, redis_url, redis_client):
    with tiered(tiny_lm, redis_url, device_sessions=1, host_sessions=1) as rt:
        rt.tiers.cost.observe("redis", 1, 1000.0)  # Redis looks unbearably slow
        sessions = [rt.open_session() for _ in range(3)]
        replies = chat_round_robin(rt, sessions, rounds=2)
        last = replies[3].stats
        assert (
            last.kv_source == "redis" and last.reused_session_tokens == 0 and last.kv_decision.startswith("recompute")
        )
        assert rt.stats().tier_counters.recomputes == 3
        assert all(m.dst == "dropped" for m in rt.tiers.moves if m.src == "redis")


def test_a_corrupt_cache_in_redis_costs_time_not_a_message(tiny_lm, redis_url, redis_client):
    with tiered(tiny_lm, redis_url, device_sessions=1, host_sessions=1) as rt:
        sessions = [rt.open_session(session_id=f"s{i}") for i in range(3)]
        chat_round_robin(rt, sessions, rounds=1)
        assert sessions[0].tier == "redis"
        redis_client.setrange("chatrt:{s0}:kv:0", 100, b"\x00garbage")
        reply = sessions[0].send("are you still there?")
        assert_exact(sessions[0], reply, 12)
        assert reply.stats.reused_session_tokens == 0 and "digest" in reply.stats.kv_decision
        assert rt.stats().tier_counters.rejected == 1


def test_closing_frees_every_tier_and_every_key(tiny_lm, redis_url, redis_client):
    with tiered(tiny_lm, redis_url, max_new_tokens=4, device_sessions=2, host_sessions=3) as rt:
        alive = []
        for i in range(200):
            s = rt.open_session(system_prompt="Be brief.")
            s.send(f"message {i}")
            if s.kv is not None:
                alive.append(weakref.ref(s.kv.keys[0]))
            if i >= 6:  # keep six open so that every tier is in use, then close them all
                rt.sessions()[0].close()
        assert {t: u.sessions for t, u in rt.stats().tiers.items()} == {"device": 2, "host": 3, "redis": 1}
        for s in rt.sessions():
            s.close()
        gc.collect()
        stats = rt.stats()
        assert all(u.bytes == 0 and u.sessions == 0 for u in stats.tiers.values())
        assert stats.kv_bytes == 0 and stats.sessions_open == 0 and stats.sessions_closed == 200
        assert [ref() for ref in alive] == [None] * len(alive)
        # Only its own stats, and the system prompt's KV, which the session on the Redis tier was stored without:
        # kept once for every process (not any session's), it expires with the TTL.
        shared = redis_client.keys("chatrt:prefix:*")
        assert len(shared) == 2 and all(0 < redis_client.ttl(k) <= 86400 for k in shared)
        assert live_keys(redis_client) == [f"chatrt:runtime:{rt.instance}".encode()]
        assert len(redis_client.keys("chatrt:*:closed")) == 200  # a tombstone per closed session
    assert live_keys(redis_client) == []


def test_a_session_resumes_in_another_runtime_with_its_kv(tiny_lm, redis_url, redis_client):
    first = tiered(tiny_lm, redis_url)
    s = first.open_session(system_prompt="Remember me.", session_id="user-7")
    s.send("my name is Ada")
    with pytest.raises(SessionLeased):
        tiered(tiny_lm, redis_url).session("user-7")
    transcript = s.transcript
    first.close()  # shutdown: the session stays in Redis with its KV
    with pytest.raises(SessionClosed):
        s.send("still here?")
    with tiered(tiny_lm, redis_url) as second:
        resumed = second.session("user-7")
        assert resumed.transcript == transcript and resumed.tier == "redis"
        reply = resumed.send("what is my name?")
        assert_exact(resumed, reply, 12)
        assert reply.stats.kv_source == "redis" and reply.stats.reused_session_tokens > 0
        resumed.close()
    assert live_keys(redis_client) == []


def test_a_process_that_lost_its_lease_adopts_the_newer_transcript(tiny_lm, redis_url, redis_client):
    a = tiered(tiny_lm, redis_url, lease_s=0.3)
    s = a.open_session(session_id="shared")
    s.send("first")
    with tiered(tiny_lm, redis_url, lease_s=0.3) as b:
        time.sleep(0.4)  # a's lease runs out while its user is away
        other = b.session("shared")
        other.send("second, from b")
        other.detach()
    reply = s.send("third, from a")  # a takes the lease back and sees b's turn
    assert [m.content for m in s.messages if m.role == "user"] == ["first", "second, from b", "third, from a"]
    assert_exact(s, reply, 12)
    a.close()


def test_closing_a_session_another_process_took_over_leaves_it_to_that_process(tiny_lm, redis_url, redis_client):
    a = tiered(tiny_lm, redis_url, lease_s=0.3)
    s = a.open_session(session_id="moved")
    s.send("hi")
    time.sleep(0.4)
    with tiered(tiny_lm, redis_url) as b:
        taken = b.session("moved")
        s.close()  # a's memory is freed; the session is b's now
        assert redis_client.exists("chatrt:{moved}:meta") and a.stats().sessions_open == 0
        assert_exact(taken, taken.send("still here"), 12)
        taken.close()
    a.close()
    assert live_keys(redis_client) == []


def test_another_models_cache_is_refused_but_its_transcript_kept(tokenizer, tiny_lm, redis_url, redis_client):
    with tiered(tiny_lm, redis_url) as rt:
        rt.open_session(session_id="x").send("hello")
    other_lm = tiny_llama(tokenizer, seed=1)
    with tiered(other_lm, redis_url) as rt:
        s = rt.session("x")
        assert s.tier == "none" and rt.stats().tier_counters.rejected == 1
        assert all(m.token_ids is None for m in s.messages)  # re-tokenized for this model
        assert_exact(s, s.send("and now?"), 12)


def test_an_evicted_prefix_comes_back_from_redis_instead_of_being_recomputed(tiny_lm, redis_url, redis_client):
    config = Config().with_values(
        generation={"max_new_tokens": 12}, prefix={"max_entries": 1}, tiers={"redis_url": redis_url}
    )
    with ChatRuntime(tiny_lm, config) as rt:
        a = rt.open_session(system_prompt="Policy A. " * 20)
        a.send("one")
        a.close()
        b = rt.open_session(system_prompt="Policy B. " * 20)
        b.send("two")  # A's prefix is evicted: it goes to Redis
        c = rt.open_session(system_prompt="Policy A. " * 20)
        reply = c.send("three")
        assert_exact(c, reply, 12)
        assert reply.stats.reused_prefix_tokens > 0
        assert (rt.stats().tier_counters.prefix_spills, rt.stats().tier_counters.prefix_restores) == (1, 1)


RESUME = """
import json, sys
from transformers import AutoTokenizer
from tests.conftest import tiered, tiny_llama, reference_reply
lm = tiny_llama(AutoTokenizer.from_pretrained(sys.argv[1]))
with tiered(lm, sys.argv[2]) as rt:
    s = rt.session("cross")
    reply = s.send("and in another process?")
    prompt = rt.template.render(s.transcript[:-1])
    print(json.dumps({"source": reply.stats.kv_source, "reused": reply.stats.reused_session_tokens,
                      "exact": reply.token_ids == reference_reply(lm, prompt, 12)}))
"""


def test_a_session_resumes_in_another_process(tiny_lm, bundled_folder, redis_url, redis_client):
    with tiered(tiny_lm, redis_url) as rt:
        rt.open_session(session_id="cross", system_prompt="Persist.").send("hello from the first process")
    out = subprocess.run(
        [sys.executable, "-c", RESUME, str(bundled_folder[0]), redis_url], capture_output=True, text=True, check=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["source"] == "redis" and result["reused"] > 0 and result["exact"] is True


@pytest.mark.bundled
def test_bundled_model_is_exact_after_every_kind_of_move(bundled_lm, redis_url, redis_client):
    def check(rt, s, reply):
        prompt = rt.template.render(s.transcript[:-1])
        assert reply.token_ids == reference_reply(rt.lm, prompt, 24, use_cache=True)

    system = "You are a concise assistant who answers in one sentence."
    questions = ["What is the capital of France?", "Name a primary color.", "What is two plus two?"]
    rt = tiered(bundled_lm, redis_url, max_new_tokens=24, device_sessions=1, host_sessions=1)
    sessions = [rt.open_session(system_prompt=system, session_id=f"b{i}") for i in range(3)]
    for s, q in zip(sessions, questions, strict=True):
        check(rt, s, s.send(q))
    sources = []
    b0, b1, b2 = sessions  # b0 is in Redis, b1 on the host, b2 on the device
    for s in (b1, b0, b2, b2):  # b0's turn pushes b2 from the host to Redis
        reply = s.send("Why?")
        check(rt, s, reply)
        sources.append(reply.stats.kv_source)
    assert sources == ["host", "redis", "redis", "device"]
    rt.close()
    with tiered(bundled_lm, redis_url, max_new_tokens=24) as other:  # another runtime resumes from Redis
        s = other.session("b1")
        reply = s.send("Say it shorter.")
        check(other, s, reply)
        assert reply.stats.kv_source == "redis" and reply.stats.reused_session_tokens > 0, reply.stats.kv_decision


def test_sessions_in_threads_stay_exact_while_the_ladder_moves_them(tiny_lm, redis_url, redis_client):
    with tiered(tiny_lm, redis_url, device_sessions=1, host_sessions=1) as rt:
        chat_in_threads([rt.open_session(system_prompt="Shared.") for _ in range(4)])
        assert rt.stats().tier_counters.demotions > 0
