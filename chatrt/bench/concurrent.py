"""`chatrt bench --concurrent`: N sessions with ~1,000 tokens of history each answer at once, for several N, and
what a new turn costs while others decode. Every figure is a ratio within one run, on one machine.
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time

from pydantic import BaseModel

from chatrt.bench import reuse as bench
from chatrt.config import Config
from chatrt.model import LoadedModel
from chatrt.runtime import ChatRuntime
from chatrt.session import Session
from chatrt.template import Message

REPORT_VERSION = 1
BUSY = 8  # sessions decoding while a new turn and a long prompt arrive


class ConcurrentResult(BaseModel):
    sessions: int
    generated_tokens: int
    wall_s: float
    aggregate_tokens_per_s: float
    """Reply tokens of all sessions over the wall time of the turn (prefill of the new messages included)."""
    gain: float
    """Aggregate tokens/s over that of one session alone, in the same run."""
    decode_tokens_per_s: float
    """The sessions' own decode rates added up: the aggregate decode throughput while they decode together."""
    decode_gain: float
    """That over one session's decode rate, in the same run."""
    ttft_s: list[float]
    tokens_per_s: list[float]
    """Each session's own decode rate."""
    mean_batch: float
    """Rows per engine step over the turn."""


class UnderLoad(BaseModel):
    """A new turn while `busy` sessions decode."""

    busy: int
    idle_ttft_s: float
    """The ninth session's TTFT on an idle runtime."""
    loaded_ttft_s: float
    """The same turn's TTFT while the others decode."""
    long_prompt_tokens: int
    longest_gap_s: float
    """Longest pause between two pieces of any decoding stream while the long prompt was prefilled."""
    step_s: float
    """Median time between pieces of those streams before the long prompt came."""


class ConcurrentReport(BaseModel):
    version: int = REPORT_VERSION
    model: str
    dtype: str
    device: str
    history_tokens: int
    max_new_tokens: int
    prefill_chunk: int
    results: list[ConcurrentResult]
    under_load: UnderLoad | None = None
    compiled: str = ""
    """How decode steps ran: the compiled buckets (and their compile seconds), or why they were not compiled."""
    reference_decode_tokens_per_s: float = 0.0
    """Plain transformers' eager greedy decode on the one-session prompt: the 1-session row's decode rate is
    measured against it in the same run."""


def run(
    lm: LoadedModel, config: Config, sizes: list[int], *, max_new_tokens: int = 64, history_words: int = 700
) -> ConcurrentReport:
    """For each N in `sizes`: N sessions share a ~1,000-token system prompt (their history, computed once for
    all and copied into each session's cache by its first turn), answer a first question, then all answer a
    second one at once; that second turn is measured."""
    workload = bench.Workload(sessions=max(*sizes, BUSY) + 1, turns=2, system_words=history_words)
    system, users = bench.conversations(workload)
    config = config.with_values(generation={"max_new_tokens": max_new_tokens, "temperature": 0.0})
    results: list[ConcurrentResult] = []  # each size's unmeasured first turn warms the engine up
    with ChatRuntime(lm, config) as rt:
        history = len(rt.template.prefix_ids(system))
        compiled = rt.engine.compiled
        if compiled is not None:  # measured once every bucket is compiled (in the background, up to minutes)
            compiled.wait()
        how = compiled.describe() if compiled is not None else f"eager: {rt.engine.not_compiled}"
        reference_prompt = rt.template.render([Message(role="system", content=system),
                                               Message(role="user", content=users[0][1])])  # fmt: skip
        for n in sizes:
            sessions = [rt.open_session(system_prompt=system) for _ in range(n)]
            _at_once(sessions, [u[0] for u in users[:n]])  # the history turn, not measured
            steps, rows = rt.engine.steps, rt.engine.rows
            t0 = time.perf_counter()
            replies = _at_once(sessions, [u[1] for u in users[:n]])
            wall = time.perf_counter() - t0
            generated = sum(r.stats.generated_tokens for r in replies)
            aggregate = generated / wall
            decode = sum(r.stats.decode_tokens_per_s for r in replies)
            base, decode_base = (
                (results[0].aggregate_tokens_per_s, results[0].decode_tokens_per_s) if results else (aggregate, decode)
            )
            results.append(ConcurrentResult(
                sessions=n, generated_tokens=generated, wall_s=wall, aggregate_tokens_per_s=aggregate,
                gain=aggregate / base, decode_tokens_per_s=decode, decode_gain=decode / decode_base,
                ttft_s=[r.stats.ttft_s for r in replies],
                tokens_per_s=[r.stats.decode_tokens_per_s for r in replies],
                mean_batch=(rt.engine.rows - rows) / max(1, rt.engine.steps - steps),
            ))  # fmt: skip
            for s in sessions:
                s.close()
        under = _under_load(rt, system, users)
    return ConcurrentReport(
        model=lm.info.name, dtype=lm.info.dtype, device=lm.info.device, history_tokens=history,
        max_new_tokens=max_new_tokens, prefill_chunk=config.engine.prefill_chunk, results=results,
        under_load=under, compiled=how,
        reference_decode_tokens_per_s=bench.reference_decode(lm, reference_prompt, max_new_tokens),
    )  # fmt: skip


def _at_once(sessions: list[Session], messages: list[str]) -> list:  # type: ignore[type-arg]
    """Every session sends its message on its own thread at the same moment; their replies in order."""
    assert len(messages) == len(sessions)
    replies: list = [None] * len(sessions)  # type: ignore[type-arg]
    errors: list[BaseException] = []
    start = threading.Barrier(len(sessions))

    def send(i: int) -> None:
        start.wait()
        try:
            replies[i] = sessions[i].send(messages[i])
        except BaseException as e:  # raised below, on the caller's thread
            errors.append(e)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(sessions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return replies


def _under_load(rt: ChatRuntime, system: str | None, users: list[list[str]], busy: int = BUSY) -> UnderLoad:
    """A ninth session's 30-token-ish turn after ~1,000 tokens of history: its TTFT on an idle runtime and
    while eight others decode; then a ~2,000-token prompt arrives while they decode: the longest gap between
    two pieces of their streams."""
    ninth = rt.open_session(system_prompt=system)
    ninth.send(users[-1][0])
    probe = "Can you tell me again, in one short sentence, when the parcel will arrive at my address?"
    idle = ninth.send(probe).stats.ttft_s
    others = [rt.open_session(system_prompt=system) for _ in range(busy)]
    _at_once(others, [u[0] for u in users[:busy]])
    long_text = " ".join([users[0][1]] * 180)  # about 2,000 tokens
    gaps: list[list[tuple[float, float]]] = [[] for _ in others]  # per stream: (gap before a piece, its time)
    long_at: list[float] = []

    decoding = threading.Barrier(busy + 1)
    done = threading.Event()  # the long prompt is in and a second has passed: the streams stop

    def stream(i: int) -> None:
        last = time.perf_counter()
        with others[i].stream("Please explain every policy in detail, one by one.", max_new_tokens=1000) as turn:
            for n, _ in enumerate(turn):
                now = time.perf_counter()
                gaps[i].append((now - last, now))
                last = now
                if n == 2:
                    decoding.wait()
                if done.is_set():
                    break
        if len(gaps[i]) < 3:  # ended before its third piece: the others need not wait for it
            decoding.abort()

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(busy)]
    for t in threads:
        t.start()
    with contextlib.suppress(threading.BrokenBarrierError):
        decoding.wait(timeout=60)  # every stream is decoding
    loaded = ninth.send(probe).stats.ttft_s
    long_session = rt.open_session()
    long_at.append(time.perf_counter())
    prompt_tokens = long_session.send(long_text, max_new_tokens=1).stats.prompt_tokens
    long_at.append(time.perf_counter())
    time.sleep(1.0)
    done.set()
    for t in threads:
        t.join()
    before = [g for per in gaps for g, at in per if at < long_at[0]]
    during = [g for per in gaps for g, at in per if long_at[0] <= at <= long_at[1] + 1.0]
    return UnderLoad(
        busy=busy, idle_ttft_s=idle, loaded_ttft_s=loaded, long_prompt_tokens=prompt_tokens,
        longest_gap_s=max(during, default=0.0), step_s=statistics.median(before) if before else 0.0,
    )  # fmt: skip
