"""`chatrt bench --shared N`: N rows decoding together on one shared prompt, the prompt's KV copied into every
row (as sessions held it before they shared by reference) and referenced by every row, in one run: the decode
step's time and the part of it spent in attention, and the KV the rows hold."""

from __future__ import annotations

import statistics
import time

import torch
from pydantic import BaseModel

from chatrt.bench.timers import spent_in
from chatrt.cache.kv import KV, storage_bytes
from chatrt.config import Config
from chatrt.engine import runner, segments
from chatrt.engine.compiled import CompiledSteps, compilable
from chatrt.engine.packed import use_packed_attention
from chatrt.model import LoadedModel, cache_root

REPORT_VERSION = 1


class StepProfile(BaseModel):
    how: str
    """'copied': each row holds its own copy of the prompt's KV; 'shared': every row references one."""
    step_ms: float
    """Median wall time of one decode step of all the rows."""
    attention_ms: float
    """Median time of that step spent in attention (every layer)."""
    kv_bytes: int
    """Distinct bytes of KV the rows hold."""


class SharedReport(BaseModel):
    version: int = REPORT_VERSION
    model: str
    dtype: str
    device: str
    decode_step: str
    """How the steps ran: 'compiled' or 'eager' (and why)."""
    rows: int
    shared_tokens: int
    own_tokens: int
    steps: int
    copied: StepProfile
    shared: StepProfile
    attention_saved: float
    """1 - shared attention time / copied attention time."""
    reads_saved: float
    """1 - the KV tokens a step reads when the prompt is shared / when each row has its copy."""


def run(lm: LoadedModel, config: Config, *, rows: int = 16, shared_tokens: int = 400, own_tokens: int = 24,
        steps: int = 48) -> SharedReport:  # fmt: skip
    """Prefill a `shared_tokens` prompt once; give each of `rows` rows `own_tokens` of its own after it, copied
    and shared; then time `steps` decode steps of all rows together, each way (alternating, after a warm-up)."""
    use_packed_attention(lm)
    compiled, how = None, f"eager: {compilable(lm, config.engine.compile)}"
    if not compilable(lm, config.engine.compile):
        folder = cache_root(config.model) / "compiled"
        compiled = CompiledSteps.for_model(lm, max(rows, config.engine.max_batch), folder, runner.forward)
        compiled.wait()
        how = "compiled" if compiled.ready else f"eager: {compiled.error}"
    g = torch.Generator().manual_seed(0)
    vocab = lm.info.vocab_size
    prompt = torch.randint(200, vocab, (shared_tokens,), generator=g).tolist()
    prefix = KV.from_cache(_prefilled(lm, prompt, compiled), tuple(prompt)).compact(spare=0)
    owns = [torch.randint(200, vocab, (own_tokens,), generator=g).tolist() for _ in range(rows)]
    starts = {"copied": prefix, "shared": prefix.referencing()}
    caches = {}
    for name, start in starts.items():  # each row's cache: the prompt (its copy, or the shared one), its own tokens
        caches[name] = [start.as_cache() if name == "shared" else _copy(start).as_cache() for _ in range(rows)]
        for cache, own in zip(caches[name], owns, strict=True):
            runner.run(lm, [(cache, own)], compiled)
    timings: dict[str, list[tuple[float, float]]] = {name: [] for name in starts}
    for n in range(steps + 4):  # alternating, so that both meet the same machine
        for name in starts:
            with spent_in(segments, "attend") as spent:
                t0 = time.perf_counter()
                runner.run(lm, [(cache, [198]) for cache in caches[name]], compiled)
                step = time.perf_counter() - t0
            if n >= 4:  # warm-up steps are not counted
                timings[name].append((step, sum(spent)))
    profiles = {name: StepProfile(
        how=name, step_ms=statistics.median(s for s, _ in timings[name]) * 1000,
        attention_ms=statistics.median(a for _, a in timings[name]) * 1000,
        kv_bytes=storage_bytes(t for cache in caches[name] for layer in cache.layers
                               for t in (layer.keys, layer.values, *(t for kv in layer.shared for t in kv))),
    ) for name in starts}  # fmt: skip
    length = shared_tokens + own_tokens + steps
    return SharedReport(
        model=lm.info.name, dtype=lm.info.dtype, device=lm.info.device, decode_step=how, rows=rows,
        shared_tokens=shared_tokens, own_tokens=own_tokens, steps=steps,
        copied=profiles["copied"], shared=profiles["shared"],
        attention_saved=1 - profiles["shared"].attention_ms / profiles["copied"].attention_ms,
        reads_saved=1 - (shared_tokens + rows * (length - shared_tokens)) / (rows * length),
    )  # fmt: skip


def _prefilled(lm: LoadedModel, ids: list[int], compiled: CompiledSteps | None):  # type: ignore[no-untyped-def]
    from chatrt.cache.kv import new_cache

    cache = new_cache()
    runner.run(lm, [(cache, ids)], compiled)
    return cache


def _copy(kv: KV) -> KV:
    return KV(kv.ids, tuple(k.clone() for k in kv.keys), tuple(v.clone() for v in kv.values))
