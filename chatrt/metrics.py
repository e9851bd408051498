"""Prometheus metrics of one runtime: tokens by source, latency histograms, the engine's queue, tiers and cache
moves, build info and the process; served at /metrics (and /healthz) on their own port.

Counters and gauges are read from `RuntimeStats` at scrape time, so they can never disagree with `rt.stats()`;
only the histograms observe each turn as it ends. Names follow Prometheus practice (base units, `_total` on
counters) and vLLM's where they mean the same (prefix-cache queries and hits, in tokens).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from importlib.metadata import PackageNotFoundError, version
from typing import Any
from wsgiref.simple_server import WSGIServer, make_server

from prometheus_client import CollectorRegistry, Histogram, ProcessCollector, generate_latest, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from chatrt.errors import ConfigError
from chatrt.stats import RuntimeStats, TierCounters, TierUsage, TurnStats

PREFIX = "chatrt"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
TURN_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
# The TierCounters fields that count moves (restore_s is exported as seconds), with their docstrings as help.
MOVES = {name: f.description or name for name, f in TierCounters.model_fields.items() if f.annotation is int}


class Metrics:
    """One registry per runtime (two runtimes in a process never mix their numbers)."""

    def __init__(self, stats: Callable[[], RuntimeStats], build: dict[str, str] | None = None) -> None:
        """`build`: labels of chatrt_build_info (model, dtype, device); the version is chatrt's own."""
        self.registry = CollectorRegistry()
        self.ttft = Histogram(
            f"{PREFIX}_ttft_seconds", "Time to first token, lookups and restores included", buckets=TTFT_BUCKETS,
            registry=self.registry,
        )  # fmt: skip
        self.itl = Histogram(
            f"{PREFIX}_inter_token_latency_seconds", "Time between two tokens of a reply (each token of a turn "
            "observed at the turn's mean)", buckets=ITL_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.turn = Histogram(
            f"{PREFIX}_turn_duration_seconds", "A turn from the call to its last token", buckets=TURN_BUCKETS,
            registry=self.registry,
        )  # fmt: skip
        self.registry.register(_StatsCollector(stats, {"version": chatrt_version(), **(build or {})}))
        ProcessCollector(registry=self.registry)  # process_cpu_seconds_total, process_resident_memory_bytes, ...
        self.port: int | None = None
        self._server: WSGIServer | None = None

    def observe(self, turn: TurnStats) -> None:
        self.ttft.observe(turn.ttft_s)
        if turn.e2e_s > 0:
            self.turn.observe(turn.e2e_s)
        steps = turn.generated_tokens - 1  # tokens after the first, each one decode step
        if steps > 0 and turn.decode_s > 0:
            gap = turn.decode_s / steps
            for _ in range(steps):
                self.itl.observe(gap)

    def exposition(self) -> bytes:
        """The metrics in Prometheus' text format, as the endpoint serves them."""
        return generate_latest(self.registry)

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics and /healthz (nothing else) on daemon threads; returns the port (useful with port 0)."""
        metrics_app = make_wsgi_app(self.registry)

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            path = environ.get("PATH_INFO", "")
            if path == "/metrics":
                return metrics_app(environ, start_response)  # type: ignore[no-any-return]
            if path == "/healthz":
                start_response("200 OK", [("Content-Type", "text/plain")])
                return [b"ok\n"]
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found: this port serves /metrics and /healthz\n"]

        try:
            self._server = make_server(host, port, app, ThreadingWSGIServer, handler_class=_SilentHandler)
        except OSError as e:
            problem = f"metrics: cannot listen on {host}:{port} ({e})"
            raise ConfigError(f"{problem}; change [metrics] port or disable it") from None
        threading.Thread(target=self._server.serve_forever, name="chatrt-metrics", daemon=True).start()
        self.port = self._server.server_port
        return self.port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def chatrt_version() -> str:
    try:
        return version("chatrt")
    except PackageNotFoundError:  # run from a source tree that was not installed
        return "unknown"


class _StatsCollector(Collector):
    def __init__(self, stats: Callable[[], RuntimeStats], build: dict[str, str]) -> None:
        self.stats, self.build = stats, build

    def collect(self) -> Iterator[Metric]:
        s = self.stats()
        info = InfoMetricFamily(f"{PREFIX}_build", "chatrt's version and the model it serves")
        info.add_metric([], self.build)
        yield info
        yield _counter("turns", "Turns answered", s.turns)
        yield _counter("prompt_tokens", "Prompt tokens of all turns (reused + prefilled)", s.prompt_tokens)
        yield _counter("prefix_cache_queries", "Prompt tokens looked up in the caches (vLLM's prefix_cache_queries; "
                       "hit ratio: rate(hits) / rate(queries))", s.prompt_tokens)  # fmt: skip
        yield _counter("prefix_cache_hits", "Prompt tokens found cached, session or shared prefix (vLLM's "
                       "prefix_cache_hits)", s.reused_tokens)  # fmt: skip
        yield GaugeMetricFamily(f"{PREFIX}_requests_running", "Turns in the engine's batch", value=s.requests_running)
        yield GaugeMetricFamily(f"{PREFIX}_requests_waiting", "Turns queued for the engine", value=s.requests_waiting)
        yield _counter("preemptions", "Running turns parked on the host because the batch outgrew the device "
                       "budget (vLLM's num_preemptions)", s.preemptions)  # fmt: skip
        reused = CounterMetricFamily(f"{PREFIX}_reused_tokens", "Prompt tokens served from a cache", labels=["source"])
        reused.add_metric(["session"], s.reused_session_tokens)
        reused.add_metric(["prefix"], s.reused_prefix_tokens)
        yield reused
        yield _counter("prefilled_tokens", "Prompt tokens computed", s.prefilled_tokens)
        yield _counter("generated_tokens", "Tokens generated", s.generated_tokens)
        yield GaugeMetricFamily(f"{PREFIX}_hit_rate", "Reused / prompt tokens since the process started (for a "
                                "window, use the prefix_cache counters)", value=s.hit_rate)  # fmt: skip
        yield GaugeMetricFamily(f"{PREFIX}_sessions_open", "Open sessions", value=s.sessions_open)
        yield _counter("sessions_closed", "Sessions closed", s.sessions_closed)
        yield GaugeMetricFamily(f"{PREFIX}_kv_bytes", "Bytes of session caches in memory", value=s.kv_bytes)
        yield GaugeMetricFamily(f"{PREFIX}_prefix_entries", "Shared prefixes held", value=s.prefix_entries)
        yield GaugeMetricFamily(f"{PREFIX}_prefix_bytes", "Bytes of shared prefixes", value=s.prefix_bytes)
        yield _counter("prefix_hits", "Sessions that found their prefix computed", s.prefix_hits)
        yield _counter("prefix_misses", "Prefixes computed", s.prefix_misses)
        yield _counter("prefix_evictions", "Prefixes evicted", s.prefix_evictions)
        tiers = {
            "bytes": GaugeMetricFamily(f"{PREFIX}_tier_bytes", "Cache bytes per tier", labels=["tier"]),
            "sessions": GaugeMetricFamily(f"{PREFIX}_tier_sessions", "Session caches per tier", labels=["tier"]),
            "budget_bytes": GaugeMetricFamily(f"{PREFIX}_tier_budget_bytes", "Byte budget per tier", labels=["tier"]),
        }
        for tier, usage in s.tiers.items():
            for field, family in tiers.items():
                family.add_metric([tier], getattr(usage, field))
        yield from tiers.values()
        counters: TierCounters = s.tier_counters
        for field, help in MOVES.items():
            yield _counter(field, help, getattr(counters, field))
        yield _counter("restore_seconds", TierCounters.model_fields["restore_s"].description or "", counters.restore_s)
        if s.redis != "off":
            yield GaugeMetricFamily(f"{PREFIX}_redis_up", "1 while Redis answers, 0 since a call failed",
                                    value=int(s.redis == "ok"))  # fmt: skip


def _counter(name: str, help: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(f"{PREFIX}_{name}", help, value=value)


def quantiles(text: str, histogram: str, qs: Iterable[float]) -> dict[float, float]:
    """Quantiles of a histogram in a scrape, estimated as Prometheus' histogram_quantile does (linear within the
    bucket the rank falls in). Empty when it has no observations."""
    buckets = sorted(
        (float(s.labels["le"]), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == f"{histogram}_bucket"
    )
    if not buckets or buckets[-1][1] == 0:
        return {}
    total = buckets[-1][1]
    out = {}
    for q in qs:
        rank, lower, below = q * total, 0.0, 0.0
        for upper, count in buckets:
            if count >= rank:
                if upper == float("inf"):  # beyond the last finite bound: that bound is the best estimate
                    out[q] = lower
                else:
                    out[q] = lower + (upper - lower) * (rank - below) / max(count - below, 1e-12)
                break
            lower, below = upper, count
    return out


def parse(text: str) -> RuntimeStats:
    """RuntimeStats back from a scrape of the endpoint (what `chatrt stats --metrics-url` prints)."""
    samples = {
        (s.name.removeprefix(f"{PREFIX}_"), tuple(s.labels.values())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }

    def get(name: str, *labels: str) -> int:
        return int(samples.get((name, labels), 0))

    tiers = sorted({labels[0] for name, labels in samples if name == "tier_bytes"})
    up = samples.get(("redis_up", ()))
    return RuntimeStats(
        redis="off" if up is None else "ok" if up else "down",
        requests_running=get("requests_running"),
        requests_waiting=get("requests_waiting"),
        preemptions=get("preemptions_total"),
        turns=get("turns_total"),
        prompt_tokens=get("prompt_tokens_total"),
        reused_session_tokens=get("reused_tokens_total", "session"),
        reused_prefix_tokens=get("reused_tokens_total", "prefix"),
        prefilled_tokens=get("prefilled_tokens_total"),
        generated_tokens=get("generated_tokens_total"),
        sessions_open=get("sessions_open"),
        sessions_closed=get("sessions_closed_total"),
        kv_bytes=get("kv_bytes"),
        prefix_entries=get("prefix_entries"),
        prefix_bytes=get("prefix_bytes"),
        prefix_hits=get("prefix_hits_total"),
        prefix_misses=get("prefix_misses_total"),
        prefix_evictions=get("prefix_evictions_total"),
        tiers={
            t: TierUsage(
                sessions=get("tier_sessions", t), bytes=get("tier_bytes", t), budget_bytes=get("tier_budget_bytes", t)
            )
            for t in tiers
        },
        tier_counters=TierCounters(
            **{field: get(f"{field}_total") for field in MOVES},
            restore_s=samples.get(("restore_seconds_total", ()), 0.0),
        ),
    )
