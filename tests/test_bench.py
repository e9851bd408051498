"""The bench replays one workload in every reuse mode; its books balance and reuse never changes a reply."""

import pytest

from chatrt import ConfigError
from chatrt.bench import concurrent as bench_concurrent
from chatrt.bench import reuse as bench
from chatrt.bench import workload as bench_workload
from chatrt.bench.plot import ttft_by_turn
from chatrt.config import Config


@pytest.fixture(scope="module")
def report(tiny_lm):
    workload = bench.Workload(
        sessions=3,
        turns=3,
        system_words=40,
        user_words=5,
        max_new_tokens=6,
        modes=("recompute", "prefix", "session", "full", "pressure", "pressure-redis"),
        device_sessions=1,
        host_sessions=1,
    )
    return bench.run(tiny_lm, Config(), workload)


def test_every_mode_gives_the_same_replies(report):
    assert report.replies_identical
    assert [r.mode for r in report.results] == list(bench.MODES)


def test_prompt_is_reused_plus_prefilled_in_every_turn(report):
    for result in report.results:
        assert len(result.turns) == 9
        for t in result.turns:
            assert t.prompt_tokens == t.reused_session_tokens + t.reused_prefix_tokens + t.prefilled_tokens
        assert result.prompt_tokens == sum(t.prompt_tokens for t in result.turns)
        assert result.reused_tokens == sum(t.reused_tokens for t in result.turns)
        assert result.prefilled_tokens == sum(t.prefilled_tokens for t in result.turns)
        assert result.hit_rate == pytest.approx(result.reused_tokens / result.prompt_tokens)


def test_ttft_by_turn_is_the_median_over_sessions(report):
    for result in report.results:
        ttfts = [t.ttft_s for t in result.turns]  # interleaved: turn 1 of every session, then turn 2, ...
        assert result.ttft_by_turn_s == [sorted(ttfts[i * 3 : i * 3 + 3])[1] for i in range(3)]
        assert result.last_turn_ttft_s == result.ttft_by_turn_s[-1]
        assert result.ttft_median_s == sorted(ttfts)[4]


def test_modes_reuse_what_they_name(report):
    recompute, prefix, session, full = (report.result(m) for m in ("recompute", "prefix", "session", "full"))
    assert recompute.reused_tokens == 0
    assert all(t.reused_session_tokens == 0 for t in prefix.turns)
    assert all(t.reused_prefix_tokens == 0 for t in session.turns)
    # Same prompts in every mode: full reuse prefills least.
    assert len({r.prompt_tokens for r in report.results}) == 1
    assert full.prefilled_tokens < min(prefix.prefilled_tokens, session.prefilled_tokens) < recompute.prefilled_tokens
    assert report.speedup("recompute") == 1.0
    assert report.speedup("full") == recompute.last_turn_ttft_s / full.last_turn_ttft_s


def test_under_pressure_caches_move_and_redis_keeps_what_would_be_dropped(report):
    full, pressure, redis = (report.result(m) for m in ("full", "pressure", "pressure-redis"))
    assert full.tier_counters.demotions == 0 and full.peak_tier_bytes["host"] == 0
    # The device holds one session, the host one: the third is dropped without Redis, kept in Redis with it.
    assert pressure.tier_counters.drops > 0 and pressure.peak_tier_bytes["redis"] == 0
    assert pressure.peak_tier_bytes["device"] < full.peak_tier_bytes["device"]
    assert redis.tier_counters.drops == 0 and redis.peak_tier_bytes["redis"] > 0
    assert redis.tier_counters.restores + redis.tier_counters.recomputes > 0
    assert pressure.prefilled_tokens > redis.prefilled_tokens >= full.prefilled_tokens


def test_the_plot_is_a_png(report, tmp_path):
    path = ttft_by_turn(report, tmp_path / "ttft.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_the_report_has_a_versioned_schema(report):
    data = report.model_dump(mode="json")
    assert data["version"] == bench.REPORT_VERSION == 2
    assert bench.Report.model_validate_json(report.model_dump_json()) == report


def test_workload_is_reproducible_from_its_seed():
    w = bench.Workload(seed=3, user_words=12)
    assert bench.conversations(w) == bench.conversations(w)
    assert bench.conversations(w) != bench.conversations(bench.Workload(seed=4, user_words=12))
    system, users = bench.conversations(w)
    assert len(users) == w.sessions and all(len(u) == w.turns for u in users)
    assert 250 <= len(system.split()) <= 320


def test_presets_load_by_name_and_a_bad_one_says_which_exist(tmp_path):
    default = bench_workload.load_preset("default")
    assert (
        default.name == "default"
        and default.modes == tuple(bench.MODES)
        and default == bench.Workload(name="default", device_sessions=2)
    )
    # the default preset replies as a runtime with the default config does
    assert default.max_new_tokens == Config().generation.max_new_tokens
    assert bench_workload.load_preset("long").turns == 14
    with pytest.raises(ConfigError, match="default, long, quick"):
        bench_workload.load_preset("nope")
    bad = tmp_path / "bad.toml"
    bad.write_text("sesions = 3\n")
    with pytest.raises(ConfigError, match="sesions"):
        bench_workload.load_preset(str(bad))


def test_the_concurrent_bench_batches_sessions_and_reports_the_gain(tiny_lm):
    report = bench_concurrent.run(tiny_lm, Config(), [1, 4], max_new_tokens=8)
    one, four = report.results
    assert (one.sessions, four.sessions) == (1, 4) and one.gain == one.decode_gain == 1.0
    assert one.mean_batch == 1.0 and four.mean_batch > 1.5  # the four turns did share forwards
    assert len(four.ttft_s) == len(four.tokens_per_s) == 4 and four.generated_tokens > 0
    assert four.decode_tokens_per_s == pytest.approx(sum(four.tokens_per_s))
    u = report.under_load
    assert u is not None and u.long_prompt_tokens > 1000 and u.longest_gap_s > 0 and u.loaded_ttft_s > 0


def test_repeats_report_the_median_of_each_timing(tiny_lm):
    workload = bench.Workload(sessions=2, turns=2, system_words=10, max_new_tokens=4, modes=("full",), repeats=3)
    report = bench.run(tiny_lm, Config(), workload)
    (result,) = report.results
    assert result.repeats == 3 and len(result.turns) == 4  # the first run's turns
    assert report.cores >= 1 and report.load_avg_1m >= 0


def test_the_median_of_runs_takes_each_timing_apart():
    def run(wall: float, ttft: float, by_turn: list[float]) -> bench.ModeResult:
        return bench.ModeResult(
            mode="full", turns=[], wall_s=wall, prompt_tokens=10, reused_session_tokens=5, reused_prefix_tokens=0,
            prefilled_tokens=5, generated_tokens=3, ttft_median_s=ttft, ttft_p95_s=ttft, last_turn_ttft_s=ttft,
            decode_tokens_per_s=1.0, longest_turn_decode_tokens_per_s=1.0, ttft_by_turn_s=by_turn,
            peak_tier_bytes={}, tier_counters=bench.TierCounters(),
        )  # fmt: skip

    m = bench._median([run(1.0, 0.5, [1, 9]), run(3.0, 0.1, [2, 8]), run(2.0, 0.9, [3, 7])])
    assert (m.wall_s, m.ttft_median_s, m.ttft_by_turn_s, m.repeats) == (2.0, 0.5, [2, 8], 3)
    assert m.prompt_tokens == 10  # counts are the first run's


def test_the_quick_preset_is_small_and_skips_no_mode():
    quick = bench_workload.load_preset("quick")
    assert quick.sessions * quick.turns <= 6 and quick.max_new_tokens <= 16 and quick.restore_tokens <= 300
    assert set(quick.modes) == set(bench.MODES)


def test_the_shared_prompt_bench_profiles_both_ways_of_holding_it(tiny_lm):
    from chatrt.bench import shared

    config = Config().with_values(engine={"compile": "off"})
    r = shared.run(tiny_lm, config, rows=4, shared_tokens=64, own_tokens=8, steps=4)
    assert r.decode_step.startswith("eager") and r.rows == 4
    per_token = tiny_lm.info.kv_bytes_per_token
    # Each row's own tokens grow in room of their own (64 tokens more), so the live caches hold more than the least.
    assert r.copied.kv_bytes >= 4 * (64 + 12) * per_token and r.shared.kv_bytes >= (64 + 4 * 12) * per_token
    assert r.copied.kv_bytes - r.shared.kv_bytes == 3 * 64 * per_token  # the prompt held once instead of 4 times
    assert 0 < r.shared.attention_ms < r.shared.step_ms and 0 < r.copied.attention_ms < r.copied.step_ms
    assert r.reads_saved == 1 - (64 + 4 * 12) / (4 * 76)


def test_the_structured_bench_times_free_and_constrained_rounds(runtime):
    from chatrt.bench import structured

    r = structured.run(runtime, rows=4, rounds=1, max_new_tokens=40)
    assert r.free.replies == r.constrained.replies == 4 and r.free.valid == 0  # free replies are not counted
    assert r.free.mask_ms_per_token == 0 < r.constrained.mask_ms_per_token  # only constrained rows ask a grammar
    assert r.free.tokens_per_s > 0 and r.constrained.tokens_per_s > 0
