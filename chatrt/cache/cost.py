"""The cost model: is it faster to restore a cache from a lower tier or to recompute it from the transcript?

It learns prefill speed from real prefills and each tier's restore bandwidth from real restores; until it has
seen one, a short probe measures it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

Action = Literal["restore", "recompute"]
_SMOOTHING = 0.3  # weight of a new observation: follows a machine that gets busier without jumping on one outlier
_MIN_PREFILL_TOKENS = 32  # shorter prefills are dominated by fixed per-call overhead


@dataclass(frozen=True)
class Choice:
    action: Action
    restore_s: float
    recompute_s: float

    @property
    def reason(self) -> str:
        return f"{self.action}: restore ~{self.restore_s * 1000:.0f} ms vs recompute ~{self.recompute_s * 1000:.0f} ms"


class CostModel:
    """Estimates in seconds: restore = latency + bytes / bandwidth(tier); recompute = tokens × seconds per token."""

    def __init__(self, probes: dict[str, Callable[[], tuple[float, float]]]) -> None:
        """`probes[name]()` measures one quantity when nothing has been observed yet and returns (amount, seconds):
        name "prefill" in tokens, a tier name in bytes."""
        self.probes = probes
        self._rates: dict[str, float] = {}  # amount per second, per quantity
        self._latency: dict[str, float] = {}  # seconds a restore costs whatever its size (round trips)
        self._lock = threading.Lock()

    def observe(self, name: str, amount: float, seconds: float) -> None:
        """A real prefill ("prefill", tokens) or restore (tier name, bytes) took `seconds`."""
        if seconds <= 0 or amount <= 0 or (name == "prefill" and amount < _MIN_PREFILL_TOKENS):
            return
        rate = amount / seconds
        with self._lock:
            old = self._rates.get(name)
            self._rates[name] = rate if old is None else (1 - _SMOOTHING) * old + _SMOOTHING * rate

    def set_latency(self, tier: str, seconds: float) -> None:
        with self._lock:
            self._latency[tier] = seconds

    def rate(self, name: str) -> float:
        with self._lock:
            known = self._rates.get(name)
        if known is not None:
            return known
        amount, seconds = self.probes[name]()
        self.observe(name, amount, seconds)
        with self._lock:
            return self._rates.setdefault(name, amount / max(seconds, 1e-9))

    def choose(self, tier: str, nbytes: int, tokens: int) -> Choice:
        restore_s = self._latency.get(tier, 0.0) + nbytes / self.rate(tier)
        recompute_s = tokens / self.rate("prefill")
        return Choice("restore" if restore_s <= recompute_s else "recompute", restore_s, recompute_s)

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self._rates)
