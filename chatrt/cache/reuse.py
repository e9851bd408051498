"""Which cached KV a turn starts from: the longest cached start of its prompt, from the session's own KV or the
shared prefix of its system prompt (computed, or loaded from Redis, on first use)."""

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
) -> Reuse:
    """The longest cached start of `prompt`. At least one prompt token is always left to prefill: its logits
    give the first reply token. `own_kv` is cropped (a view); a prefix computed here joins the prefix store."""
    limit = len(prompt) - 1
    kv, own = None, 0
    if own_kv is not None:
        own = min(common_prefix_len(own_kv.ids, prompt), limit)
        kv = own_kv.crop(own) if own else None
    if entry is None or not own < len(entry.ids) <= limit or tuple(prompt[: len(entry.ids)]) != entry.ids:
        return Reuse(kv, own)
    t0 = time.perf_counter()
    loaded = False

    def fill(ids: tuple[int, ...]) -> KV:
        nonlocal loaded
        stored = spill.load(entry.key, ids)
        loaded = stored is not None
        return stored if stored is not None else compute(ids)

    prefix_kv, hit = prefixes.kv(entry, fill, fallback=compute)  # past the wait (Redis stalled): own prefill
    prefix_kv = prefix_kv.to(spill.lm.device)
    if hit or loaded:
        return Reuse(prefix_kv, 0, len(entry.ids))
    return Reuse(prefix_kv, prefix_s=time.perf_counter() - t0)
