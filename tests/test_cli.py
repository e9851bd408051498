"""The chatrt command, run as a user runs it."""

import json
import subprocess
import sys

import pytest

from chatrt.bench.reuse import Report
from chatrt.cli import main

pytestmark = pytest.mark.bundled


def chatrt(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "chatrt.cli", *args], input=stdin, capture_output=True, text=True, timeout=300
    )


def test_info_prints_the_model_and_its_fingerprint(capsys, bundled_lm):
    assert main(["info", "--dtype", "float32"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"]["fingerprint"] == bundled_lm.info.fingerprint
    assert out["config"]["model"]["dtype"] == "float32"
    assert out["chat_template"] == {"takes_tools": False}  # the bundled SmolLM2's takes none
    assert main(["info", "--dtype", "float32", "--chat-template", "chatml-tools"]) == 0
    assert json.loads(capsys.readouterr().out)["chat_template"] == {"takes_tools": True}


def test_bench_writes_a_report_and_a_plot(tmp_path):
    args = ["--preset", "quick", "--turns", "1", "--max-new-tokens", "4", "--modes", "recompute,full,pressure-redis"]
    assert main(["bench", *args, "--restore-tokens", "300", "--out", str(tmp_path)]) == 0
    report = Report.model_validate_json((tmp_path / "report.json").read_text())
    assert report.replies_identical and report.workload.sessions == 3 and report.workload.turns == 1
    assert report.workload.name == "quick with max_new_tokens, turns changed"
    assert [r.mode for r in report.results] == ["recompute", "full", "pressure-redis"]
    assert (tmp_path / "ttft.png").read_bytes()[:4] == b"\x89PNG"
    assert report.restore.history_tokens >= 280 and report.restore.chose_faster
    assert report.result("full").hit_rate > report.result("recompute").hit_rate == 0.0


def test_chat_answers_on_stdin_and_shows_reuse():
    stdin = "Hi there\nWhat is the sky's color?\n\n"
    done = chatrt("chat", "--plain", "--system", "Answer in five words.", stdin=stdin)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("bot>") == 2
    assert "reused" in done.stdout


def test_stats_runs_a_demo_and_prints_hit_rate():
    done = chatrt("stats")
    assert done.returncode == 0, done.stderr
    assert "hit rate" in done.stdout and "prefix hits" in done.stdout
    assert "host tier" in done.stdout and "demotions" in done.stdout


def test_errors_are_one_clear_line(tmp_path):
    done = chatrt("info", "--config", str(tmp_path / "missing.toml"))
    assert done.returncode == 2
    assert "does not exist" in done.stderr and "Traceback" not in done.stderr
