"""The multi-session, multi-turn workload of `chatrt bench`, run in several reuse modes, and its report.

Every mode replays the same conversations; with greedy decoding they produce the same replies, so their
prompts and times compare turn by turn within one run.
"""

from __future__ import annotations

import contextlib
import random
import statistics
import time
from collections.abc import Callable, Iterable

import torch
from pydantic import BaseModel

from chatrt.bench.workload import FILL, MODES, POLICY, QUESTIONS, Mode, Workload, machine_load
from chatrt.cache.cost import Action
from chatrt.config import Config
from chatrt.model import LoadedModel
from chatrt.redis_server import redis_server
from chatrt.runtime import ChatRuntime
from chatrt.stats import TierCounters, TokenCounts, TurnStats

REPORT_VERSION = 2


class ModeResult(TokenCounts):
    mode: Mode
    turns: list[TurnStats]
    wall_s: float
    ttft_median_s: float
    ttft_p95_s: float
    last_turn_ttft_s: float
    """Median TTFT over the sessions' last turns (the longest histories)."""
    decode_tokens_per_s: float
    """Median over turns."""
    longest_turn_decode_tokens_per_s: float
    """On the turn with the longest prompt: compare with `Report.reference_decode_tokens_per_s`."""
    ttft_by_turn_s: list[float]
    """Median TTFT over the sessions at each turn number (the plot's line)."""
    repeats: int = 1
    """Runs of the mode whose median these figures are."""
    peak_tier_bytes: dict[str, int]
    """The most each tier held after any turn."""
    tier_counters: TierCounters
    """Promotions, demotions, restores, recomputes and drops over the run."""


class RestoreResult(BaseModel):
    """One session's cache brought back from Redis, against recomputing it, measured in one run."""

    history_tokens: int
    stored_bytes: int
    restore_s: float
    """Measured: Redis → device for the session's next turn (read, checksum, load, move)."""
    recompute_s: float
    """Measured: a prefill of the same tokens from nothing."""
    estimated_restore_s: float
    estimated_recompute_s: float
    chosen: Action
    """What the cost model picked for that turn."""
    chose_faster: bool
    turn_ttft_s: float


class Report(BaseModel):
    version: int = REPORT_VERSION
    model: str
    dtype: str
    device: str
    workload: Workload
    results: list[ModeResult]
    replies_identical: bool
    """Every mode produced the same replies (greedy decoding: reuse must not change a token)."""
    last_turn_prompt_tokens: int
    reference_decode_tokens_per_s: float
    """Plain transformers `generate` (greedy) on the longest prompt, decode steps only."""
    restore: RestoreResult | None = None
    load_avg_1m: float = 0.0
    """The machine's load when the run began (above its core count: the figures are suspect)."""
    cores: int = 0

    def result(self, mode: str) -> ModeResult:
        return next(r for r in self.results if r.mode == mode)

    def speedup(self, mode: str, baseline: str = "recompute") -> float:
        """Last-turn TTFT of `baseline` over that of `mode` (the longest histories, measured in this run)."""
        return self.result(baseline).last_turn_ttft_s / self.result(mode).last_turn_ttft_s


def conversations(w: Workload) -> tuple[str | None, list[list[str]]]:
    """The shared system prompt and each session's user messages, from the seed."""
    rng = random.Random(w.seed)
    system = None
    if w.system_words:
        sentences = ["You are the support assistant of a parcel delivery company. Follow these policies."]
        while sum(len(x.split()) for x in sentences) < w.system_words:
            fill = {k: rng.choice(v) for k, v in FILL.items()} | {"n": rng.randint(2, 9), "m": rng.randint(10, 90)}
            sentences.append(rng.choice(POLICY).format(**fill))
        system = " ".join(sentences)
    users = [[_question(rng, w.user_words) for _ in range(w.turns)] for _ in range(w.sessions)]
    return system, users


def _question(rng: random.Random, words: int) -> str:
    """A real question, lengthened with context up to about `words` words."""
    text = rng.choice(QUESTIONS)
    extra = (
        "My order number is",
        str(rng.randint(10000, 99999)),
        "and I live in",
        rng.choice(("Lyon", "Porto", "Graz")),
    )
    return text if len(text.split()) >= words else f"{text} {' '.join(extra)}."


def run(
    lm: LoadedModel, config: Config, w: Workload, progress: Callable[[str, int, int], None] = lambda *_: None
) -> Report:
    """Every mode of the workload, one after another; `pressure-redis` uses the configured Redis, else a private
    redis-server started for the run."""
    load, cores = machine_load()  # before the run: during it, the run itself is the load
    with ChatRuntime(lm, config) as rt:  # compiled decode steps (shared by every mode's runtime) are ready first
        if rt.engine.compiled is not None:
            rt.engine.compiled.wait()
    with contextlib.ExitStack() as stack:
        redis_url = config.tiers.redis_url
        if "pressure-redis" in w.modes and not redis_url:
            redis_url = stack.enter_context(redis_server())
        system, users = conversations(w)
        results, replies = [], {}
        for mode in w.modes:
            tiers = (
                w.pressure_tiers(redis_url if mode == "pressure-redis" else "") if mode.startswith("pressure") else {}
            )
            mode_config = config.with_values(
                **MODES[mode],
                generation={"max_new_tokens": w.max_new_tokens, "temperature": 0.0},
                tiers={"redis_url": "", **tiers},  # only pressure-redis writes to Redis
            )
            runs = [_run_mode(lm, mode_config, w, mode, system, users, progress) for _ in range(w.repeats)]
            _, replies[mode], longest = runs[0]
            results.append(_median(r for r, _, _ in runs))
    first = next(iter(replies.values()))
    return Report(
        load_avg_1m=load,
        cores=cores,
        model=lm.info.name,
        dtype=lm.info.dtype,
        device=lm.info.device,
        workload=w,
        results=results,
        replies_identical=all(r == first for r in replies.values()),
        last_turn_prompt_tokens=len(longest),
        reference_decode_tokens_per_s=reference_decode(lm, longest, w.max_new_tokens),
    )


def _median(results: Iterable[ModeResult]) -> ModeResult:
    """The first run's result with every timing replaced by its median over the runs (token counts and the
    turns listed are the first run's; greedy replies make the runs' tokens identical)."""
    runs = list(results)
    timings = {
        name: statistics.median(getattr(r, name) for r in runs)
        for name, field in ModeResult.model_fields.items()
        if field.annotation in (float, "float")
    }
    by_turn = [statistics.median(ts) for ts in zip(*(r.ttft_by_turn_s for r in runs), strict=True)]
    return runs[0].model_copy(update={**timings, "ttft_by_turn_s": by_turn, "repeats": len(runs)})


def _run_mode(
    lm: LoadedModel,
    config: Config,
    w: Workload,
    mode: Mode,
    system: str | None,
    users: list[list[str]],
    progress: Callable[[str, int, int], None],
) -> tuple[ModeResult, list[tuple[int, ...]], list[int]]:
    """Returns the mode's result, every reply's ids (by session, then turn), and the longest last prompt."""
    by_turn: list[list[float]] = [[] for _ in range(w.turns)]
    turns: list[TurnStats] = []
    replies: dict[tuple[int, int], tuple[int, ...]] = {}
    peaks: dict[str, int] = {}
    order = [(s, t) for t in range(w.turns) for s in range(w.sessions)]
    if not w.interleave:
        order.sort()
    warm_up(lm)
    with ChatRuntime(lm, config) as rt:
        sessions = [rt.open_session(system_prompt=system) for _ in range(w.sessions)]
        t0 = time.perf_counter()
        for s, t in order:
            reply = sessions[s].send(users[s][t])
            turns.append(reply.stats)
            replies[s, t] = reply.token_ids
            by_turn[t].append(reply.stats.ttft_s)
            for tier, usage in rt.stats().tiers.items():
                peaks[tier] = max(peaks.get(tier, 0), usage.bytes)
            progress(mode, len(turns), len(order))
        wall = time.perf_counter() - t0
        totals = rt.stats()
        longest = max((rt.template.render(s.transcript[:-1]) for s in sessions), key=len)
    ttfts = sorted(s.ttft_s for s in turns)
    decode = [s.decode_tokens_per_s for s in turns if s.decode_tokens_per_s > 0]
    return (
        ModeResult(
            mode=mode,
            turns=turns,
            wall_s=wall,
            **totals.model_dump(include=set(TokenCounts.model_fields)),
            ttft_median_s=statistics.median(ttfts),
            ttft_p95_s=ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))],
            last_turn_ttft_s=statistics.median(by_turn[-1]),
            decode_tokens_per_s=statistics.median(decode) if decode else 0.0,
            longest_turn_decode_tokens_per_s=max(turns, key=lambda t: t.prompt_tokens).decode_tokens_per_s,
            ttft_by_turn_s=[statistics.median(x) for x in by_turn],
            peak_tier_bytes=peaks,
            tier_counters=totals.tier_counters,
        ),
        [replies[key] for key in sorted(replies)],
        longest,
    )


def restore_vs_recompute(lm: LoadedModel, config: Config, tokens: int) -> RestoreResult:
    """A session with a `tokens`-long history is pushed to Redis (the configured one, else a private
    redis-server), then used again; the restore is timed against a prefill of the same ids."""
    if config.tiers.redis_url:
        return _restore_vs_recompute(lm, config, tokens)
    with redis_server() as url:
        return _restore_vs_recompute(lm, config.with_values(tiers={"redis_url": url}), tokens)


def _restore_vs_recompute(lm: LoadedModel, config: Config, tokens: int) -> RestoreResult:
    config = config.with_values(tiers={"device_sessions": 1, "host_bytes": 0}, generation={"temperature": 0.0})
    warm_up(lm)
    with ChatRuntime(lm, config) as rt:
        rng = random.Random(0)
        history = rt.open_session()
        text = ""
        while len(rt.template.encode_text(text)) < tokens - 48:  # the template's markup and the reply make the rest
            text += rng.choice(QUESTIONS) + " "
        history.send(text, max_new_tokens=8)
        rt.open_session().send("Hello.", max_new_tokens=1)  # device fits one session: the history goes to Redis
        meta = rt.tiers.kv_meta(history.id)
        assert meta is not None, "the history should be in Redis now"
        t0 = time.perf_counter()
        rt.engine.compute_kv(meta.ids)  # what a recompute costs: the engine prefills it
        recompute_s = time.perf_counter() - t0
        estimate = rt.tiers.cost.choose("redis", meta.nbytes, len(meta.ids))
        turn = history.send("Thanks, that is all.", max_new_tokens=8).stats
        restored = turn.kv_source == "redis" and turn.reused_session_tokens > 0
        restore_s = turn.restore_s if restored else float("nan")
        chosen: Action = "restore" if restored else "recompute"
        return RestoreResult(
            history_tokens=len(meta.ids),
            stored_bytes=meta.nbytes,
            restore_s=restore_s,
            recompute_s=recompute_s,
            estimated_restore_s=estimate.restore_s,
            estimated_recompute_s=estimate.recompute_s,
            chosen=chosen,
            chose_faster=(chosen == "restore") == (restore_s < recompute_s) if restored else estimate.action == chosen,
            turn_ttft_s=turn.ttft_s,
        )


def warm_up(lm: LoadedModel) -> None:
    """One short forward, so the first timed turn of a mode does not pay for lazy initialisation."""
    with torch.inference_mode():
        lm.model(input_ids=torch.tensor([[1, 2, 3]], device=lm.device))


def reference_decode(lm: LoadedModel, prompt: list[int], n: int) -> float:
    """Decode tokens/s of plain greedy `generate` on `prompt`: n / (time(1 + n new tokens) - time(1))."""
    x = torch.tensor([prompt], device=lm.device)  # [1, S]

    def timed(new: int) -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            lm.model.generate(
                x,
                attention_mask=torch.ones_like(x),
                do_sample=False,
                max_new_tokens=new,
                min_new_tokens=new,
                pad_token_id=lm.tokenizer.pad_token_id,
            )
        return time.perf_counter() - t0

    timed(1)
    return n / max(timed(n + 1) - timed(1), 1e-9)
