"""Shared prefixes evicted from memory wait in Redis, where any process can load one back instead of computing it
when the cost model says loading is faster. Serialization, hashing and Redis I/O: called outside every lock."""

from __future__ import annotations

import time

from chatrt.cache.kv import KV, KVSpec, from_chunks
from chatrt.cache.tiers import Tiers
from chatrt.errors import CacheRejected, StoreUnavailable


class PrefixSpill:
    def __init__(self, tiers: Tiers) -> None:
        """Through the tiers' store, cost model, seal and counters."""
        self.tiers, self.store, self.lm = tiers, tiers.store, tiers.lm
        self.spec = KVSpec.of(tiers.lm.info)

    def spill(self, key: str, kv: KV) -> None:
        """An evicted prefix (the prefix store's `on_evict`) goes to Redis, when there is one."""
        if self.store is None:
            return
        try:
            self.store.put_prefix(key, *self.tiers.chunks(kv.flat()))
            self.tiers.count(prefix_spills=1)
        except StoreUnavailable:
            self.tiers.count(redis_errors=1)

    def load(self, key: str, ids: tuple[int, ...]) -> KV | None:
        """The prefix's KV from Redis when it is there, valid, for exactly `ids`, and faster than a prefill."""
        if self.store is None:
            return None
        try:
            meta = self.store.get_prefix(key)  # the chunks are read only once the cost model says restore
            if (
                meta is None
                or meta.ids != ids
                or meta.shared_tokens
                or self.tiers.cost.choose("redis", meta.nbytes, len(ids)).action == "recompute"
            ):
                return None
            t0 = time.perf_counter()
            kv = from_chunks(meta, self.store.prefix_chunks(key, meta), self.spec, self.tiers.sealer, self.lm.device)
        except CacheRejected:
            self.tiers.count(rejected=1)
            return None
        except StoreUnavailable:
            self.tiers.count(redis_errors=1)
            return None
        self.tiers.count(prefix_restores=1, restore_s=time.perf_counter() - t0)
        return kv
