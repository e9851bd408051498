"""The tier ladder's policy: which idle cache sits on which tier, which caches are pinned, and which must move
down so every tier stays within its budgets (LRU). Model-free and I/O-free, so it is tested alone: it only
moves Slots between LRUs. `Tiers` does the copies and the Redis writes the policy asks for, outside its lock.

A cache is in exactly one state: idle on one tier's LRU, pinned (checked out for a turn: counted on the device,
never moved), or moving (taken off its tier by `evict` or `take_idle`, not yet `land`ed on the next one).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Literal

from chatrt.cache.kv import KV, KVMeta

Tier = Literal["device", "host", "redis"]
TIERS: tuple[Tier, ...] = ("device", "host", "redis")


@dataclass(frozen=True)
class Budget:
    bytes: int
    sessions: int = 0  # 0: no limit on the count


@dataclass
class Slot:
    """Where one session's KV is: tensors on the device or the host, or `meta` of its chunks in Redis."""

    kv: KV | None
    meta: KVMeta | None
    nbytes: int


@dataclass(frozen=True)
class Eviction:
    """A cache the policy took off `tier`: the caller moves it one tier down and `land`s it (or drops it)."""

    session_id: str
    tier: Tier
    slot: Slot


@dataclass
class Ladder:
    budgets: dict[Tier, Budget]
    lru: dict[Tier, OrderedDict[str, Slot]] = field(default_factory=lambda: {t: OrderedDict() for t in TIERS})
    pinned: dict[str, int] = field(default_factory=dict)
    """Checked-out session → the bytes it occupies on the device."""
    moving: dict[str, Tier] = field(default_factory=dict)
    """Session → the tier its cache is leaving."""
    dropped: set[str] = field(default_factory=set)
    """Moving sessions dropped meanwhile: where their cache lands, it is discarded."""

    def find(self, session_id: str) -> tuple[Tier, Slot | None]:
        for tier in TIERS:
            slot = self.lru[tier].get(session_id)
            if slot is not None:
                return tier, slot
        return "device", None

    def take(self, session_id: str) -> tuple[Tier, Slot | None]:
        """Pin the session for a turn, taking its cache (if any) off its tier. Not while it is moving."""
        assert session_id not in self.moving and session_id not in self.pinned
        tier, slot = self.find(session_id)
        if slot is not None:
            del self.lru[tier][session_id]
        self.pinned[session_id] = slot.nbytes if slot is not None else 0
        return tier, slot

    def pin(self, session_id: str, nbytes: int) -> None:
        """The pinned session's cache now occupies `nbytes` on the device (brought up, or recomputed). A no-op
        when the session was dropped meanwhile."""
        if session_id in self.pinned:
            self.pinned[session_id] = nbytes

    def unpin(self, session_id: str, slot: Slot | None) -> None:
        """The turn is over: its cache (if kept) is the most recently used on the device."""
        self.pinned.pop(session_id, None)
        if slot is not None:
            self.lru["device"][session_id] = slot

    def put(self, tier: Tier, session_id: str, slot: Slot) -> None:
        assert session_id not in self.pinned and session_id not in self.moving
        self.lru[tier][session_id] = slot

    def evict(self) -> list[Eviction]:
        """Take least recently used idle caches off every tier that is over its budgets, top down; they are
        moving until landed. Landing may put the next tier over: call again until it returns nothing."""
        out = []
        for tier in TIERS:
            while self._over(tier) and self.lru[tier]:
                session_id, slot = self.lru[tier].popitem(last=False)
                self.moving[session_id] = tier
                out.append(Eviction(session_id, tier, slot))
        return out

    def take_idle(self, session_id: str) -> Eviction | None:
        """Take an idle cache off its tier to move it down now, whatever the budgets say."""
        tier, slot = self.find(session_id)
        if slot is None:
            return None
        del self.lru[tier][session_id]
        self.moving[session_id] = tier
        return Eviction(session_id, tier, slot)

    def land(self, session_id: str, tier: Tier | None, slot: Slot | None) -> bool:
        """A move is over: the cache is on `tier` now (None: it was dropped). False when the session was dropped
        while it moved: the caller discards what it wrote."""
        assert session_id in self.moving
        del self.moving[session_id]
        if session_id in self.dropped:
            self.dropped.discard(session_id)
            return False
        if tier is not None and slot is not None:
            self.lru[tier][session_id] = slot
        return True

    def drop(self, session_id: str) -> None:
        """Forget the session everywhere; a cache on its way down is discarded where it lands."""
        for lru in self.lru.values():
            lru.pop(session_id, None)
        self.pinned.pop(session_id, None)
        if session_id in self.moving:
            self.dropped.add(session_id)

    def sessions(self, tier: Tier) -> int:
        """Caches on `tier`; the device also holds every pinned one."""
        return len(self.lru[tier]) + (len(self.pinned) if tier == "device" else 0)

    def bytes(self, tier: Tier) -> int:
        pinned = sum(self.pinned.values()) if tier == "device" else 0
        return pinned + sum(s.nbytes for s in self.lru[tier].values())

    def _over(self, tier: Tier) -> bool:
        budget = self.budgets[tier]
        return self.bytes(tier) > budget.bytes or 0 < budget.sessions < self.sessions(tier)
