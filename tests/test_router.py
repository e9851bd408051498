"""The shipped router, really started: HAProxy with `deploy/haproxy.cfg` in front of two `chatrt serve`
processes on one Redis. A session's turns land on one process and never leave its memory while both live; a
stateless client keyed by its API key finds its conversation; when a process is killed, its sessions go on in
the other from Redis, exactly."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai

from chatrt import ChatRuntime, Config
from tests.conftest import free_port, serve

CONFIG = Path(__file__).parents[1] / "deploy" / "haproxy.cfg"
QUESTIONS = [f"Question number {n}: what comes next?" for n in range(4)]
SESSIONS = [f"router-{n}" for n in range(8)]


@contextlib.contextmanager
def haproxy(*servers: str) -> Iterator[str]:
    """HAProxy on a free port with the shipped config, routing to `servers` (base URLs …/v1)."""
    port = free_port()
    env = {**os.environ, "CHATRT_LISTEN": f"127.0.0.1:{port}"}
    env |= {f"CHATRT_SERVER_{n}": url.removeprefix("http://").removesuffix("/v1") for n, url in enumerate(servers, 1)}
    proc = subprocess.Popen(["haproxy", "-db", "-f", str(CONFIG)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while not _healthy(url):
            assert proc.poll() is None, f"haproxy exited: {proc.stdout.read() if proc.stdout else ''}"
            assert time.monotonic() < deadline, "haproxy did not answer within 20 s"
            time.sleep(0.1)
        time.sleep(2.5)  # both servers' first health checks passed (rise 2, inter 1 s)
        yield f"{url}/v1"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _healthy(url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    return False


def turn(url: str, session_id: str, text: str, deadline_s: float = 0) -> httpx.Response:
    """One turn of a session through the router; retried while the session is still leased by a process that
    died (409) or the router has not yet seen it die (502/503), for up to `deadline_s`."""
    end = time.monotonic() + deadline_s
    while True:
        r = httpx.post(f"{url}/chat/completions", headers={"X-Session-Id": session_id}, timeout=60,
                       json={"model": "m", "messages": [{"role": "user", "content": text}]})  # fmt: skip
        if r.status_code == 200 or r.status_code not in (409, 502, 503) or time.monotonic() > end:
            assert r.status_code == 200, r.text
            return r
        time.sleep(0.3)


def test_affinity_while_both_live_and_failover_when_one_dies(tiny_folder, tiny_lm, redis_url, redis_client):
    with ChatRuntime(tiny_lm, Config().with_values(generation={"max_new_tokens": 12})) as rt:
        s = rt.open_session("Be helpful.")
        want = [s.send(q).text for q in QUESTIONS]
    env = {"TIERS__REDIS_URL": redis_url, "TIERS__LEASE_S": 2}
    with serve(tiny_folder, **env) as one, serve(tiny_folder, **env) as two, haproxy(one, two) as url:
        served: dict[str, str] = {}
        for sid in SESSIONS:
            r = httpx.post(f"{url}/sessions", headers={"X-Session-Id": sid},
                           json={"session_id": sid, "system_prompt": "Be helpful."})  # fmt: skip
            assert r.status_code == 200, r.text
            where = {r.headers["x-chatrt-server"]}
            for n, question in enumerate(QUESTIONS[:3]):
                r = turn(url, sid, question)
                body = r.json()
                assert body["choices"][0]["message"]["content"] == want[n]
                where.add(r.headers["x-chatrt-server"])
                if n:  # no restores: the session's KV stayed in its process's memory
                    assert body["chatrt"]["kv_source"] == "device", body["chatrt"]
            assert len(where) == 1, (sid, where)  # affinity: every request of the session on one process
            served[sid] = where.pop()
        assert set(served.values()) == {"chatrt1", "chatrt2"}, served  # the sessions spread over both

        # A stateless client keyed by its API key: its second turn finds the session holding its first.
        client = openai.OpenAI(base_url=url, api_key="user-a", max_retries=0)
        messages = [{"role": "system", "content": "Be helpful."}, {"role": "user", "content": QUESTIONS[0]}]
        first = client.chat.completions.create(model="m", messages=messages)
        messages += [{"role": "assistant", "content": first.choices[0].message.content},
                     {"role": "user", "content": QUESTIONS[1]}]  # fmt: skip
        second = client.chat.completions.create(model="m", messages=messages)
        assert second.choices[0].message.content == want[1]
        assert second.usage.prompt_tokens_details.cached_tokens > first.usage.prompt_tokens
        client.close()

        # Failover: the process of the first session dies; every session goes on, exactly.
        dead = served[SESSIONS[0]]
        os.kill((one if dead == "chatrt1" else two).pid, signal.SIGKILL)
        for sid in SESSIONS:
            r = turn(url, sid, QUESTIONS[3], deadline_s=30)
            body = r.json()
            assert body["choices"][0]["message"]["content"] == want[3], sid
            assert r.headers["x-chatrt-server"] != dead
            if served[sid] != dead:  # the survivor's own sessions did not move
                assert r.headers["x-chatrt-server"] == served[sid] and body["chatrt"]["kv_source"] == "device"
            else:  # the dead one's: resumed from Redis (its transcript, recomputed, or its KV)
                assert body["chatrt"]["kv_source"] in ("redis", "none"), body["chatrt"]
