"""The Redis store keeps records and KV chunks under DESIGN's keys with TTLs, and leases sessions to one process."""

import time

import pytest

from chatrt.engine import compute_kv
from chatrt.errors import SessionLeased, StoreUnavailable
from chatrt.kv import from_chunks, to_chunks
from chatrt.store import RedisStore, SessionRecord
from chatrt.template import Message


@pytest.fixture
def store(redis_url, redis_client):
    s = RedisStore(redis_url, ttl_s=600, lease_s=30)
    yield s
    s.close()


def record(session_id: str = "s1", kv=None) -> SessionRecord:
    messages = [Message(role="user", content="hi"), Message(role="assistant", content="hello", token_ids=(1, 2))]
    return SessionRecord(
        session_id=session_id, system_prompt="sys", messages=messages, turns=1, fingerprint="fp", kv=kv
    )


def keys(client) -> list[str]:
    return sorted(k.decode() for k in client.keys("*"))


def test_a_record_with_its_kv_lives_under_the_design_keys_with_ttls(store, redis_client, tiny_lm):
    kv = compute_kv(tiny_lm, tuple(range(1, 40)))
    meta, chunks = to_chunks(kv, tiny_lm.info.fingerprint, chunk_bytes=8192)
    store.put_session(record(kv=meta), chunks)
    assert keys(redis_client) == sorted(["chatrt:{s1}:meta", *(f"chatrt:{{s1}}:kv:{n}" for n in range(meta.chunks))])
    assert all(0 < redis_client.ttl(k) <= 600 for k in keys(redis_client))
    back = store.get_session("s1")
    assert back == record(kv=meta)
    restored = from_chunks(back.kv, store.session_chunks("s1", back.kv), tiny_lm.info.fingerprint, "cpu")
    assert restored.ids == kv.ids


def test_rewriting_a_record_deletes_chunks_it_no_longer_names(store, redis_client, tiny_lm):
    meta, chunks = to_chunks(compute_kv(tiny_lm, tuple(range(1, 40))), tiny_lm.info.fingerprint, chunk_bytes=8192)
    store.put_session(record(kv=meta), chunks)
    store.put_session(record(kv=None))
    assert keys(redis_client) == ["chatrt:{s1}:meta"]


def test_rewriting_a_record_that_still_names_its_kv_keeps_the_chunks(store, redis_client, tiny_lm):
    meta, chunks = to_chunks(compute_kv(tiny_lm, tuple(range(1, 40))), tiny_lm.info.fingerprint, chunk_bytes=8192)
    store.put_session(record(kv=meta), chunks)
    store.put_session(record(kv=meta).model_copy(update={"turns": 2}))
    assert len(keys(redis_client)) == 1 + meta.chunks
    assert all(c is not None for c in store.session_chunks("s1", meta))


def test_delete_removes_every_key_of_the_session(store, redis_client, tiny_lm):
    meta, chunks = to_chunks(compute_kv(tiny_lm, (1, 2, 3)), tiny_lm.info.fingerprint, chunk_bytes=1024)
    store.put_session(record(kv=meta), chunks)
    store.put_session(record("other"))
    store.take_lease("s1")
    store.delete_session("s1")
    assert keys(redis_client) == ["chatrt:{other}:meta"]


def test_an_unreadable_record_is_a_miss(store, redis_client):
    redis_client.set("chatrt:{s1}:meta", b"{not json")
    assert store.get_session("s1") is None


def test_a_lease_is_held_by_one_holder_until_released_or_expired(redis_url, redis_client):
    a = RedisStore(redis_url, ttl_s=600, lease_s=0.5)
    b = RedisStore(redis_url, ttl_s=600, lease_s=0.5)
    lease = a.take_lease("s1")
    assert a.take_lease("s1", lease) is lease  # the holder renews it
    with pytest.raises(SessionLeased, match="in use by another process"):
        b.take_lease("s1")
    lease.release()
    b.take_lease("s1").release()
    a.take_lease("s1")
    time.sleep(0.7)  # a crashed holder does not lock a session for ever
    b.take_lease("s1")


def test_prefixes_live_under_their_hash(store, redis_client, tiny_lm):
    kv = compute_kv(tiny_lm, (5, 6, 7))
    store.put_prefix("abc", *to_chunks(kv, tiny_lm.info.fingerprint, chunk_bytes=1 << 20))
    assert keys(redis_client) == ["chatrt:prefix:{abc}:kv:0", "chatrt:prefix:{abc}:meta"]
    meta = store.get_prefix("abc")
    assert from_chunks(meta, store.prefix_chunks("abc", meta), tiny_lm.info.fingerprint, "cpu").ids == (5, 6, 7)
    assert store.get_prefix("nope") is None


def test_an_unreachable_redis_is_a_typed_error():
    dead = RedisStore("redis://127.0.0.1:1/0", ttl_s=10, lease_s=10, timeout_s=0.5)
    with pytest.raises(StoreUnavailable, match="could not read a session"):
        dead.get_session("s1")
    with pytest.raises(StoreUnavailable, match="not a Redis URL"):
        RedisStore("http://nowhere", ttl_s=10, lease_s=10)
