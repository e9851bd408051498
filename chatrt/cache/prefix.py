"""PrefixStore: system-prompt prefixes keyed by a sha256 of their token ids, computed once, shared, refcounted.

Unreferenced entries are evicted least recently used first when the store is over its entry or byte limit.
"""

from __future__ import annotations

import hashlib
import threading
from array import array
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from chatrt.cache.kv import KV


def prefix_hash(fingerprint: str, ids: tuple[int, ...]) -> str:
    """Stable across processes (unlike Python's hash): model fingerprint + the ids as int32 bytes."""
    h = hashlib.sha256(fingerprint.encode())
    h.update(array("i", ids).tobytes())
    return h.hexdigest()


@dataclass(eq=False)
class PrefixEntry:
    key: str
    ids: tuple[int, ...]
    kv: KV | None = None
    refs: int = 0
    parent: PrefixEntry | None = None
    """The entry whose tensors this one's KV references (a fork point's system prompt): held while this one is."""
    lock: threading.Lock = field(default_factory=threading.Lock)  # one computation per entry, waited for with a bound


@dataclass
class PrefixCounters:
    hits: int = 0  # a turn reused a computed prefix
    misses: int = 0  # a turn had to compute it
    evictions: int = 0
    timeouts: int = 0  # a turn waited `wait_s` for another to compute or load it, then computed its own copy


class PrefixStore:
    def __init__(
        self,
        fingerprint: str,
        *,
        max_entries: int,
        max_bytes: int,
        wait_s: float = 30.0,
        on_evict: Callable[[str, KV], None] = lambda key, kv: None,
    ) -> None:
        """`on_evict(key, kv)` gets each computed entry as it leaves memory (the tiers keep it in Redis).
        `wait_s`: how long a turn waits for another to compute or load an entry before computing its own."""
        self.fingerprint, self.wait_s = fingerprint, wait_s
        self.on_evict = on_evict
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._entries: OrderedDict[str, PrefixEntry] = OrderedDict()  # LRU order, oldest first
        self._lock = threading.Lock()
        self.counters = PrefixCounters()

    def acquire(self, ids: tuple[int, ...]) -> PrefixEntry:
        """The entry for `ids`, created empty if new; it is pinned (never evicted) until released."""
        key = prefix_hash(self.fingerprint, ids)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.ids != ids:  # the ids are compared too: a hash collision never serves wrong KV
                entry = PrefixEntry(key, ids)
                self._entries[key] = entry
            entry.refs += 1
            self._touch(entry)
            return entry

    def adopt(self, kv: KV, parent: PrefixEntry | None) -> PrefixEntry:
        """An entry for a KV computed elsewhere (a conversation forked at this point), pinned until released.
        `parent`: the entry whose tensors `kv` references, held as long as this one is kept. When an entry of
        these ids is computed already, that one is returned and `kv` is not kept."""
        entry = self.acquire(kv.ids)
        with self._lock:
            if entry.kv is None:
                entry.kv = kv
                if parent is not None:
                    parent.refs += 1
                    entry.parent = parent
            evicted = self._evict()
        self._spill(evicted)
        return entry

    def release(self, entry: PrefixEntry) -> None:
        with self._lock:
            assert entry.refs > 0, "release without acquire"
            entry.refs -= 1
            evicted = self._evict()
        self._spill(evicted)

    def kv(
        self,
        entry: PrefixEntry,
        compute: Callable[[tuple[int, ...]], KV],
        *,
        fallback: Callable[[tuple[int, ...]], KV] | None = None,
    ) -> tuple[KV, bool]:
        """The entry's KV, computing it with `compute(ids)` the first time; returns (kv, was_hit). Only the
        sessions that need this entry wait while one of them computes it, and for `wait_s` at most: past that
        (a Redis load stalled, say) the caller computes its own copy with `fallback` (default `compute`), which
        the entry does not keep.

        Side effects: may run `compute` (a prefill) and then evict unreferenced entries over the limits (each
        handed to `on_evict` once the store's lock is released: that may write to Redis).
        """
        if not entry.lock.acquire(timeout=self.wait_s):
            with self._lock:
                self.counters.misses += 1
                self.counters.timeouts += 1
            return (fallback or compute)(entry.ids), False
        try:
            hit = entry.kv is not None
            if not hit:
                entry.kv = compute(entry.ids)
                assert entry.kv.ids == entry.ids
        finally:
            entry.lock.release()
        with self._lock:
            self._touch(entry)
            if hit:
                self.counters.hits += 1
            else:
                self.counters.misses += 1
            evicted = self._evict()
        self._spill(evicted)
        return entry.kv, hit

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(e.kv.nbytes for e in self._entries.values() if e.kv is not None)

    def __len__(self) -> int:
        with self._lock:
            return sum(e.kv is not None for e in self._entries.values())

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def _touch(self, entry: PrefixEntry) -> None:
        if self._entries.get(entry.key) is entry:
            self._entries.move_to_end(entry.key)

    def _spill(self, evicted: list[tuple[str, KV]]) -> None:
        """Hand evicted entries to `on_evict` (serialization and Redis I/O), never under self._lock."""
        for key, kv in evicted:
            self.on_evict(key, kv)

    def _evict(self) -> list[tuple[str, KV]]:
        """Drop unreferenced entries, oldest first, while over a limit; returns the computed ones dropped, for
        `_spill`. Caller holds self._lock."""

        def over() -> bool:
            live = [e for e in self._entries.values() if e.kv is not None]
            return len(live) > self.max_entries or sum(e.kv.nbytes for e in live) > self.max_bytes  # type: ignore[union-attr]

        evicted = []
        for key in list(self._entries):
            entry = self._entries[key]
            if entry.refs == 0 and (entry.kv is None or over()):
                del self._entries[key]
                if entry.parent is not None:  # the parent may go once no entry references it (next pass)
                    entry.parent.refs -= 1
                if entry.kv is not None:
                    self.counters.evictions += 1
                    evicted.append((key, entry.kv))
        return evicted
