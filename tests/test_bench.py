"""The bench replays one workload in every reuse mode; its books balance and reuse never changes a reply."""

import pytest

from chatrt import bench
from chatrt.config import Config


@pytest.fixture(scope="module")
def report(tiny_lm):
    workload = bench.Workload(
        sessions=3,
        turns=3,
        system_words=40,
        user_words=5,
        max_new_tokens=6,
        modes=("recompute", "prefix", "session", "full"),
    )
    return bench.run(tiny_lm, Config(), workload)


def test_every_mode_gives_the_same_replies(report):
    assert report.replies_identical


def test_prompt_is_reused_plus_prefilled_in_every_turn(report):
    for result in report.results:
        assert len(result.turns) == 9
        for t in result.turns:
            assert t.prompt_tokens == t.reused_session_tokens + t.reused_prefix_tokens + t.prefilled_tokens
        assert result.prompt_tokens == sum(t.prompt_tokens for t in result.turns)
        assert result.reused_tokens == sum(t.reused_tokens for t in result.turns)
        assert result.hit_rate == pytest.approx(result.reused_tokens / result.prompt_tokens)


def test_modes_reuse_what_they_name(report):
    recompute, prefix, session, full = (report.result(m) for m in ("recompute", "prefix", "session", "full"))
    assert recompute.reused_tokens == 0
    assert all(t.reused_session_tokens == 0 for t in prefix.turns)
    assert all(t.reused_prefix_tokens == 0 for t in session.turns)
    # Same prompts in every mode: full reuse prefills least.
    assert recompute.prompt_tokens == prefix.prompt_tokens == session.prompt_tokens == full.prompt_tokens
    assert full.prefilled_tokens < min(prefix.prefilled_tokens, session.prefilled_tokens) < recompute.prefilled_tokens
    assert report.speedup("recompute") == 1.0


def test_workload_is_reproducible_from_its_seed():
    w = bench.Workload(seed=3)
    assert bench.conversations(w) == bench.conversations(w)
    assert bench.conversations(w) != bench.conversations(bench.Workload(seed=4))
    system, users = bench.conversations(w)
    assert len(users) == w.sessions and all(len(u) == w.turns for u in users)
    assert 250 <= len(system.split()) <= 320
