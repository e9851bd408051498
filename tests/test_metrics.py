"""Prometheus metrics: the endpoint a scraper reads says what `rt.stats()` says, per runtime."""

from __future__ import annotations

import socket
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from chatrt import ChatRuntime, Config, ConfigError, cli, metrics
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
    assert m[("chatrt_decode_tokens_per_second_count", ())] == 4
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
        deployment = a.store.deployment()
        assert set(deployment.runtimes) == {a.instance, b.instance}
        assert deployment.runtimes[b.instance].turns == 2
        assert deployment.total().turns == 3
        assert deployment.total().prompt_tokens == a.stats().prompt_tokens + b.stats().prompt_tokens
        assert deployment.sessions == 3 and deployment.prefixes == 0
    after = ChatRuntime(tiny_lm, config)
    try:
        gone = after.store.deployment()
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
    assert "hit rate" in out and "device tier" in out and "demotions" in out
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
