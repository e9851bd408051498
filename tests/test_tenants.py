"""Tenants of one `chatrt serve` (a real subprocess): each sees and reaches only its own sessions and
conversations, holds at most its share, and idle sessions free themselves."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from chatrt.template import ChatTemplate
from tests.conftest import live_keys, serve

KEYS = {"acme": "key-a", "beta": "key-b"}
TENANTS = {"SERVE__API_KEYS": '{acme = "key-a", beta = "key-b"}'}
SYSTEM = "You are a helpful assistant."


def client(url: str, tenant: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEYS[tenant]}"}, timeout=60)


def chat(c: httpx.Client, messages: list[dict], **extra) -> dict:
    model = c.get("/models").json()["data"][0]["id"]
    response = c.post("/chat/completions", json={"model": model, "messages": messages, **extra})
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def url(tiny_folder):
    with serve(tiny_folder, **TENANTS, SESSION__MAX_SESSIONS=20) as url:
        yield url


def test_two_tenants_sending_the_same_history_share_nothing_but_the_system_prompt(url, tiny_lm):
    prefix = len(ChatTemplate(tiny_lm.tokenizer).prefix_ids(SYSTEM))
    with client(url, "acme") as a, client(url, "beta") as b:
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "My secret is 1234."}]
        first = chat(a, messages)
        messages += [first["choices"][0]["message"], {"role": "user", "content": "What is my secret?"}]
        mine = chat(a, messages)
        assert mine["usage"]["prompt_tokens_details"]["cached_tokens"] > prefix  # acme continues its own session
        theirs = chat(b, messages)  # the same history, guessed by another tenant
        assert theirs["usage"]["prompt_tokens_details"]["cached_tokens"] <= prefix
        assert theirs["session_id"] != mine["session_id"]
        assert theirs["choices"][0]["message"]["content"] == mine["choices"][0]["message"]["content"]  # exact
        # Within a tenant, `user` (or vLLM's cache_salt) narrows the scope the same way.
        again = [*messages, mine["choices"][0]["message"], {"role": "user", "content": "Thanks."}]
        other_user = chat(a, again, user="someone-else")
        assert other_user["usage"]["prompt_tokens_details"]["cached_tokens"] <= prefix


def test_another_tenants_session_is_404_on_every_route(url):
    with client(url, "acme") as a, client(url, "beta") as b:
        assert a.post("/sessions", json={"session_id": "x", "system_prompt": SYSTEM}).json()["session_id"] == "x"
        chat(a, [{"role": "user", "content": "hello"}], session_id="x")
        model = b.get("/models").json()["data"][0]["id"]
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
        assert b.get("/sessions/x").status_code == 404
        assert b.post("/chat/completions", json=body, headers={"X-Session-Id": "x"}).status_code == 404
        assert b.post("/chat/completions", json={**body, "session_id": "x"}).status_code == 404
        assert b.delete("/sessions/x").status_code == 404
        assert b.get("/sessions/acme.x").status_code == 404  # its name inside the server is out of reach too
        assert b.post("/sessions", json={"session_id": "x"}).status_code == 200  # beta's own "x", another session
        held = a.get("/sessions/x").json()
        assert held["session_id"] == "x" and [m["role"] for m in held["messages"]] == ["user", "assistant"]
        assert b.get("/sessions/x").json()["messages"] == []
        assert httpx.get(f"{url}/models").status_code == 401
        assert a.delete("/sessions/x").status_code == 200 and b.delete("/sessions/x").status_code == 200


def test_one_tenant_opening_sessions_without_end_locks_out_no_other(url):
    with client(url, "acme") as a, client(url, "beta") as b:
        opened, refused = [], None
        for n in range(25):  # the runtime holds 20: acme's share is 10
            r = a.post("/sessions", json={"session_id": f"flood{n}"})
            if r.status_code != 200:
                refused = r
                break
            opened.append(r.json()["session_id"])
        assert refused is not None and refused.status_code == 429 and len(opened) <= 10
        error = refused.json()["error"]
        assert "serve.tenant_sessions" in error["message"] and refused.headers["Retry-After"]
        assert b.post("/sessions", json={"session_id": "mine"}).status_code == 200
        chat(b, [{"role": "user", "content": "Can I still talk?"}])
        # acme's idle stateless sessions make room for its new conversations instead of refusing them.
        for n in opened:
            assert a.delete(f"/sessions/{n}").status_code == 200
        for n in range(15):
            chat(a, [{"role": "user", "content": f"A new conversation, number {n}."}])
        assert b.delete("/sessions/mine").status_code == 200


def test_a_tenant_has_its_share_of_the_requests_in_flight(tiny_folder):
    """acme's first request prefills ~1,900 tokens one per step (seconds): meanwhile its second is refused with
    a 429 that names the limit, and beta is answered."""
    served = serve(tiny_folder, **TENANTS, SERVE__TENANT_REQUESTS=1, ENGINE__PREFILL_CHUNK=1)
    with served as url, client(url, "acme") as a, client(url, "beta") as b:
        model = a.get("/models").json()["data"][0]["id"]
        long = {"model": model, "messages": [{"role": "user", "content": "word " * 1900}], "max_tokens": 2}
        first = threading.Thread(target=lambda: a.post("/chat/completions", json=long))
        first.start()
        time.sleep(0.5)
        short = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        second = a.post("/chat/completions", json=short)
        assert second.status_code == 429 and "serve.tenant_requests" in second.json()["error"]["message"]
        assert second.headers["Retry-After"] and first.is_alive()
        assert b.post("/chat/completions", json=short).status_code == 200
        first.join(60)
        assert a.post("/chat/completions", json=short).status_code == 200  # counted out once it ended
        many = b.post("/chat/completions", json={**short, "n": 2})  # each choice is a turn of its share
        assert many.status_code == 429 and "serve.tenant_requests" in many.json()["error"]["message"]
        assert b.post("/chat/completions", json=short).status_code == 200  # the refused choices were counted out


def test_idle_sessions_are_closed_on_every_tier(tiny_folder, redis_url, redis_client):
    settings = {"SERVE__SESSION_IDLE_S": 1, "TIERS__REDIS_URL": redis_url, "TIERS__DEVICE_BYTES": 1,
                "TIERS__HOST_BYTES": 1}  # fmt: skip
    with serve(tiny_folder, **settings) as url:
        model = httpx.get(f"{url}/models").json()["data"][0]["id"]
        sid = httpx.post(f"{url}/sessions", json={"session_id": "idle"}).json()["session_id"]
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "session_id": sid}
        assert httpx.post(f"{url}/chat/completions", json=body).status_code == 200
        assert any(k.startswith(b"chatrt:{idle}:kv:") for k in live_keys(redis_client))  # its KV is in Redis
        deadline = time.monotonic() + 20
        while httpx.get(f"{url}/sessions/idle").status_code != 404 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert httpx.get(f"{url}/sessions/idle").status_code == 404
        assert [k for k in live_keys(redis_client) if k.startswith(b"chatrt:{idle}")] == []


def test_a_session_in_use_is_not_expired(tiny_folder):
    with serve(tiny_folder, max_new_tokens=6, SERVE__SESSION_IDLE_S=2) as url:
        model = httpx.get(f"{url}/models").json()["data"][0]["id"]
        sid = httpx.post(f"{url}/sessions", json={}).json()["session_id"]
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "session_id": sid}
        stop = threading.Event()
        for _ in range(8):  # a turn every half second renews it
            assert httpx.post(f"{url}/chat/completions", json=body).status_code == 200
            stop.wait(0.5)
        assert httpx.get(f"{url}/sessions/{sid}").status_code == 200


def test_a_key_names_its_tenant_and_each_has_an_equal_share_by_default():
    from chatrt.config import ServeConfig
    from chatrt.serve.tenants import Tenants

    tenants = Tenants(ServeConfig(api_keys=KEYS), max_sessions=20, max_requests=9)
    acme = tenants.identify("Bearer key-a")
    assert acme is not None and acme.name == "acme" and tenants.identify("bearer  key-b").name == "beta"
    assert tenants.identify("Bearer nope") is None and tenants.identify("key-a") is None
    assert (tenants.max_sessions, tenants.max_requests) == (10, 4)
    assert acme.internal("x") == "acme.x" and acme.external("acme.x") == "x" and not acme.owns("beta.x")
    assert tenants.admit(acme) and all(tenants.admit(acme) for _ in range(3)) and not tenants.admit(acme)
    tenants.release(acme)
    assert tenants.admit(acme)
    one = Tenants(ServeConfig(), max_sessions=20, max_requests=9)  # no key: one tenant, ids as given
    only = one.identify("")
    assert only is not None and only.internal("x") == "x" and one.max_sessions == 20
