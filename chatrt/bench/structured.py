"""`chatrt bench --structured N`: N sessions answer at once, free and then each under a JSON schema of its own,
alternating rounds in one run: decode tokens/s of each way, the time the grammar's masks take per token, and how
many constrained replies validate."""

from __future__ import annotations

import contextlib
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pydantic import BaseModel

from chatrt.bench.timers import spent_in
from chatrt.engine.grammar import Constraint
from chatrt.runtime import ChatRuntime

REPORT_VERSION = 1
NAME = {"type": "string", "maxLength": 40}
SCHEMAS: list[dict[str, Any]] = [
    {"type": "object", "properties": {"name": NAME, "country": NAME, "population": {"type": "integer",
     "minimum": 0, "maximum": 10**9}}, "required": ["name", "country", "population"]},
    {"type": "object", "properties": {"title": NAME, "ingredients": {"type": "array", "items": NAME, "maxItems": 6},
     "minutes": {"type": "integer", "minimum": 1, "maximum": 600}}, "required": ["title", "ingredients", "minutes"]},
    {"type": "object", "properties": {"sentiment": {"enum": ["positive", "negative", "neutral"]},
     "confidence": {"type": "number", "minimum": 0, "maximum": 1}}, "required": ["sentiment", "confidence"]},
    {"type": "object", "properties": {"name": NAME, "email": NAME}, "required": ["name", "email"]},
]  # fmt: skip
ASKS = [
    "Describe the city of {} as JSON.",
    "Give a short recipe from {} as JSON.",
    "Classify the sentiment of a review of {}.",
    "Make up contact details for someone from {} as JSON.",
]
PLACES = ["Paris", "Tokyo", "Cairo", "Lima", "Oslo", "Delhi", "Rome", "Quito", "Seoul", "Accra", "Lagos", "Kyiv"]


class Way(BaseModel):
    how: str
    """'free' or 'schema' (each row its own)."""
    tokens_per_s: float
    """Generated tokens of all rows / the wall time of the round, median over rounds (constrained replies are
    shorter, so prefill weighs more in theirs)."""
    session_tokens_per_s: float
    """Each reply's own decode rate (its TurnStats), median over replies: the step time its rows saw."""
    mask_ms_per_token: float
    """Time in the grammar (masks and following tokens) per generated token (0 when free)."""
    valid: int
    replies: int


class StructuredReport(BaseModel):
    version: int = REPORT_VERSION
    model: str
    dtype: str
    device: str
    rows: int
    rounds: int
    max_new_tokens: int
    free: Way
    constrained: Way


def run(rt: ChatRuntime, *, rows: int = 8, rounds: int = 3, max_new_tokens: int = 128) -> StructuredReport:
    """`rounds` times: `rows` sessions answer at once freely, then the same with a schema each."""
    jobs = [(ASKS[k % len(ASKS)].format(PLACES[k % len(PLACES)]), SCHEMAS[k % len(SCHEMAS)]) for k in range(rows)]
    seen: dict[str, list[tuple[float, float, int, int, int]]] = {"free": [], "schema": []}
    rates: dict[str, list[float]] = {"free": [], "schema": []}

    def answer(job: tuple[str, dict[str, Any] | None]) -> tuple[int, bool, float]:
        text, schema = job
        session = rt.open_session("You answer in JSON.")
        try:
            reply = session.send(text, max_new_tokens=max_new_tokens, json_schema=schema)
        finally:
            session.close()
        return reply.stats.generated_tokens, schema is not None and _valid(reply.text), reply.stats.decode_tokens_per_s

    with ThreadPoolExecutor(rows) as pool:
        list(pool.map(answer, [(t, None) for t, _ in jobs]))  # warm-up: the grammar's tokenizer table, the steps
        list(pool.map(answer, jobs))
        for _ in range(rounds):
            for how in ("free", "schema"):
                with spent_in(Constraint, "mask", "feed") as spent:
                    t0 = time.perf_counter()
                    done = list(pool.map(answer, [(t, s if how == "schema" else None) for t, s in jobs]))
                    wall = time.perf_counter() - t0
                tokens = sum(n for n, _, _ in done)
                seen[how].append((tokens / wall, sum(spent), tokens, sum(ok for _, ok, _ in done), len(done)))
                rates[how] += [rate for _, _, rate in done]
    ways = {how: Way(how=how, tokens_per_s=statistics.median(r[0] for r in runs),
                     session_tokens_per_s=statistics.median(rates[how]),
                     mask_ms_per_token=sum(r[1] for r in runs) * 1000 / max(1, sum(r[2] for r in runs)),
                     valid=sum(r[3] for r in runs), replies=sum(r[4] for r in runs))
            for how, runs in seen.items()}  # fmt: skip
    info = rt.lm.info
    return StructuredReport(model=info.name, dtype=info.dtype, device=info.device, rows=rows, rounds=rounds,
                            max_new_tokens=max_new_tokens, free=ways["free"], constrained=ways["schema"])  # fmt: skip


def _valid(text: str) -> bool:
    with contextlib.suppress(ValueError):
        return isinstance(json.loads(text), dict)
    return False
