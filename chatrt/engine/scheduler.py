"""Which requests run in the next step, and with how many tokens each: model-free, so it is tested alone.

Every running request that is decoding gets a row of one token; requests still prefilling share a budget of
`prefill_chunk` tokens per step, oldest first, so a long prompt is prefilled in chunks between the decode
steps of the others instead of freezing their streams. Waiting requests are admitted, oldest first, while
fewer than `max_batch` run and their KV fits the device's `max_tokens` beside the running ones. When the
running requests outgrow it (each decode step adds a token to every row), the newest is preempted: it goes
back to the head of the queue, its cache parked on the host, and resumes where it stopped once there is room.
"""

from __future__ import annotations

from collections import deque
from typing import Generic, Protocol, TypeVar


class Schedulable(Protocol):
    @property
    def to_prefill(self) -> int:
        """Prompt tokens still to run through the model (0: decoding)."""

    @property
    def cancelled(self) -> bool: ...

    @property
    def tokens(self) -> int:
        """Tokens its own KV holds once its prompt is in (prompt and the reply so far, less what it references of
        shared segments, which are kept once for all)."""


R = TypeVar("R", bound=Schedulable)


class Scheduler(Generic[R]):
    def __init__(self, max_batch: int, prefill_chunk: int, max_tokens: int = 0) -> None:
        assert max_batch >= 1 and prefill_chunk >= 0 and max_tokens >= 0
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk  # 0: a prompt is prefilled whole, in one step
        self.max_tokens = max_tokens  # KV tokens the running requests may hold on the device; 0: no limit
        self.waiting: deque[R] = deque()
        self.running: list[R] = []

    def add(self, request: R) -> None:
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[tuple[R, int]], list[R], list[R]]:
        """The rows of the next step as (request, tokens to feed); the requests cancelled since the last step,
        which leave the scheduler (the caller ends them); and those preempted by this step (the caller parks
        their caches off the device). A lone request always runs, whatever its size."""
        cancelled = [r for r in (*self.running, *self.waiting) if r.cancelled]
        if cancelled:
            self.running = [r for r in self.running if not r.cancelled]
            self.waiting = deque(r for r in self.waiting if not r.cancelled)
        while self.waiting and len(self.running) < self.max_batch and self._fits([*self.running, self.waiting[0]]):
            self.running.append(self.waiting.popleft())
        preempted = []
        while len(self.running) > 1 and not self._fits(self.running):
            request = self.running.pop()  # the newest: the one that waited least
            self.waiting.appendleft(request)
            preempted.append(request)
        rows = [(r, 1) for r in self.running if not r.to_prefill]
        budget = self.prefill_chunk or sum(r.to_prefill for r in self.running)
        for r in self.running:
            if r.to_prefill and budget > 0:
                n = min(r.to_prefill, budget)
                rows.append((r, n))
                budget -= n
        return rows, cancelled, preempted

    def _fits(self, requests: list[R]) -> bool:
        """Whether these requests' KV fits after the next step (a decoding row grows by one token)."""
        if not self.max_tokens or len(requests) <= 1:
            return True
        return sum(r.tokens + (0 if r.to_prefill else 1) for r in requests) <= self.max_tokens

    def finish(self, request: R) -> None:
        """The request ended (its reply is complete, or it failed): it leaves the batch."""
        self.running.remove(request)
