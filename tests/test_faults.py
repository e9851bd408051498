"""Redis faults and untrustworthy caches cost time, never a message: a real redis-server is started, killed,
restarted empty and filled to maxmemory under a runtime that keeps answering exactly."""

from __future__ import annotations

import logging
import random
import threading
import time

import pytest
import redis

from chatrt.store import RedisServer
from tests.conftest import tiered, tiny_llama
from tests.test_session import assert_exact, random_message


@pytest.fixture
def server():
    s = RedisServer()
    yield s
    s.stop()


def chat(rt, sessions, rounds: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    for _ in range(rounds):
        for s in sessions:
            assert_exact(s, s.send(random_message(rng)), 12)


def test_redis_absent_at_start_then_back(tiny_lm, server, caplog):
    with caplog.at_level(logging.WARNING, "chatrt"), tiered(tiny_lm, server.url, device_sessions=1, host_bytes=0) as rt:
        sessions = [rt.open_session() for _ in range(3)]
        chat(rt, sessions, 2)
        stats = rt.stats()
        assert stats.redis == "down" and stats.tier_counters.redis_errors > 0
        assert "unavailable" in caplog.text
        server.start()
        chat(rt, sessions, 2, seed=1)  # redis-py reconnects on its own
        assert rt.stats().redis == "ok" and "is back" in caplog.text
        client = redis.Redis.from_url(server.url)
        assert all(client.exists(f"chatrt:{{{s.id}}}:meta") for s in sessions)  # transcripts written again
        assert any(s.tier == "redis" for s in sessions)


def test_redis_killed_and_restarted_empty(tiny_lm, server):
    server.start()
    with tiered(tiny_lm, server.url, device_sessions=1, host_sessions=1) as rt:
        sessions = [rt.open_session() for _ in range(4)]
        chat(rt, sessions, 1)
        assert sum(s.tier == "redis" for s in sessions) == 2
        server.kill()
        chat(rt, sessions, 1, seed=1)  # the caches Redis held are gone: recomputed from the transcripts
        assert rt.stats().redis == "down"
        server.start()  # empty, as after a crash without persistence
        chat(rt, sessions, 2, seed=2)
        stats = rt.stats()
        assert stats.redis == "ok" and stats.tier_counters.recomputes > 0
        assert sum(s.tier == "redis" for s in sessions) == 2


def test_redis_killed_while_caches_are_being_written(tiny_lm, server):
    """Sessions in threads push caches to Redis all the time; Redis dies in the middle of it and comes back."""
    server.start()
    with tiered(tiny_lm, server.url, device_sessions=1, host_sessions=0, host_bytes=0) as rt:
        sessions = [rt.open_session() for _ in range(4)]
        errors: list[BaseException] = []

        def worker(s, seed: int) -> None:
            try:
                chat(rt, [s], 6, seed=seed)
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(s, i)) for i, s in enumerate(sessions)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        server.kill()
        time.sleep(0.3)
        server.start()
        for t in threads:
            t.join(120)
        assert errors == [] and not any(t.is_alive() for t in threads)
        assert rt.stats().tier_counters.redis_errors > 0
        chat(rt, sessions, 1, seed=9)


def test_redis_at_maxmemory(tiny_lm):
    server = RedisServer("--maxmemory", "1mb", "--maxmemory-policy", "noeviction").start()
    try:
        with tiered(tiny_lm, server.url, device_sessions=1, host_sessions=0, host_bytes=0) as rt:
            sessions = [rt.open_session() for _ in range(6)]
            chat(rt, sessions, 3)
            stats = rt.stats()
            assert stats.tier_counters.redis_errors > 0 and stats.tier_counters.drops > 0  # OOM: dropped instead
    finally:
        server.stop()


def test_expired_keys_are_recomputed(tiny_lm, server):
    server.start()
    with tiered(tiny_lm, server.url, device_sessions=1, host_sessions=0, host_bytes=0, redis_ttl_s=1) as rt:
        sessions = [rt.open_session() for _ in range(2)]
        chat(rt, sessions, 1)
        assert sessions[0].tier == "redis"
        time.sleep(1.5)
        client = redis.Redis.from_url(server.url)
        assert client.keys(f"chatrt:{{{sessions[0].id}}}:[mk]*") == []  # record and chunks expired (not the lease)
        chat(rt, sessions, 1, seed=1)
        assert rt.stats().tier_counters.rejected > 0


def test_a_truncated_chunk_is_refused_and_recomputed(tiny_lm, redis_url, redis_client):
    with tiered(tiny_lm, redis_url, device_sessions=1, host_sessions=0, host_bytes=0) as rt:
        a, b = rt.open_session(), rt.open_session()
        chat(rt, [a, b], 1)
        key = f"chatrt:{{{a.id}}}:kv:0"
        redis_client.set(key, redis_client.get(key)[:-100], keepttl=True)
        reply = a.send("still there?")
        assert_exact(a, reply, 12)
        assert reply.stats.reused_session_tokens == 0 and reply.stats.kv_decision
        assert rt.stats().tier_counters.rejected == 1


def test_a_cache_of_another_dtype_is_refused(tokenizer, tiny_lm, redis_url, redis_client):
    import torch

    with tiered(tiny_llama(tokenizer, dtype=torch.bfloat16), redis_url) as rt:
        rt.open_session(session_id="dt").send("hello")
    with tiered(tiny_lm, redis_url) as rt:
        s = rt.session("dt")
        assert s.tier == "none" and rt.stats().tier_counters.rejected == 1
        assert_exact(s, s.send("again"), 12)
