"""Prometheus metrics: the endpoint a scraper reads says what `rt.stats()` says, per runtime."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client.parser import text_string_to_metric_families

from chatrt import ChatRuntime, Config, ConfigError, cli, metrics
from chatrt.board import Board
from chatrt.cli import main


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """Every sample on the endpoint: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.fixture
def served(tiny_lm):
    config = Config().with_values(
        generation={"max_new_tokens": 8}, metrics={"enabled": True, "port": 0}, tiers={"device_sessions": 1}
    )
    with ChatRuntime(tiny_lm, config) as rt:
        yield rt


def test_the_endpoint_serves_what_stats_says(served):
    sessions = [served.open_session(system_prompt="Be brief.") for _ in range(2)]
    for text in ("Hello", "And then?"):
        for s in sessions:
            s.send(text)
    sessions[0].close()
    stats = served.stats()
    m = scrape(served.metrics.port)
    assert m[("chatrt_turns_total", ())] == stats.turns == 4
    assert m[("chatrt_prompt_tokens_total", ())] == stats.prompt_tokens
    assert m[("chatrt_reused_tokens_total", (("source", "session"),))] == stats.reused_session_tokens > 0
    assert m[("chatrt_reused_tokens_total", (("source", "prefix"),))] == stats.reused_prefix_tokens > 0
    assert m[("chatrt_prefilled_tokens_total", ())] == stats.prefilled_tokens
    assert stats.prompt_tokens == stats.reused_tokens + stats.prefilled_tokens
    assert m[("chatrt_hit_rate", ())] == pytest.approx(stats.hit_rate)
    assert m[("chatrt_ttft_seconds_count", ())] == 4
    assert m[("chatrt_ttft_seconds_sum", ())] > 0
    assert m[("chatrt_turn_duration_seconds_count", ())] == 4
    assert m[("chatrt_inter_token_latency_seconds_count", ())] == stats.generated_tokens - 4  # all but the first
    for tier, usage in stats.tiers.items():
        assert m[("chatrt_tier_bytes", (("tier", tier),))] == usage.bytes
        assert m[("chatrt_tier_sessions", (("tier", tier),))] == usage.sessions
    assert m[("chatrt_demotions_total", ())] == stats.tier_counters.demotions > 0  # the device holds one session
    assert m[("chatrt_promotions_total", ())] == stats.tier_counters.promotions > 0
    assert m[("chatrt_sessions_open", ())] == 1 and m[("chatrt_sessions_closed_total", ())] == 1
    assert m[("chatrt_prefix_hits_total", ())] == stats.prefix_hits


def test_each_runtime_has_its_own_numbers(served, tiny_lm):
    with ChatRuntime(tiny_lm, Config().with_values(generation={"max_new_tokens": 4})) as other:
        other.open_session().send("Hi")
        assert b"chatrt_turns_total 1.0" in other.metrics.exposition()
    assert scrape(served.metrics.port)[("chatrt_turns_total", ())] == 0


def test_the_endpoint_stops_with_the_runtime(tiny_lm):
    rt = ChatRuntime(tiny_lm, Config().with_values(metrics={"enabled": True, "port": 0}))
    port = rt.metrics.port
    scrape(port)
    rt.close()
    with pytest.raises(OSError):
        scrape(port)


def test_a_port_in_use_is_a_config_error(tiny_lm):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=r"\[metrics\] port"):
            ChatRuntime(tiny_lm, Config().with_values(metrics={"enabled": True, "port": port}))


def test_runtimes_publish_their_stats_to_redis(tiny_lm, redis_url, redis_client):
    config = Config().with_values(
        generation={"max_new_tokens": 6}, tiers={"redis_url": redis_url}, metrics={"publish_s": 0.001}
    )
    with ChatRuntime(tiny_lm, config) as a, ChatRuntime(tiny_lm, config) as b:
        a.open_session().send("One")
        for _ in range(2):
            b.open_session().send("Two")
        deployment = Board(a.store).deployment()
        assert set(deployment.runtimes) == {a.instance, b.instance}
        assert deployment.runtimes[b.instance].turns == 2
        assert deployment.total().turns == 3
        assert deployment.total().prompt_tokens == a.stats().prompt_tokens + b.stats().prompt_tokens
        assert deployment.sessions == 3 and deployment.prefixes == 0
    after = ChatRuntime(tiny_lm, config)
    try:
        gone = Board(after.store).deployment()
        assert gone.runtimes == {}  # a closed runtime takes its stats away
        assert gone.sessions == 3 and gone.sessions_with_kv == 3 and gone.kv_bytes > 0  # detached: kept for resume
    finally:
        after.close()


def test_a_scrape_parses_back_into_the_runtimes_stats(served):
    for s in [served.open_session(system_prompt="Be brief.") for _ in range(2)]:
        s.send("Hello")
        s.send("More")
    stats = served.stats()
    with urllib.request.urlopen(f"http://127.0.0.1:{served.metrics.port}/metrics", timeout=10) as response:
        parsed = metrics.parse(response.read().decode())
    assert parsed == stats.model_copy(update={"instance": ""})


def test_chatrt_stats_reads_a_running_runtime_and_a_deployment(
    served, tiny_lm, redis_url, redis_client, capsys, monkeypatch
):
    monkeypatch.setattr(cli.console, "width", 200)  # wide enough that a process name is not wrapped
    served.open_session().send("Hello")
    assert main(["stats", "--metrics-url", f"http://127.0.0.1:{served.metrics.port}/metrics"]) == 0
    out = capsys.readouterr().out
    assert "hit rate" in out and "device tier" in out and "demotions" in out and "TTFT" in out and "p95" in out
    config = Config().with_values(generation={"max_new_tokens": 4}, tiers={"redis_url": redis_url})
    with ChatRuntime(tiny_lm, config) as rt:
        rt.open_session().send("Hi")
        assert main(["stats", "--redis", redis_url]) == 0
    out = capsys.readouterr().out
    assert (
        "1 live processes" in out and rt.instance in out and "Redis holds 1 sessions (0 with KV" in out
    )  # its KV is on the device


def test_chatrt_stats_says_what_is_wrong_with_an_endpoint(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["stats", "--metrics-url", f"http://127.0.0.1:{port}/metrics"]) == 2
    assert "[metrics] enabled" in capsys.readouterr().err


def test_operators_get_token_counters_latency_histograms_queue_build_and_process(served, tiny_lm):
    s = served.open_session(system_prompt="Be brief.")
    s.send("Hello")
    s.send("More")
    stats = served.stats()
    m = scrape(served.metrics.port)
    assert m[("chatrt_prefix_cache_queries_total", ())] == stats.prompt_tokens
    assert m[("chatrt_prefix_cache_hits_total", ())] == stats.reused_tokens > 0
    assert m[("chatrt_requests_running", ())] == 0 and m[("chatrt_requests_waiting", ())] == 0
    assert m[("chatrt_turn_duration_seconds_count", ())] == 2
    info = tiny_lm.info
    (labels,) = [dict(labels) for name, labels in m if name == "chatrt_build_info"]
    assert labels == {"version": metrics.chatrt_version(), "model": info.name, "dtype": info.dtype,
                      "device": info.device}  # fmt: skip
    assert m[("process_resident_memory_bytes", ())] > 0


def test_the_metrics_port_answers_healthz_and_nothing_else(served):
    base = f"http://127.0.0.1:{served.metrics.port}"
    with urllib.request.urlopen(f"{base}/healthz", timeout=10) as response:
        assert response.status == 200 and response.read() == b"ok\n"
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"{base}/anything", timeout=10)
    assert missing.value.code == 404


def test_the_engine_queue_is_exported_while_turns_run(tiny_lm):
    config = Config().with_values(generation={"max_new_tokens": 200}, engine={"max_batch": 1})
    with ChatRuntime(tiny_lm, config) as rt:
        streams = [rt.open_session().stream("a long story") for _ in range(3)]
        for stream in streams[:1]:
            next(stream)
        started = [threading.Thread(target=lambda st=st: next(st, None)) for st in streams[1:]]
        for t in started:
            t.start()
        deadline = time.monotonic() + 30
        while rt.stats().requests_waiting < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        stats = rt.stats()
        assert (stats.requests_running, stats.requests_waiting) == (1, 2)
        m = dict(
            (s.name, s.value)
            for f in text_string_to_metric_families(rt.metrics.exposition().decode())
            for s in f.samples
        )
        assert m["chatrt_requests_running"] == 1 and m["chatrt_requests_waiting"] == 2
        streams[0].close()
        for t in started:
            t.join()
        for stream in streams[1:]:
            stream.close()


def test_turns_are_logged_as_json_lines_without_text_unless_asked(tiny_lm, caplog):
    config = Config().with_values(generation={"max_new_tokens": 6}, log={"turns": True})
    with ChatRuntime(tiny_lm, config) as rt, caplog.at_level("INFO", logger="chatrt.turns"):
        s = rt.open_session(session_id="logged")
        s.send("a secret message")
    (line,) = [json.loads(r.getMessage()) for r in caplog.records if r.name == "chatrt.turns"]
    assert line["event"] == "turn" and line["session_id"] == "logged"
    assert line["prompt_tokens"] == s.last_turn.prompt_tokens and line["kv_source"] == "none"
    assert "secret" not in json.dumps(line)
    caplog.clear()
    config = config.with_values(log={"turns": True, "text": True})
    with ChatRuntime(tiny_lm, config) as rt, caplog.at_level("INFO", logger="chatrt.turns"):
        reply = rt.open_session().send("a secret message")
    (line,) = [json.loads(r.getMessage()) for r in caplog.records if r.name == "chatrt.turns"]
    assert line["user"] == "a secret message" and line["reply"] == reply.text


def test_every_query_of_the_grafana_dashboard_names_a_metric_the_runtime_exports(tiny_lm, redis_url, redis_client):
    import re
    from pathlib import Path

    dashboard = json.loads(Path("docs/grafana/chatrt.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    named = {m for e in exprs for m in re.findall(r"\b((?:chatrt|process)_[a-z_]+)\b", e)}
    config = Config().with_values(generation={"max_new_tokens": 4}, tiers={"redis_url": redis_url})
    with ChatRuntime(tiny_lm, config) as rt:
        rt.open_session().send("Hi")
        exported = {s.name for f in text_string_to_metric_families(rt.metrics.exposition().decode()) for s in f.samples}
    assert len(exprs) >= 10 and named
    assert named <= exported, f"not exported: {sorted(named - exported)}"


def test_quantiles_are_estimated_from_the_buckets_as_prometheus_does():
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    registry = CollectorRegistry()
    h = Histogram("x_seconds", "x", buckets=(0.1, 0.2, 0.4), registry=registry)
    for v in [0.05] * 50 + [0.15] * 40 + [0.3] * 10:
        h.observe(v)
    q = metrics.quantiles(generate_latest(registry).decode(), "x_seconds", (0.5, 0.9, 0.95))
    assert q[0.5] == pytest.approx(0.1)  # rank 50 is the top of the first bucket
    assert q[0.9] == pytest.approx(0.2)
    assert q[0.95] == pytest.approx(0.3)  # halfway into (0.2, 0.4]
    assert metrics.quantiles("", "x_seconds", (0.5,)) == {}


def test_chatrt_stats_on_an_endpoint_loads_no_model_stack(served):
    """It answers in well under a second because it never imports torch or transformers."""
    import subprocess
    import sys

    code = (
        "import sys; from chatrt.cli import main; "
        f"rc = main(['stats', '--metrics-url', 'http://127.0.0.1:{served.metrics.port}/metrics']); "
        "print(sorted(m for m in ('torch', 'transformers', 'textual', 'matplotlib') if m in sys.modules)); "
        "raise SystemExit(rc)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("[]")


def test_preemptions_are_counted_in_the_stats_and_exported(tiny_lm):
    """Four turns whose KV outgrows tiers.device_bytes together: the engine parks the newest on the host, and an
    operator sees how often (vLLM's num_preemptions)."""
    budget = 200 * tiny_lm.info.kv_bytes_per_token  # two ~83-token prompts fit, and not their replies
    config = Config().with_values(generation={"max_new_tokens": 40}, engine={"max_batch": 4},
                                  tiers={"device_bytes": budget})  # fmt: skip
    with ChatRuntime(tiny_lm, config) as rt:
        turns = [rt.open_session().stream(" ".join(["story"] * 50) + f" number {n}") for n in range(4)]
        with ThreadPoolExecutor(4) as pool:  # all four in the engine at once
            replies = list(pool.map(lambda turn: turn.result(), turns))
        assert all(r.stats.generated_tokens > 20 for r in replies)
        stats = rt.stats()
        assert stats.preemptions == rt.engine.preemptions > 0
        m = {s.name: s.value for f in text_string_to_metric_families(rt.metrics.exposition().decode())
             for s in f.samples}  # fmt: skip
        assert m["chatrt_preemptions_total"] == stats.preemptions
