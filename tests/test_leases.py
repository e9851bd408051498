"""Leases and fenced writes across real processes: a turn that outlives `lease_s` keeps its session while its
process is alive, and a process that lost its lease never writes over a turn another process answered."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from chatrt.errors import SessionLeased
from tests.conftest import tiered
from tests.test_session import assert_exact

LEASE_S = 1.0

# A process whose user reads a reply slowly: it streams one piece, then waits for a line on stdin before reading
# the rest; then it sends one more turn. It prints what happened as JSON.
SLOW_READER = """
import json, sys
from transformers import AutoTokenizer
from chatrt.errors import SessionConflict
from tests.conftest import reference_reply, tiered, tiny_llama
lm = tiny_llama(AutoTokenizer.from_pretrained(sys.argv[1]))
rt = tiered(lm, sys.argv[2], lease_s=float(sys.argv[3]))
s = rt.session("contested")
stream = s.stream(sys.argv[4])
first = next(stream)
print("streaming", flush=True)
sys.stdin.readline()
out = {}
try:
    out["reply"] = first + "".join(stream)
except SessionConflict as e:
    out["conflict"], out["reply"] = str(e), e.reply
out["after"] = [m.content for m in s.messages]
reply = s.send("one more")
prompt = rt.template.render(s.transcript[:-1])
out["next_exact"] = reply.token_ids == reference_reply(lm, prompt, 12)
out["final"] = [m.content for m in s.messages]
rt.close()
print(json.dumps(out), flush=True)
"""


@pytest.fixture
def slow_reader(bundled_folder, redis_url):
    procs: list[subprocess.Popen[str]] = []

    def start(question: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-c", SLOW_READER, str(bundled_folder[0]), redis_url, str(LEASE_S), question],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        procs.append(proc)
        assert proc.stdout.readline().strip() == "streaming", proc.stderr.read()
        return proc

    yield start
    for proc in procs:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.wait()


def finish(proc: subprocess.Popen[str]) -> dict:
    out, err = proc.communicate("go on\n", timeout=120)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def stored_users(tiny_lm, redis_url) -> list[str]:
    with tiered(tiny_lm, redis_url) as rt:
        return [m.content for m in rt.session("contested").messages if m.role == "user"]


def test_a_slow_turn_keeps_its_lease_and_a_stalled_one_never_overwrites_another_process(
    tiny_lm, redis_url, redis_client, slow_reader
):
    with tiered(tiny_lm, redis_url) as rt:
        rt.open_session(session_id="contested").send("the first question")

    # A turn that outlives its lease: its process renews the lease while the reader dawdles.
    reader = slow_reader("a question read slowly")
    time.sleep(3 * LEASE_S)
    with tiered(tiny_lm, redis_url) as other, pytest.raises(SessionLeased):
        other.session("contested")
    result = finish(reader)
    assert "conflict" not in result and result["next_exact"]
    assert stored_users(tiny_lm, redis_url) == ["the first question", "a question read slowly", "one more"]

    # A process stalled past its lease (it cannot renew): another process takes the session over and answers.
    stalled = slow_reader("a question from a stalled process")
    stalled.send_signal(signal.SIGSTOP)
    time.sleep(1.5 * LEASE_S)
    with tiered(tiny_lm, redis_url) as other:
        s = other.session("contested")
        assert_exact(s, s.send("a question answered elsewhere"), 12)
    stalled.send_signal(signal.SIGCONT)
    result = finish(stalled)
    # Its turn was refused, with its reply in the error, and it went back to the other process's transcript.
    assert "answered session contested" in result["conflict"] and result["reply"]
    assert result["after"][-2] == "a question answered elsewhere" and result["next_exact"]
    users = ["the first question", "a question read slowly", "one more", "a question answered elsewhere", "one more"]
    assert stored_users(tiny_lm, redis_url) == users  # nothing the other process wrote was lost
