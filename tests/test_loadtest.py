"""`chatrt loadtest` end to end on the tiny model: it starts its own server, drives it over HTTP, runs the same
workload through the Python API, and reports what both paths did."""

import json
import subprocess
import sys
from pathlib import Path


def test_loadtest_reports_both_paths_with_reuse(tiny_folder, tmp_path):
    chatrt = Path(sys.executable).with_name("chatrt")
    cmd = [str(chatrt), "loadtest", "--model", str(tiny_folder), "--dtype", "float32", "--users", "1,3",
           "--turns", "3", "--max-tokens", "8", "--out", str(tmp_path)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "loadtest.json").read_text())
    runs = {(r["path"], r["users"]): r for r in report["results"]}
    assert set(runs) == {("http", 1), ("http", 3), ("python", 1), ("python", 3)}
    for (path, users), r in runs.items():
        assert r["turns"] == 3 * users and r["tokens_per_s"] > 0 and 0 < r["ttft_p50_s"] <= r["ttft_p95_s"]
        # Every turn after the first reuses its conversation; the first reuses the shared system prompt.
        assert r["cached_share"] > 0.5, (path, users, r)
    # A stateless HTTP client is matched to its session: it reuses as much as the Python API's own sessions.
    assert abs(runs[("http", 3)]["cached_share"] - runs[("python", 3)]["cached_share"]) < 0.02
