"""Which cached KV a turn starts from: the longest cached start of its prompt, from the session's own KV or the
shared prefix of its system prompt (computed, or loaded from Redis, on first use). A shared prefix is started
from by reference: the turn's KV reads its tensors where the prefix store keeps them, and never copies them."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from chatrt.cache.kv import KV, common_prefix_len
from chatrt.cache.prefix import PrefixEntry, PrefixStore
from chatrt.cache.spill import PrefixSpill


@dataclass(frozen=True)
class Reuse:
    kv: KV | None
    session_tokens: int = 0
    prefix_tokens: int = 0
    prefix_s: float = 0.0
    """Seconds spent computing a prefix that was not cached (part of this turn's prefill)."""


def reuse(
    prompt: list[int],
    own_kv: KV | None,
    entry: PrefixEntry | None,
    prefixes: PrefixStore,
    spill: PrefixSpill,
    compute: Callable[[tuple[int, ...]], KV],
    borrow: Callable[[list[int], int], KV | None] = lambda prompt, least: None,
) -> Reuse:
    """The longest cached start of `prompt`. At least one prompt token is always left to prefill: its logits
    give the first reply token. `own_kv` is cropped (a view); a prefix computed here joins the prefix store.
    `borrow(prompt, least)`: another session's cache that begins like the prompt for more than `least` tokens."""
    limit = len(prompt) - 1
    kv, own = None, 0
    if own_kv is not None:
        own = min(common_prefix_len(own_kv.ids, prompt), limit)
        kv = own_kv.crop(own) if own else None
    usable = entry is not None and len(entry.ids) <= limit and tuple(prompt[: len(entry.ids)]) == entry.ids
    other = borrow(prompt[:limit], max(own, len(entry.ids) if usable else 0))  # type: ignore[union-attr]
    if other is not None:
        return Reuse(other, prefix_tokens=len(other))
    if entry is None or not usable or own >= len(entry.ids):
        return Reuse(kv, own)
    t0 = time.perf_counter()
    prefix_kv, cached = shared_prefix(entry, prefixes, spill, compute)
    if cached:
        return Reuse(prefix_kv.referencing(), 0, len(entry.ids))
    return Reuse(prefix_kv.referencing(), prefix_s=time.perf_counter() - t0)


def shared_prefix(
    entry: PrefixEntry, prefixes: PrefixStore, spill: PrefixSpill, compute: Callable[[tuple[int, ...]], KV]
) -> tuple[KV, bool]:
    """The entry's KV on the device, and whether it was cached (in memory, or loaded from Redis where that is
    faster than computing it). Side effects: may load it from Redis or compute it (a prefill), for the store."""
    loaded = False

    def fill(ids: tuple[int, ...]) -> KV:
        nonlocal loaded
        stored = spill.load(entry.key, ids)
        loaded = stored is not None
        return stored if stored is not None else compute(ids)

    kv, hit = prefixes.kv(entry, fill, fallback=compute)  # past the wait (Redis stalled): own prefill
    return kv.to(spill.lm.device), hit or loaded
