"""Scale-out on Redis Cluster: two `chatrt serve` processes share a real 3-master cluster started here; a
session's turns alternate between them (each move a restore of the KV the other wrote through), nothing is lost
or left behind, and when one process is killed its sessions go on in the other."""

from __future__ import annotations

import os
import signal

import httpx
import pytest
from redis.cluster import RedisCluster

from chatrt import ChatRuntime, Config
from chatrt.board import Board
from chatrt.cache.store import RedisStore
from chatrt.errors import StoreUnavailable
from chatrt.redis_server import redis_cluster
from tests.conftest import serve

SETTINGS = {"TIERS__REDIS_CLUSTER": "true", "TIERS__REDIS_WRITE_THROUGH": "true"}
QUESTIONS = [f"Question number {n}: what comes next?" for n in range(6)]


@pytest.fixture(scope="module")
def cluster_url():
    with redis_cluster(3) as url:
        yield url


@pytest.fixture
def cluster(cluster_url):
    client = RedisCluster.from_url(cluster_url)
    client.flushall(target_nodes=RedisCluster.PRIMARIES)
    yield client
    client.close()


def session_keys(client: RedisCluster, session_id: str) -> list[bytes]:
    return sorted(k for k in client.scan_iter(match=f"chatrt:{{{session_id}}}:*") if not k.endswith(b":closed"))


def python_api_replies(tiny_lm, questions):
    with ChatRuntime(tiny_lm, Config().with_values(generation={"max_new_tokens": 12})) as rt:
        s = rt.open_session("Be helpful.")
        return [s.send(q).text for q in questions]


def ask(url: str, session_id: str, text: str) -> dict:
    r = httpx.post(f"{url}/chat/completions", headers={"X-Session-Id": session_id}, timeout=60,
                   json={"model": model(url), "messages": [{"role": "user", "content": text}]})  # fmt: skip
    assert r.status_code == 200, r.text
    return r.json()


def model(url: str) -> str:
    return httpx.get(f"{url}/models").json()["data"][0]["id"]


def test_the_store_works_on_a_cluster_one_slot_per_session(cluster_url, cluster):
    store = RedisStore(cluster_url, ttl_s=60, lease_s=5, cluster=True)
    try:
        assert store.take_lease("s1") is False and store.take_lease("s1") is True
        slots = {cluster.keyslot(k) for k in session_keys(cluster, "s1")}
        assert len(slots) == 1
        assert Board(store).deployment().sessions == 0  # scanned on every node
    finally:
        store.close()


def test_a_session_alternating_between_two_processes_is_exact_and_moves_by_restore(tiny_folder, tiny_lm, cluster_url,
                                                                                   cluster):  # fmt: skip
    expected = python_api_replies(tiny_lm, QUESTIONS)
    env = {**SETTINGS, "TIERS__REDIS_URL": cluster_url}
    with serve(tiny_folder, **env) as a, serve(tiny_folder, **env) as b:
        sid = httpx.post(f"{a}/sessions", json={"session_id": "moving", "system_prompt": "Be helpful."}).json()
        assert sid["session_id"] == "moving"
        for n, (question, want) in enumerate(zip(QUESTIONS[:3], expected, strict=False)):
            url = (a, b)[n % 2]
            reply = ask(url, "moving", question)
            assert reply["choices"][0]["message"]["content"] == want, f"turn {n}"
            info = reply["chatrt"]
            if n:  # a move: the KV the other process wrote through, restored (or recomputed, if cheaper)
                assert info["kv_source"] == "redis", info
                restored = info["kv_decision"].startswith("restore")
                assert (info["reused_session_tokens"] > 0) == restored, info
        # The process that answered last dies: the other goes on from what it wrote through.
        os.kill(a.pid, signal.SIGKILL)
        for n, question in enumerate(QUESTIONS[3:], start=3):
            reply = ask(b, "moving", question)
            assert reply["choices"][0]["message"]["content"] == expected[n], f"turn {n}"
            if n == 3:
                assert reply["chatrt"]["kv_source"] == "redis"
        held = httpx.get(f"{b}/sessions/moving").json()
        assert [m["content"] for m in held["messages"][::2]] == QUESTIONS  # no lost turn
        assert httpx.delete(f"{b}/sessions/moving").status_code == 200
        assert session_keys(cluster, "moving") == []


def test_a_cluster_that_cannot_be_reached_is_a_clear_error():
    with pytest.raises(StoreUnavailable, match="Redis Cluster"):
        RedisStore("redis://127.0.0.1:1/0", ttl_s=60, lease_s=5, cluster=True, timeout_s=0.5)
