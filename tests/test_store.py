"""The Redis store keeps records and KV chunks under DESIGN's keys with TTLs, leases sessions to one process, and
fences writes: no process writes over a transcript it did not read, or over a session another process holds."""

import time

import pytest

from chatrt.cache.integrity import Sealer
from chatrt.cache.kv import KVSpec, from_chunks, to_chunks
from chatrt.cache.record import SessionRecord
from chatrt.cache.store import RedisStore
from chatrt.errors import CacheRejected, InvalidMessage, SessionClosed, SessionConflict, SessionLeased, StoreUnavailable
from chatrt.template import Message
from tests.conftest import compute_kv


@pytest.fixture
def store(redis_url, redis_client):
    s = RedisStore(redis_url, ttl_s=600, lease_s=30)
    yield s
    s.close()


def record(session_id: str = "s1", kv=None, rev: str = "r1") -> SessionRecord:
    messages = [Message(role="user", content="hi"), Message(role="assistant", content="hello", token_ids=(1, 2))]
    return SessionRecord(
        session_id=session_id, system_prompt="sys", messages=messages, turns=1, fingerprint="fp", kv=kv, rev=rev
    )


def chunked(lm, ids, chunk_bytes: int = 8192):
    return to_chunks(compute_kv(lm, ids), lm.info.fingerprint, chunk_bytes, Sealer())


def stored(record: SessionRecord) -> SessionRecord:
    return record.model_copy(update={"sig": ""})


def keys(client) -> list[str]:
    return sorted(k.decode() for k in client.keys("*"))


def test_a_record_with_its_kv_lives_under_the_design_keys_with_ttls(store, redis_client, tiny_lm):
    meta, chunks = chunked(tiny_lm, tuple(range(1, 40)))
    store.put_session(record(kv=meta), replaces={""}, chunks=chunks)
    kv_keys = [f"chatrt:{{s1}}:kv:{n}" for n in range(meta.chunks)]
    assert keys(redis_client) == sorted(["chatrt:{s1}:meta", "chatrt:{s1}:lease", *kv_keys])
    assert all(0 < redis_client.ttl(k) <= 600 for k in keys(redis_client) if "lease" not in k)
    back = store.get_session("s1")
    assert stored(back) == record(kv=meta) and back.sig.startswith("sha256:")
    restored = from_chunks(back.kv, store.session_chunks("s1", back.kv), KVSpec.of(tiny_lm.info), Sealer(), "cpu")
    assert restored.ids == tuple(range(1, 40))


def test_rewriting_a_record_deletes_chunks_it_no_longer_names(store, redis_client, tiny_lm):
    meta, chunks = chunked(tiny_lm, tuple(range(1, 40)))
    store.put_session(record(kv=meta), replaces={""}, chunks=chunks)
    store.put_session(record(kv=None, rev="r2"), replaces={"r1"})
    assert keys(redis_client) == ["chatrt:{s1}:lease", "chatrt:{s1}:meta"]
    assert store.put_kv("s1", meta, chunks) and len(keys(redis_client)) == 2 + meta.chunks
    assert store.put_kv("s1", None) and keys(redis_client) == ["chatrt:{s1}:lease", "chatrt:{s1}:meta"]
    assert store.get_session("s1").rev == "r2"  # attaching a cache leaves the transcript's rev as it is


def test_rewriting_a_record_that_still_names_its_kv_keeps_the_chunks(store, redis_client, tiny_lm):
    meta, chunks = chunked(tiny_lm, tuple(range(1, 40)))
    store.put_session(record(kv=meta), replaces={""}, chunks=chunks)
    store.put_session(record(kv=meta, rev="r2").model_copy(update={"turns": 2}), replaces={"r1"})
    assert len(keys(redis_client)) == 2 + meta.chunks
    assert all(c is not None for c in store.session_chunks("s1", meta))


def test_delete_removes_every_key_of_the_session_and_leaves_a_tombstone(store, redis_client, tiny_lm):
    meta, chunks = chunked(tiny_lm, (1, 2, 3), chunk_bytes=1024)
    store.put_session(record(kv=meta), replaces={""}, chunks=chunks)
    store.put_session(record("other"), replaces={""})
    store.delete_session("s1")
    assert keys(redis_client) == ["chatrt:{other}:lease", "chatrt:{other}:meta", "chatrt:{s1}:closed"]
    with pytest.raises(SessionClosed, match="was closed"):
        store.get_session("s1")
    with pytest.raises(SessionConflict, match="closed by another process"):
        store.put_session(record(rev="r2"), replaces={"r1"})  # a late writer does not bring it back
    store.create_session(record(rev="new"))  # the id may be used again for a new conversation
    assert store.get_session("s1").rev == "new" and not redis_client.exists("chatrt:{s1}:closed")


def test_writes_are_fenced_by_the_lease_and_the_rev_read(redis_url, redis_client):
    a = RedisStore(redis_url, ttl_s=600, lease_s=0.3)
    b = RedisStore(redis_url, ttl_s=600, lease_s=30)
    a.create_session(record(rev="a1"))
    with pytest.raises(InvalidMessage, match="exists in Redis"):
        b.create_session(record(rev="b0"))
    with pytest.raises(SessionLeased):
        b.take_lease("s1")
    time.sleep(0.4)  # a's lease runs out while its turn runs
    assert b.take_lease("s1") is False  # taken anew: b must read what is stored
    b.put_session(record(rev="b1"), replaces={b.get_session("s1").rev})
    with pytest.raises(SessionConflict, match="in use by another process"):
        a.put_session(record(rev="a2"), replaces={"a1"})
    b.release_lease("s1")
    with pytest.raises(SessionConflict, match="answered session s1"):  # free again, but b wrote a newer turn
        a.put_session(record(rev="a2"), replaces={"a1"})
    assert a.get_session("s1").rev == "b1"
    a.put_session(record(rev="a2"), replaces={"a1", "b1"})  # after reading b's turn, a may write
    assert not b.put_kv("s1", None)  # a holds it: b may not even change its cache
    assert b.renew_lease("s1") is False and a.renew_lease("s1") is True


def test_a_record_that_was_altered_or_not_signed_with_the_secret_is_refused(redis_url, redis_client):
    signed = RedisStore(redis_url, ttl_s=600, lease_s=30, secret="s3cret")
    signed.create_session(record(rev="r1"))
    assert signed.get_session("s1").sig.startswith("hmac-sha256:")
    raw = redis_client.get("chatrt:{s1}:meta").replace(b'"hello"', b'"forged"')
    redis_client.set("chatrt:{s1}:meta", raw)
    assert signed.get_session("s1") is None
    forged = SessionRecord.model_validate_json(raw)  # re-sealed by someone without the secret
    redis_client.set("chatrt:{s1}:meta", forged.model_copy(update={"sig": Sealer().digest(
        forged.model_dump_json(exclude={"sig"}).encode())}).model_dump_json())  # fmt: skip
    assert signed.get_session("s1") is None
    assert RedisStore(redis_url, ttl_s=600, lease_s=30).get_session("s1").messages[1].content == "forged"


def test_chunks_are_read_only_when_their_sizes_add_up(store, redis_client, tiny_lm):
    meta, chunks = chunked(tiny_lm, tuple(range(1, 40)))
    store.put_session(record(kv=meta), replaces={""}, chunks=chunks)
    redis_client.set("chatrt:{s1}:kv:0", b"x" * 10_000_000)  # a value far larger than declared
    with pytest.raises(CacheRejected, match="not the size"):
        store.session_chunks("s1", meta)


def test_an_unreadable_record_is_a_miss(store, redis_client):
    redis_client.set("chatrt:{s1}:meta", b"{not json")
    assert store.get_session("s1") is None


def test_a_lease_is_held_by_one_holder_until_released_or_expired(redis_url, redis_client):
    a = RedisStore(redis_url, ttl_s=600, lease_s=0.5)
    b = RedisStore(redis_url, ttl_s=600, lease_s=0.5)
    assert a.take_lease("s1") is False
    assert a.take_lease("s1") is True  # the holder renews it
    with pytest.raises(SessionLeased, match="in use by another process"):
        b.take_lease("s1")
    a.release_lease("s1")
    b.take_lease("s1")
    b.release_lease("s1")
    a.take_lease("s1")
    time.sleep(0.7)  # a crashed holder does not lock a session for ever
    b.take_lease("s1")


def test_prefixes_live_under_their_hash(store, redis_client, tiny_lm):
    store.put_prefix("abc", *chunked(tiny_lm, (5, 6, 7), chunk_bytes=1 << 20))
    assert keys(redis_client) == ["chatrt:prefix:{abc}:kv:0", "chatrt:prefix:{abc}:meta"]
    meta = store.get_prefix("abc")
    restored = from_chunks(meta, store.prefix_chunks("abc", meta), KVSpec.of(tiny_lm.info), Sealer(), "cpu")
    assert restored.ids == (5, 6, 7)
    assert store.get_prefix("nope") is None


def test_an_unreachable_redis_is_a_typed_error():
    dead = RedisStore("redis://127.0.0.1:1/0", ttl_s=10, lease_s=10, timeout_s=0.5)
    with pytest.raises(StoreUnavailable, match="could not read a session"):
        dead.get_session("s1")
    with pytest.raises(StoreUnavailable, match="not a Redis URL"):
        RedisStore("http://nowhere", ttl_s=10, lease_s=10)
