"""The prefix store computes each prefix once, never serves another prefix's KV, and evicts by LRU."""

import hashlib
import threading
import time

import torch

import chatrt.cache.prefix
from chatrt.cache.kv import KV
from chatrt.cache.prefix import PrefixStore, prefix_hash
from tests.conftest import compute_kv


def store(**limits) -> PrefixStore:
    return PrefixStore("fp", **{"max_entries": 8, "max_bytes": 1 << 30, **limits})


def test_hash_is_stable_and_depends_on_model_and_ids():
    assert prefix_hash("fp", (1, 2, 3)) == prefix_hash("fp", (1, 2, 3))
    assert prefix_hash("fp", (1, 2, 3)) != prefix_hash("fp", (1, 2, 4))
    assert prefix_hash("fp", (1, 2, 3)) != prefix_hash("other-model", (1, 2, 3))
    # sha256 over the model fingerprint and the ids as int32 bytes: the same in every process
    expected = hashlib.sha256(b"fp" + (1).to_bytes(4, "little") + (2).to_bytes(4, "little")).hexdigest()
    assert prefix_hash("fp", (1, 2)) == expected


def test_computed_once_then_hit(tiny_lm):
    s = store()
    calls = []
    compute = lambda ids: calls.append(ids) or compute_kv(tiny_lm, ids)  # noqa: E731
    entry = s.acquire((5, 6, 7))
    kv1, hit1 = s.kv(entry, compute)
    kv2, hit2 = s.kv(s.acquire((5, 6, 7)), compute)
    assert (hit1, hit2) == (False, True) and kv1 is kv2 and len(calls) == 1
    assert (s.counters.misses, s.counters.hits) == (1, 1)


def test_concurrent_first_use_computes_once(tiny_lm):
    s = store()
    calls = []

    def compute(ids):
        calls.append(ids)
        time.sleep(0.05)
        return compute_kv(tiny_lm, ids)

    entry = s.acquire((9, 9, 9))
    threads = [threading.Thread(target=s.kv, args=(entry, compute)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1


def test_unreferenced_entries_are_evicted_oldest_first(tiny_lm):
    s = store(max_entries=2)
    entries = []
    for i in range(3):
        e = s.acquire((100 + i, 1, 2))
        s.kv(e, lambda ids: compute_kv(tiny_lm, ids))
        entries.append(e)
    assert len(s) == 3  # all referenced: none may go
    s.release(entries[1])
    s.release(entries[0])
    assert len(s) == 2 and s.counters.evictions == 1
    # entry 1 was used less recently than entry 0 (both released); the LRU one left
    assert s.acquire(entries[1].ids).kv is None
    assert s.acquire(entries[0].ids).kv is entries[0].kv


def test_byte_limit(tiny_lm):
    one = compute_kv(tiny_lm, (1, 2, 3, 4)).nbytes
    s = store(max_bytes=one * 2)
    for i in range(3):
        e = s.acquire((i, 2, 3, 4))
        s.kv(e, lambda ids: compute_kv(tiny_lm, ids))
        s.release(e)
    assert s.nbytes <= 2 * one and len(s) == 2


def test_a_hash_collision_never_serves_another_prefix(tiny_lm, monkeypatch):
    monkeypatch.setattr(chatrt.cache.prefix, "prefix_hash", lambda fp, ids: "same")
    s = store()
    a = s.acquire((1, 2, 3))
    kv_a, _ = s.kv(a, lambda ids: compute_kv(tiny_lm, ids))
    b = s.acquire((4, 5, 6))
    kv_b, hit = s.kv(b, lambda ids: compute_kv(tiny_lm, ids))
    assert not hit and kv_b.ids == (4, 5, 6) and kv_a.ids == (1, 2, 3)


def test_an_evicted_entry_is_handed_on_outside_the_stores_lock(tiny_lm):
    """on_evict may serialize and write to Redis: the store's lock is not held meanwhile."""
    handed: list[tuple[str, bool]] = []

    def on_evict(key, kv):
        free = s._lock.acquire(blocking=False)
        if free:
            s._lock.release()
        handed.append((key, free))

    s = PrefixStore("fp", max_entries=1, max_bytes=1 << 30, on_evict=on_evict)
    for i in range(2):
        e = s.acquire((200 + i, 1))
        s.kv(e, lambda ids: compute_kv(tiny_lm, ids))
        s.release(e)
    assert handed == [(prefix_hash("fp", (200, 1)), True)]


def test_a_turn_waits_for_another_to_compute_a_prefix_only_so_long_then_computes_its_own():
    """Only the sessions that need a prefix wait while one computes or loads it, and at most `wait_s`: a load
    stalled on Redis costs the others a recompute of their own, never a hang."""
    s = store(wait_s=0.2)
    entry = s.acquire((1, 2, 3))
    stalled, done = threading.Event(), threading.Event()

    def stuck(ids):
        stalled.set()
        done.wait(30)  # a Redis load that does not answer
        return fake_kv(ids)

    slow = threading.Thread(target=s.kv, args=(entry, stuck))
    slow.start()
    stalled.wait(10)
    t0 = time.monotonic()
    kv, hit = s.kv(entry, stuck, fallback=fake_kv)
    assert time.monotonic() - t0 < 5 and not hit and kv.ids == (1, 2, 3) and entry.kv is None
    assert s.counters.timeouts == 1
    other = s.acquire((4, 5))
    assert s.kv(other, fake_kv)[0].ids == (4, 5)  # another prefix never waits for this one
    done.set()
    slow.join()
    assert entry.kv is not None and entry.kv is not kv  # the first computation is the one kept


def fake_kv(ids):
    layer = torch.zeros(1, 1, len(ids), 2)
    return KV(tuple(ids), (layer,), (layer,))
