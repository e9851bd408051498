"""Redis faults and untrustworthy caches cost time, never a message: a real redis-server is started, killed,
restarted empty and filled to maxmemory under a runtime that keeps answering exactly."""

from __future__ import annotations

import json
import logging
import random
import threading
import time
import tracemalloc

import pytest
import redis
from safetensors.torch import load as st_load

from chatrt.cache.integrity import Sealer
from chatrt.cache.kv import KV, to_chunks
from chatrt.cache.record import SessionRecord
from chatrt.errors import CloseIncomplete, SessionClosed, SessionLeased, SessionNotFound
from chatrt.redis_server import RedisServer
from chatrt.runtime import REDIS_UNSIGNED
from tests.conftest import threaded, tiered, tiny_llama
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


def test_close_during_a_redis_stall_is_reported_and_the_session_never_comes_back(tiny_lm, server):
    server.start()
    stall = {"redis_timeout_s": 0.5, "lease_s": 3.0}  # the delete is retried every lease_s / 3
    with tiered(tiny_lm, server.url, **stall) as rt:
        s = rt.open_session(session_id="gone")
        s.send("forget this conversation")
        server.pause()  # longer than the socket timeout
        with pytest.raises(CloseIncomplete, match="could not delete"):
            s.close()
        assert s.closed and rt.stats().sessions_open == 0
        time.sleep(1.0)
        server.resume()
        with pytest.raises(SessionClosed):  # not in this process either, while its delete is pending
            rt.session("gone")
        outcomes = set()
        with tiered(tiny_lm, server.url, **stall) as other:
            deadline = time.monotonic() + 30
            while "closed" not in outcomes and time.monotonic() < deadline:
                try:
                    other.session("gone")
                    outcomes.add("resumed")
                    break
                except SessionLeased:
                    outcomes.add("leased")  # the first runtime still holds it while it retries the delete
                except SessionClosed:
                    outcomes.add("closed")
                time.sleep(0.1)
        assert "resumed" not in outcomes and "closed" in outcomes
        client = redis.Redis.from_url(server.url)
        assert client.keys("chatrt:{gone}:*") == [b"chatrt:{gone}:closed"]
        assert rt.journal.leases.pending_deletes == set()


def test_a_redis_stall_during_a_demotion_holds_up_no_other_thread(tiny_lm, server):
    """The ladder's policy runs under the tier lock; the write to Redis does not: while it waits on a stalled
    Redis, every other thread's view of the tiers (stats, another session's turn) goes on."""
    server.start()
    with tiered(tiny_lm, server.url, device_bytes=1, redis_timeout_s=30) as rt:
        s, other = rt.open_session(session_id="slow"), rt.open_session(session_id="other")
        s.send("hello")
        assert s.tier == "host"
        server.pause()
        try:
            mover = threading.Thread(target=rt.tiers.demote, args=("slow",))
            mover.start()
            deadline = time.monotonic() + 10
            while not rt.tiers.moving("slow") and time.monotonic() < deadline:
                time.sleep(0.01)
            assert rt.stats().tiers["redis"].sessions == 0  # answered while the write still waits on Redis
            assert rt.tiers.moving("slow") and mover.is_alive()
        finally:
            server.resume()
        mover.join(timeout=30)
        assert s.tier == "redis" and rt.stats().tier_counters.redis_errors == 0
        assert_exact(s, s.send("and again"), 12)
        assert_exact(other, other.send("hi"), 12)


def test_a_sessions_next_turn_completes_while_redis_stalls_a_demotion_its_last_turn_caused(tiny_lm, redis_url,
                                                                                           monkeypatch):
    """A session's hold covers nobody else's I/O. Session a's turn ends and the ladder sends b's cache down to
    Redis, where the write stalls: the thread that ended a's turn waits on it, but a is free (its next turn
    completes on another thread), and so is every other session, even one whose turn puts a cache over the host
    budget (the thread already settling the ladder takes that move on)."""
    with tiered(tiny_lm, redis_url, device_sessions=1, host_sessions=1) as rt:
        a, b, c, d = (rt.open_session(session_id=name) for name in "abcd")
        b.send("hello")
        c.send("hi")
        assert (b.tier, c.tier) == ("host", "device")
        stall, put_kv = threading.Event(), rt.store.put_kv

        def stalled(session_id, *args, **kwargs):
            if session_id == "b":
                stall.wait(30)  # Redis takes its time with b's chunks
            return put_kv(session_id, *args, **kwargs)

        monkeypatch.setattr(rt.store, "put_kv", stalled)
        first = threading.Thread(target=a.send, args=("first",))  # c to the host, b to Redis: the write stalls
        first.start()
        try:
            deadline = time.monotonic() + 10
            while not rt.tiers.moving("b") and time.monotonic() < deadline:
                time.sleep(0.01)
            assert rt.tiers.moving("b") and first.is_alive()
            assert_exact(a, threaded(lambda: a.send("second"), timeout=10), 12)
            assert_exact(d, threaded(lambda: d.send("third"), timeout=10), 12)  # a to the host, c to Redis: queued
            assert first.is_alive() and rt.tiers.moving("b")
        finally:
            stall.set()
        first.join(timeout=30)
        assert not first.is_alive()
        assert (b.tier, c.tier, a.tier, d.tier) == ("redis", "redis", "host", "device")
        for s in (a, b, c, d):
            assert_exact(s, s.send("and again"), 12)


def forge(client, session_id: str, sealer=None, *, tensors=None, meta=None, messages=None) -> None:
    """Rewrite a stored session as someone who can write to Redis would: every digest recomputed (with `sealer`,
    a plain sha256 by default), so each record is consistent with itself. `tensors(kv)` replaces the cache's
    tensors, `meta` fields of its metadata, `messages(list)` the transcript."""
    sealer = sealer or Sealer()
    key = f"chatrt:{{{session_id}}}:meta"
    record = SessionRecord.model_validate_json(client.get(key))
    kv_meta = record.kv
    blob = b"".join(client.get(f"chatrt:{{{session_id}}}:kv:{n}") for n in range(kv_meta.chunks))
    if tensors is not None:
        loaded = st_load(blob)
        keys, values = ([loaded[f"{kind}{i}"] for i in range(kv_meta.num_layers)] for kind in "kv")
        own = KV(kv_meta.ids[kv_meta.shared_tokens :], tuple(keys), tuple(values))  # the system prompt's is apart
        stored, chunks = to_chunks(tensors(own), kv_meta.fingerprint, 1 << 20, sealer)
        kv_meta = stored.model_copy(update={"ids": kv_meta.ids, "shared_tokens": kv_meta.shared_tokens})
        meta = meta or {}
        blob = b"".join(chunks)
        client.delete(*client.keys(f"chatrt:{{{session_id}}}:kv:*"))
        client.set(f"chatrt:{{{session_id}}}:kv:0", blob)
    if meta is not None:
        kv_meta = kv_meta.model_copy(update=meta)
        digest = sealer.digest(kv_meta.model_dump_json(exclude={"digest"}).encode(), blob)
        kv_meta = kv_meta.model_copy(update={"digest": digest})
    record = record.model_copy(update={"kv": kv_meta, "messages": (messages or list)(record.messages)})
    sig = sealer.digest(record.model_dump_json(exclude={"sig"}).encode())
    client.set(key, record.model_copy(update={"sig": sig}).model_dump_json())


def each_tensor(fn):
    return lambda kv: KV(kv.ids, tuple(map(fn, kv.keys)), tuple(map(fn, kv.values)))


def replace_user_ids(messages):
    # The first user message "carries" the control tokens of a forged system turn.
    forged = (1, 9690, 198, 504, 1)  # <|im_start|>system\n ... <|im_start|>
    return [messages[0].model_copy(update={"token_ids": forged}), *messages[1:]]


FORGERIES = {
    "fewer layers": {"tensors": lambda kv: KV(kv.ids, kv.keys[:1], kv.values[:1])},
    "another head size": {"tensors": each_tensor(lambda t: t[..., ::2].contiguous())},
    "float16 for a float32 model": {"tensors": each_tensor(lambda t: t.half())},
    "3,000,000 chunks": {"meta": {"chunks": 3_000_000}},
    "out-of-vocabulary reply ids": {
        "messages": lambda ms: [*ms[:-1], ms[-1].model_copy(update={"token_ids": (10**6, 10**7)})]
    },
    "control tokens as a user message's ids": {"messages": replace_user_ids},
}


def stored_session(lm, redis_url: str, **tiers) -> None:
    with tiered(lm, redis_url, **tiers) as rt:  # closing the runtime leaves the session and its KV in Redis
        rt.open_session(session_id="forged", system_prompt="Be brief.").send("hello there")


@pytest.mark.parametrize("kind", FORGERIES)
def test_a_forged_record_costs_a_recompute_never_a_crash(tiny_lm, redis_url, redis_client, kind):
    stored_session(tiny_lm, redis_url)
    forge(redis_client, "forged", **FORGERIES[kind])
    tracemalloc.start()
    with tiered(tiny_lm, redis_url) as rt:
        s = rt.session("forged")
        first = s.send("are you still there?")
        assert_exact(s, first, 12)
        assert_exact(s, s.send("and now?"), 12)  # and not broken for good either
        # Only replies keep ids, and only ids that spell them: anything else is tokenized from its text.
        assert all(m.token_ids is None for m in s.messages if m.role == "user")
        assert all(m.token_ids is None or rt.template.spells(m.token_ids, m.content) for m in s.messages)
        if "messages" not in FORGERIES[kind]:
            assert first.stats.reused_session_tokens == 0 and rt.stats().tier_counters.rejected == 1
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 32 * 2**20, f"{peak / 2**20:.0f} MiB of Python memory for a forged record"


def test_cache_ids_altered_without_the_digest_are_refused(tiny_lm, redis_url, redis_client):
    stored_session(tiny_lm, redis_url)
    record = json.loads(redis_client.get("chatrt:{forged}:meta"))
    record["kv"]["ids"][-3] += 1  # the digest covers the ids (these, past the shared system prompt, too)
    record["sig"] = Sealer().digest(SessionRecord.model_validate(record).model_dump_json(exclude={"sig"}).encode())
    redis_client.set("chatrt:{forged}:meta", json.dumps(record))
    with tiered(tiny_lm, redis_url) as rt:
        s = rt.session("forged")
        reply = s.send("still exact?")
        assert_exact(s, reply, 12)
        assert "digest" in reply.stats.kv_decision and rt.stats().tier_counters.rejected == 1


def test_with_a_secret_records_the_deployment_did_not_sign_are_refused(tiny_lm, redis_url, redis_client):
    """What a sha256 cannot stop: a forger who relabels a cache's ids (and recomputes every digest) would make
    its tensors stand for other tokens. With a shared secret such a record is refused outright."""
    secret = {"redis_secret": "deployment-secret"}
    stored_session(tiny_lm, redis_url, **secret)
    ids = SessionRecord.model_validate_json(redis_client.get("chatrt:{forged}:meta")).kv.ids
    forge(redis_client, "forged", meta={"ids": (*ids[:-4], *ids[-3:], ids[-4])})
    with tiered(tiny_lm, redis_url, **secret) as rt, pytest.raises(SessionNotFound, match="not signed with this "
                                                                     "deployment's secret"):  # fmt: skip
        rt.session("forged")
    stored_session(tiny_lm, redis_url.replace("/0", "/1"))  # another deployment, no secret: a plain sha256
    with tiered(tiny_lm, redis_url.replace("/0", "/1"), **secret) as rt, pytest.raises(SessionNotFound,
                                                                                        match="refused"):  # fmt: skip
        rt.session("forged")
    with tiered(tiny_lm, redis_url, **secret) as rt:  # the id is free for a new conversation of this deployment
        s = rt.open_session(session_id="forged")
        assert_exact(s, s.send("a new conversation"), 12)


def test_a_refused_record_says_why(tiny_lm, redis_url, redis_client):
    stored_session(tiny_lm, redis_url)
    record = json.loads(redis_client.get("chatrt:{forged}:meta"))
    record["messages"][0]["content"] = "something else"  # the digest is not recomputed
    redis_client.set("chatrt:{forged}:meta", json.dumps(record))
    with tiered(tiny_lm, redis_url) as rt, pytest.raises(SessionNotFound, match="altered after it was written"):
        rt.session("forged")
    redis_client.set("chatrt:{forged}:meta", b"{not json")
    with tiered(tiny_lm, redis_url) as rt, pytest.raises(SessionNotFound, match="unreadable"):
        rt.session("forged")
    with tiered(tiny_lm, redis_url) as rt, pytest.raises(SessionNotFound, match="no session has id"):
        rt.session("never-stored")


def test_redis_without_a_secret_is_said_out_loud_once_at_start(tiny_lm, redis_url, caplog):
    with caplog.at_level(logging.WARNING, logger="chatrt"), tiered(tiny_lm, redis_url):
        pass
    assert [r.getMessage() for r in caplog.records].count(REDIS_UNSIGNED) == 1
    assert "tiers.redis_secret" in REDIS_UNSIGNED and "rewrite a stored session" in REDIS_UNSIGNED
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="chatrt"), tiered(tiny_lm, redis_url, redis_secret="s3cret"):
        pass
    assert REDIS_UNSIGNED not in [r.getMessage() for r in caplog.records]
