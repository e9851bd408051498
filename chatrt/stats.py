"""Counters and the TurnStats / SessionStats / RuntimeStats models operators and bots read.

Reuse is counted token by token: prompt = reused (session + prefix) + prefilled, in every turn.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, computed_field


class TokenCounts(BaseModel):
    """Where a turn's (or many turns') prompt tokens came from."""

    prompt_tokens: int = 0
    reused_session_tokens: int = 0
    reused_prefix_tokens: int = 0
    prefilled_tokens: int = 0
    generated_tokens: int = 0

    @computed_field
    @property
    def reused_tokens(self) -> int:
        return self.reused_session_tokens + self.reused_prefix_tokens

    @computed_field
    @property
    def hit_rate(self) -> float:
        return self.reused_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


class TurnStats(TokenCounts):
    session_id: str = ""
    ttft_s: float
    """From the call to the first generated token, every lookup, restore and prefill included."""
    kv_source: str = "none"
    """Where the session's cache was when the turn began: device, host, redis or none."""
    restore_s: float = 0.0
    """Time to bring the cache to the device from a lower tier."""
    kv_decision: str = ""
    """Why a cache from a lower tier was restored or recomputed, with the cost model's estimates."""
    prefill_s: float
    decode_s: float
    decode_tokens_per_s: float
    e2e_s: float = 0.0
    """From the call to the reply's end (the last token generated; recording it not included)."""
    finish_reason: str
    dropped_turns: int = 0
    """The oldest turns dropped from the transcript to fit this one (session.overflow = "drop_oldest")."""


class TokenTotals(TokenCounts):
    turns: int = 0

    def add(self, t: TurnStats) -> None:
        self.turns += 1
        self.prompt_tokens += t.prompt_tokens
        self.reused_session_tokens += t.reused_session_tokens
        self.reused_prefix_tokens += t.reused_prefix_tokens
        self.prefilled_tokens += t.prefilled_tokens
        self.generated_tokens += t.generated_tokens


class SessionStats(TokenTotals):
    session_id: str
    tier: str
    """Where the session's cache is: device, host, redis or none."""
    kv_tokens: int
    kv_bytes: int


class TierUsage(BaseModel):
    sessions: int
    bytes: int
    budget_bytes: int


class TierCounters(BaseModel):
    """Moves on the tier ladder since start; each int field is also a Prometheus counter, its docstring the help."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    promotions: int = 0
    """Caches brought back up to the device."""
    demotions: int = 0
    """Caches moved one tier down (device → host, host → Redis)."""
    restores: int = 0
    """Caches restored from a lower tier instead of recomputed."""
    recomputes: int = 0
    """Caches on a lower tier that were not restored: the cost model said recompute, or they were rejected."""
    drops: int = 0
    """Caches that fell off the bottom of the ladder (their transcript stays)."""
    rejected: int = 0
    """Stored caches refused: another model's, a bad checksum, missing chunks."""
    redis_errors: int = 0
    """Redis calls that failed (the turn went on without Redis)."""
    restore_s: float = 0.0
    """Time spent restoring caches from lower tiers."""
    prefix_spills: int = 0
    """Evicted prefixes written to Redis."""
    prefix_restores: int = 0
    """Prefixes loaded from Redis instead of computed."""


class RuntimeStats(TokenTotals):
    instance: str = ""
    """The process: host-pid-random."""
    sessions_open: int
    sessions_closed: int
    kv_bytes: int
    """Bytes of all session caches (a tensor shared by several sessions counted once)."""
    prefix_entries: int
    prefix_bytes: int
    prefix_hits: int
    prefix_misses: int
    prefix_evictions: int
    tiers: dict[str, TierUsage]
    tier_counters: TierCounters
    redis: str = "off"
    """off (none configured), ok, or down (the last call failed; caches and transcripts stay in memory)."""
    requests_running: int = 0
    """Turns in the engine's batch now."""
    requests_waiting: int = 0
    """Turns queued for the engine (the batch is full, or their KV does not fit the device yet)."""
    preemptions: int = 0
    """Running turns parked on the host because the batch's KV outgrew tiers.device_bytes (they resume first)."""
    decode_step: str = "eager"
    """How decode steps run: "compiled"; "compiling" (a background process builds it) or "loading" (from disk),
    eagerly meanwhile; or "eager" (engine.compile is off, the model is not supported, or compiling failed)."""


class DeploymentStats(BaseModel):
    """Every process sharing one Redis, as `chatrt stats --redis` shows it."""

    runtimes: dict[str, RuntimeStats]
    """The stats each live process last published, by instance (host-pid-random)."""
    sessions: int
    """Session transcripts in Redis."""
    sessions_with_kv: int
    kv_bytes: int
    prefixes: int
    prefix_bytes: int

    def total(self) -> TokenTotals:
        """Token counts summed over the processes."""
        fields = ("turns", *(f for f in TokenCounts.model_fields))
        return TokenTotals(**{f: sum(getattr(s, f) for s in self.runtimes.values()) for f in fields})


class Recorder:
    """Runtime-wide totals, safe to update from many threads."""

    def __init__(self, on_turn: Callable[[TurnStats, str, str], None] = lambda *_: None) -> None:
        """`on_turn(stats, user message, reply)` after each turn."""
        self.totals = TokenTotals()
        self.sessions_closed = 0
        self.on_turn = on_turn
        self._lock = threading.Lock()

    def record(self, t: TurnStats, user: str = "", reply: str = "") -> None:
        with self._lock:
            self.totals.add(t)
        self.on_turn(t, user, reply)

    def closed(self) -> None:
        with self._lock:
            self.sessions_closed += 1

    def snapshot(self) -> tuple[TokenTotals, int]:
        with self._lock:
            return self.totals.model_copy(), self.sessions_closed
