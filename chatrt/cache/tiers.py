"""The movers of the tier ladder: they carry session caches device → host → Redis → dropped and back, as the
policy (`Ladder`: LRU under byte and session budgets) asks, and weigh restore against recompute.

The policy is consulted under this module's lock; copies, serialization, hashing and Redis I/O run outside
it, in `settle`, on the thread of a turn that has let its session go (one thread settles at a time; the others
leave their moves to it). A session that is generating has its KV checked out: pinned, it never moves. A
checkout of a cache that is on its way down waits for it to land. The cost model's probes are `probes.py`;
evicted shared prefixes go to Redis through `spill.py`.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from chatrt.cache.cost import Choice
from chatrt.cache.integrity import Sealer
from chatrt.cache.kv import KV, KVMeta, KVSpec, check_meta, from_chunks, to_chunks
from chatrt.cache.ladder import TIERS, Budget, Eviction, Ladder, Slot, Tier
from chatrt.cache.prefix import prefix_hash
from chatrt.cache.probes import cost_model
from chatrt.cache.record import SessionRecord
from chatrt.config import TierConfig
from chatrt.errors import CacheRejected, StoreUnavailable
from chatrt.model import LoadedModel
from chatrt.stats import TierCounters, TierUsage

if TYPE_CHECKING:  # the Redis client is an optional install
    from chatrt.cache.store import RedisStore

Source = Literal["device", "host", "redis", "none"]
Link = Callable[[tuple[int, ...]], "tuple[KV, ...] | None"]
"""The shared segments that hold these leading ids, when they are in memory (None: they are not)."""
_PROBE_TOKENS = 128
_PROBE_BYTES = 8 * 2**20


@dataclass(frozen=True)
class Move:
    """One movement on the ladder, kept for operators and for tests of the eviction order."""

    session_id: str
    src: Source
    dst: Literal["device", "host", "redis", "dropped"]


@dataclass(frozen=True)
class Checkout:
    """A session's KV taken for a turn, and how it got to the device."""

    kv: KV | None
    source: Source
    restore_s: float = 0.0
    choice: Choice | None = None
    rejected: str = ""  # why a stored cache could not be used


class Tiers:
    def __init__(
        self,
        config: TierConfig,
        lm: LoadedModel,
        store: RedisStore | None,
        compute: Callable[[tuple[int, ...]], KV],
    ) -> None:
        """`compute`: the KV of some ids from scratch (the engine's), for the cost model's prefill probe."""
        self.config, self.lm, self.store, self.compute = config, lm, store, compute
        self.fingerprint = lm.info.fingerprint
        self.spec = KVSpec.of(lm.info)
        self.sealer = store.sealer if store is not None else Sealer()
        self.cost = cost_model(lm, compute, store, self.chunks, self.sealer)
        self.counters = TierCounters()
        self.moves: deque[Move] = deque(maxlen=1024)
        self._ladder = self._new_ladder()
        self._lock = threading.Condition(threading.RLock())  # notified when a moving cache lands
        self._settling = False  # a thread is moving caches down (`settle`)
        self._kept: dict[str, float] = {}  # shared prefixes stored in Redis → when to store them again

    def _new_ladder(self) -> Ladder:
        c = self.config
        return Ladder(
            {
                "device": Budget(c.device_bytes, c.device_sessions),
                "host": Budget(c.host_bytes, c.host_sessions),
                "redis": Budget(c.redis_bytes, c.redis_sessions),
            }
        )

    # -- a session's turn --------------------------------------------------------------------------

    def checkout(self, session_id: str, link: Link = lambda ids: None) -> Checkout:
        """Take the session's KV out of the ladder and bring it to the device, or leave it to be recomputed
        when that is cheaper. It stays pinned (counted on the device, never moved) until `checkin`. A KV stored
        in Redis without its shared segments is joined to them again by `link(ids)` (the segments that hold
        those leading ids, when in memory; else its own tensors are of no use and it is recomputed)."""
        with self._lock:
            self._lock.wait_for(lambda: session_id not in self._ladder.moving)
            tier, slot = self._ladder.take(session_id)
        if slot is None:
            return Checkout(None, "none")
        if tier == "device":
            return Checkout(slot.kv, "device")
        return self._promote(session_id, tier, slot, link)

    def checkin(self, session_id: str, kv: KV | None) -> None:
        """The turn is over: its KV is the session's most recently used cache on the device. Nothing moves yet:
        the turn lets its session go first, then calls `settle`."""
        with self._lock:
            self._ladder.unpin(session_id, Slot(kv, None, kv.nbytes) if kv is not None else None)

    def rebase(self, session_id: str, kv: KV) -> None:
        """An idle session's cache in memory is `kv` from now on (the same ids, held another way: referencing a
        shared prefix instead of owning its tensors). A no-op when its cache has moved or changed meanwhile."""
        with self._lock:
            tier, slot = self._ladder.find(session_id)
            if slot is not None and slot.kv is not None and slot.kv.ids == kv.ids:
                self._ladder.lru[tier][session_id] = Slot(kv, None, kv.nbytes)

    def adopt(self, record: SessionRecord) -> str:
        """A session resumed from Redis: its KV (if the record names one) is on the Redis tier.
        Returns why a stored cache was refused ("" when accepted or absent)."""
        if record.kv is None:
            return ""
        try:
            check_meta(record.kv, self.spec)
        except CacheRejected as e:
            self.count(rejected=1)
            return str(e)
        with self._lock:  # a stale copy of it still on its way down lands (and is discarded) first
            self._lock.wait_for(lambda: record.session_id not in self._ladder.moving)
            self._ladder.put("redis", record.session_id, Slot(None, record.kv, record.kv.nbytes))
        return ""

    def peek(self, session_id: str) -> KV | None:
        """The session's KV when it is in process memory (device or host), without moving it."""
        with self._lock:
            tier, slot = self._ladder.find(session_id)
            return slot.kv if slot is not None and tier != "redis" else None

    def where(self, session_id: str) -> Source:
        with self._lock:
            tier, slot = self._ladder.find(session_id)
            if slot is not None or session_id in self._ladder.pinned:
                return tier
            return self._ladder.moving.get(session_id, "none")

    def moving(self, session_id: str) -> bool:
        """Whether the session's cache is on its way down now (taken off a tier, not yet landed)."""
        with self._lock:
            return session_id in self._ladder.moving

    def kv_meta(self, session_id: str) -> KVMeta | None:
        """What the session's Redis chunks hold, when its KV is on the Redis tier (for its record)."""
        with self._lock:
            slot = self._ladder.lru["redis"].get(session_id)
            return slot.meta if slot is not None else None

    def drop(self, session_id: str) -> None:
        """Forget the session's KV on every tier of this process (the caller deletes its Redis keys). A cache
        on its way down is discarded where it lands."""
        with self._lock:
            self._ladder.drop(session_id)

    def take(self, session_id: str) -> tuple[KVMeta | None, KV | None]:
        """Runtime shutdown: forget the session's KV here and return what Redis should keep of it: the KV when it
        was in memory (for the caller to serialize, outside any lock), or the metadata of its chunks already in
        Redis."""
        with self._lock:
            self._lock.wait_for(lambda: session_id not in self._ladder.moving)
            tier, slot = self._ladder.find(session_id)
            self._ladder.drop(session_id)
        if slot is None:
            return None, None
        return (slot.meta, None) if tier == "redis" else (None, slot.kv)

    def clear(self) -> None:
        with self._lock:
            self._ladder = self._new_ladder()

    def demote(self, session_id: str) -> Source:
        """Move an idle session's cache one tier down now (device → host → Redis → dropped), whatever the
        budgets say, then enforce them. A generating session is not moved. Returns where the cache is after."""
        with self._lock:
            eviction = self._ladder.take_idle(session_id)
        if eviction is not None:
            self._drain([eviction])
            self.settle()
        return self.where(session_id)

    # -- operators ---------------------------------------------------------------------------------

    def usage(self) -> dict[Tier, TierUsage]:
        with self._lock:
            budgets = {
                "device": self.config.device_bytes,
                "host": self.config.host_bytes,
                "redis": self.config.redis_bytes if self.store is not None else 0,
            }
            return {
                t: TierUsage(
                    sessions=self._ladder.sessions(t),
                    bytes=self._ladder.bytes(t),
                    budget_bytes=budgets[t],
                )
                for t in TIERS
            }

    # -- moves -------------------------------------------------------------------------------------

    def _promote(self, session_id: str, tier: Tier, slot: Slot, link: Link) -> Checkout:
        choice = self._choose(tier, slot)
        t0 = time.perf_counter()
        try:
            kv = None if choice is not None and choice.action == "recompute" else self._load(session_id, slot, link)
        except (CacheRejected, StoreUnavailable) as e:
            kv, rejected = None, str(e)
            self.count(rejected=isinstance(e, CacheRejected), redis_errors=isinstance(e, StoreUnavailable))
        else:
            rejected = ""
        seconds = time.perf_counter() - t0
        self._after_promotion(session_id, tier)
        if kv is None:
            self.count(recomputes=1)
            self._log(session_id, tier, "dropped")
            return Checkout(None, tier, choice=choice, rejected=rejected)
        if choice is not None:
            self.cost.observe(tier, slot.nbytes, seconds)
        with self._lock:
            self._ladder.pin(session_id, kv.nbytes)
        self.count(promotions=1, restores=1, restore_s=seconds)
        self._log(session_id, tier, "device")
        return Checkout(kv, tier, restore_s=seconds, choice=choice)

    def _choose(self, tier: Tier, slot: Slot) -> Choice | None:
        """None when there is nothing to weigh (host memory is device memory on a CPU-only machine)."""
        if tier == "host" and self.lm.device.type == "cpu":
            return None
        tokens = len(slot.meta.ids) - slot.meta.shared_tokens if slot.meta is not None else len(slot.kv or ())
        try:
            return self.cost.choose(tier, slot.nbytes, tokens)
        except (StoreUnavailable, CacheRejected):  # a probe failed (Redis went away): recompute
            self.count(redis_errors=1)
            return Choice("recompute", float("inf"), 0.0)

    def count(self, **deltas: float) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self.counters, name, getattr(self.counters, name) + delta)

    def _load(self, session_id: str, slot: Slot, link: Link) -> KV:
        if slot.kv is not None:
            return slot.kv.to(self.lm.device)
        meta = slot.meta
        assert self.store is not None and meta is not None
        shared = link(meta.ids[: meta.shared_tokens]) if meta.shared_tokens else ()
        if shared is None:
            raise CacheRejected("the shared prefix it was stored without is not in memory here")
        own = from_chunks(meta, self.store.session_chunks(session_id, meta), self.spec, self.sealer, self.lm.device)
        return KV.linked(shared, own)

    def _after_promotion(self, session_id: str, tier: Tier) -> None:
        """The session's copy on `tier` is gone: a Redis copy's chunks are deleted and its record says so."""
        if tier != "redis" or self.store is None:
            return
        try:
            self.store.put_kv(session_id, None)
        except StoreUnavailable:
            self.count(redis_errors=1)

    def settle(self) -> None:
        """Move idle caches down until every tier is within its budgets: the policy picks them under the lock,
        the copies and Redis writes run after it is released, on this thread. One thread settles at a time: a
        call while another settles returns at once, and that one takes the new work too (so a stalled Redis
        write holds up only the thread that was already waiting on it)."""
        with self._lock:
            if self._settling:
                return
            self._settling = True
        try:
            while True:
                with self._lock:
                    evictions = self._ladder.evict()
                    if not evictions:
                        self._settling = False
                        return
                self._drain(evictions)
        except BaseException:
            with self._lock:
                self._settling = False
            raise

    def _drain(self, evictions: list[Eviction]) -> None:
        """Move these caches down, and those their landings push off the next tier."""
        work = deque(evictions)
        while work:
            work.extend(self._move_down(work.popleft()))

    def _move_down(self, e: Eviction) -> list[Eviction]:
        """One step down the ladder for a cache the policy took off `e.tier`, then landed (or discarded, when
        its session was dropped meanwhile). Frees the device copy; writes to Redis outside the lock. Returns the
        caches its landing pushed over the next tier's budget, taken off it in the same step (so no tier is ever
        seen over its budget by a landing) for the caller to move on."""
        dst: Tier | None = None
        slot: Slot | None = None
        if e.tier == "device":
            assert e.slot.kv is not None
            kv = e.slot.kv.to("cpu", pin=self.lm.device.type == "cuda")
            dst, slot = "host", Slot(kv, None, e.slot.nbytes)
        elif e.tier == "host" and self.store is not None:
            assert e.slot.kv is not None
            try:
                meta, chunks = self.chunks(e.slot.kv)
                # Refused when the session is not stored (closed meanwhile) or another process holds it now.
                if self.store.put_kv(e.session_id, meta, chunks):
                    dst, slot = "redis", Slot(None, meta, meta.nbytes)
            except StoreUnavailable:
                self.count(redis_errors=1)
        elif e.tier == "redis":
            self._after_promotion(e.session_id, "redis")  # its chunks go; the transcript stays
        with self._lock:
            landed = self._ladder.land(e.session_id, dst, slot)
            self._lock.notify_all()
            pushed = self._ladder.evict()
        if not landed:  # dropped while it moved (closed): nothing of it may stay
            if dst == "redis":
                self._after_promotion(e.session_id, "redis")
            return pushed
        if dst is not None:
            self.count(demotions=1)
        else:
            self.count(drops=1)
        self._log(e.session_id, e.tier, dst or "dropped")
        return pushed

    def chunks(self, kv: KV) -> tuple[KVMeta, list[memoryview]]:
        """The KV as Redis stores it: metadata and sealed chunks of its own tensors; its shared segments are
        stored once, apart, by the hash of their ids (as evicted prefixes are), for any process to join it to
        again. Serializes, hashes and may write a prefix to Redis: call outside locks."""
        if kv.shared:
            self._keep_shared(kv)
        return to_chunks(kv, self.fingerprint, self.config.redis_chunk_bytes, self.sealer)

    def _keep_shared(self, kv: KV) -> None:
        """Store the KV's shared segments in Redis as one prefix, unless this process stored it lately."""
        if self.store is None:
            return
        ids = kv.ids[: kv.shared_len]
        key, now = prefix_hash(self.fingerprint, ids), time.monotonic()
        with self._lock:
            if self._kept.get(key, 0.0) > now:
                return
            self._kept[key] = now + self.config.redis_ttl_s / 2  # rewritten before its keys expire
        try:
            meta = self.store.get_prefix(key)
            if meta is None or meta.ids != ids:
                self.store.put_prefix(key, *self.chunks(KV(ids, (), (), kv.shared).flat()))  # flat: no recursion
                self.count(prefix_spills=1)
        except StoreUnavailable:
            with self._lock:
                self._kept.pop(key, None)
            self.count(redis_errors=1)

    def _log(self, session_id: str, src: Source, dst: Literal["device", "host", "redis", "dropped"]) -> None:
        self.moves.append(Move(session_id, src, dst))
