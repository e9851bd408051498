"""`chatrt serve` as a real subprocess, driven by the official `openai` client: exact replies, sessions by id
and by matching a stateless client's history, the error statuses, and a client that drops its stream."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import openai
import pytest

from chatrt import ChatRuntime, Config
from tests.conftest import live_keys, serve

SYSTEM = "You are a helpful assistant. " * 40  # a long history makes cached_tokens the bulk of every prompt
TOOL = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}
QUESTIONS = ["Hello there!", "What is the sea?", "And the sky?", "Tell me more.", "Thanks, bye."]


@pytest.fixture(scope="module")
def server(tiny_folder):
    with serve(tiny_folder) as url:
        yield url


def model_id(client) -> str:
    return client.models.list().data[0].id


def python_api_turns(tiny_lm, questions, system=SYSTEM):
    """The same conversation through the Python API: each reply's text and its turn stats."""
    with ChatRuntime(tiny_lm, Config().with_values(generation={"max_new_tokens": 12})) as rt:
        s = rt.open_session(system)
        return [s.send(q) for q in questions]


def test_health_readiness_and_the_model_list(server, client):
    base = server.removesuffix("/v1")
    assert httpx.get(f"{base}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{base}/readyz").json()
    assert ready["status"] == "ready" and ready["redis"] == "off"
    assert ready["decode_step"] == "eager"  # engine.compile is off for the test suite
    assert [m.id for m in client.models.list().data] == [ready["model"]]
    assert "chatrt_prompt_tokens_total" in httpx.get(f"{base}/metrics").text


def test_a_stateless_client_gets_exact_replies_and_reuse_from_its_second_turn(client, tiny_lm):
    """The common case: the client resends the whole conversation; chatrt matches it to the session holding it."""
    expected = python_api_turns(tiny_lm, QUESTIONS)
    messages = [{"role": "system", "content": SYSTEM}]
    sessions = set()
    for n, (question, want) in enumerate(zip(QUESTIONS, expected, strict=True)):
        messages.append({"role": "user", "content": question})
        if n % 2:  # streamed and not, alternately
            chunks = list(client.chat.completions.create(model=model_id(client), messages=messages, stream=True,
                                                         stream_options={"include_usage": True}))  # fmt: skip
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            usage = chunks[-1].usage
            sessions.add(chunks[0].model_extra["session_id"])
        else:
            reply = client.chat.completions.create(model=model_id(client), messages=messages)
            text, usage = reply.choices[0].message.content, reply.usage
            sessions.add(reply.model_extra["session_id"])
        assert text == want.text, f"turn {n}"
        assert usage.prompt_tokens == want.stats.prompt_tokens and usage.completion_tokens == len(want.token_ids)
        if n:
            assert usage.prompt_tokens_details.cached_tokens > 0.9 * usage.prompt_tokens, f"turn {n}: {usage}"
        messages.append({"role": "assistant", "content": text})
    assert len(sessions) == 1  # every turn answered by the one session that held the conversation


def test_a_session_id_sends_only_the_new_message(server, client, tiny_lm):
    expected = python_api_turns(tiny_lm, QUESTIONS[:3], system="Be brief.")
    session_id = httpx.post(f"{server}/sessions", json={"system_prompt": "Be brief."}).json()["session_id"]
    for n, (question, want) in enumerate(zip(QUESTIONS[:3], expected, strict=True)):
        reply = client.chat.completions.create(model=model_id(client), messages=[{"role": "user", "content": question}],
                                               extra_headers={"X-Session-Id": session_id})  # fmt: skip
        assert reply.choices[0].message.content == want.text
        prefilled = reply.usage.prompt_tokens - reply.usage.prompt_tokens_details.cached_tokens
        assert prefilled == want.stats.prefilled_tokens, f"turn {n}"
        if n:
            assert prefilled < 20  # the new message and its markup, not the history
    held = httpx.get(f"{server}/sessions/{session_id}").json()
    assert [m["content"] for m in held["messages"][::2]] == QUESTIONS[:3]
    assert httpx.delete(f"{server}/sessions/{session_id}").json()["deleted"] is True
    with pytest.raises(openai.NotFoundError, match="session"):
        client.chat.completions.create(model=model_id(client), messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"session_id": session_id})  # fmt: skip


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
        ({"model": "MODEL", "messages": []}, 400, "messages"),
        ({"model": "MODEL", "messages": [{"role": "assistant", "content": "hi"}]}, 400, "last message"),
        ({"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400,
         "tools"),
        ({"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "tools": [TOOL]}, 400, "tools"),
        ({"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "tools": [TOOL],
          "tool_choice": {"type": "function", "function": {"name": "other"}}}, 400, "tool_choice"),
        ({"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"}, 400,
         "tool_choice"),
        ({"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400, "top_logprobs"),
        ({"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "n": 2, "session_id": "s"}, 400, "n"),
        ({"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "n": 1000}, 400, "n"),
        ({"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "logit_bias": {"x": 5}}, 400,
         "logit_bias"),
        ({"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "logit_bias": {"99999999": 5}}, 400,
         "logit_bias"),
        ({"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "frequency_penalty": 3}, 400,
         "frequency_penalty"),
        ({"model": "MODEL", "messages": [{"role": "user", "content": None}]}, 400, "needs content"),
        ({"model": "MODEL", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None,
          "tool_calls": [{"id": "x"}]}, {"role": "user", "content": "hi"}]}, 400, "function"),
        ({"model": "MODEL", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None,
          "tool_calls": [{"id": "x", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
          {"role": "user", "content": "hi"}]}, 400, "before the results"),
        ({"model": "MODEL", "messages": [{"role": "tool", "content": "r"}]}, 400, "tool_call_id"),
        ({"model": "MODEL", "messages": [{"role": "tool", "content": "r", "tool_call_id": "c"}]}, 400, "did not make"),
        ({"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "temperature": 9}, 400, "temperature"),
        ({"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "session_id": "nope"}, 404, "nope"),
        ({"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "session_id": "a b"}, 400, "session id"),
        ({"model": "MODEL", "messages": [{"role": "user", "content": "word " * 3000}]}, 400, "context"),
        (
            {"model": "MODEL", "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
            400,
            "out of order",
        ),
        # Nothing is coerced, and OpenAI's limits hold.
        ({"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, 400, "stream"),
        ({"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"}, 400, "max_tokens"),
        ({"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "stop": ["a"] * 5}, 400, "stop"),
        ({"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "stop": [""]}, 400, "stop"),
        ({"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "stop": ""}, 400, "stop"),
    ],
)
def test_bad_requests_get_an_openai_shaped_error_with_the_right_status(server, client, body, status, says):
    if body.get("model") == "MODEL":
        body["model"] = model_id(client)
    response = httpx.post(f"{server}/chat/completions", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert says in error["message"] and error["type"] and "Traceback" not in response.text
    if says == "context":
        assert error["code"] == "context_length_exceeded"
    if status == 400 and says not in ("context", "last message", "nope", "session id"):
        assert error["param"], error  # which parameter, as OpenAI says it
    if says in ("n", "tools", "tool_choice", "top_logprobs"):
        assert error["param"] == says and error["code"] == "unsupported_value"


def test_a_fork_goes_on_from_its_parent_and_prefills_only_its_new_message(server, client, tiny_lm):
    """POST /v1/sessions/{id}/fork: the new session answers as the Python API's fork does."""
    with ChatRuntime(tiny_lm, Config().with_values(generation={"max_new_tokens": 12})) as rt:
        s = rt.open_session("Be brief.")
        s.send(QUESTIONS[0])
        want = s.fork().send(QUESTIONS[1])
    parent = httpx.post(f"{server}/sessions", json={"system_prompt": "Be brief."}).json()["session_id"]
    client.chat.completions.create(model=model_id(client), messages=[{"role": "user", "content": QUESTIONS[0]}],
                                   extra_headers={"X-Session-Id": parent})  # fmt: skip
    fork = httpx.post(f"{server}/sessions/{parent}/fork")
    assert fork.status_code == 200, fork.text
    child = fork.json()
    assert child["forked_from"] == parent and child["turns"] == 1 and child["session_id"] != parent
    reply = client.chat.completions.create(model=model_id(client), messages=[{"role": "user", "content": QUESTIONS[1]}],
                                           extra_headers={"X-Session-Id": child["session_id"]})  # fmt: skip
    assert reply.choices[0].message.content == want.text
    assert reply.usage.prompt_tokens - reply.usage.prompt_tokens_details.cached_tokens == want.stats.prefilled_tokens
    assert want.stats.prefilled_tokens < 20  # its new message and the markup around it
    named = httpx.post(f"{server}/sessions/{parent}/fork", json={"session_id": "branch-b"}).json()
    assert named["session_id"] == "branch-b"
    assert httpx.post(f"{server}/sessions/nope/fork").status_code == 404
    for sid in (parent, child["session_id"], "branch-b"):
        assert httpx.delete(f"{server}/sessions/{sid}").status_code == 200


def test_what_the_official_client_sends_is_accepted(server, client, tiny_lm):
    """Any model name; a response's message sent back as `model_dump()` gives (refusal, annotations, audio,
    function_call, tool_calls); every parameter at its neutral value; two system messages; an assistant's null."""
    messages = [{"role": "system", "content": "Be brief."}, {"role": "system", "content": "Answer in English."},
                {"role": "user", "content": QUESTIONS[0]}]  # fmt: skip
    neutral = dict(frequency_penalty=0, presence_penalty=0, logprobs=False, logit_bias={}, n=1, store=False,
                   response_format={"type": "text"}, tools=[], tool_choice="none", metadata={"app": "test"},
                   service_tier="auto", prompt_cache_key="key", stream_options=None)  # fmt: skip
    first = client.chat.completions.create(model="gpt-4o-mini", messages=messages, **neutral)
    assert first.model == model_id(client)  # the name says which model answered
    expected = python_api_turns(tiny_lm, QUESTIONS[:2], system="Be brief.\n\nAnswer in English.")
    assert first.choices[0].message.content == expected[0].text
    messages.append(first.choices[0].message.model_dump())  # the tutorial's pattern: every field, nulls included
    messages.append({"role": "user", "content": QUESTIONS[1]})
    second = client.chat.completions.create(model="anything", messages=messages, parallel_tool_calls=False)
    assert second.choices[0].message.content == expected[1].text
    assert second.usage.prompt_tokens_details.cached_tokens > 0  # its conversation was recognised
    nulled = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None},
              {"role": "user", "content": "ok"}]  # fmt: skip
    assert client.chat.completions.create(model="x", messages=nulled).choices[0].finish_reason  # accepted


def test_n_choices_are_seeded_apart_and_each_goes_on_as_a_conversation(server, client, tiny_lm):
    """n = 3, sampled with a seed: choice k is the Python API's reply with seed + k, whole or streamed; a client
    that goes on with any one of them continues the session that holds it (its whole history cached)."""
    with ChatRuntime(tiny_lm, Config().with_values(generation={"max_new_tokens": 12})) as rt:
        replies = [rt.open_session("Be brief.").send(QUESTIONS[0], temperature=1.0, seed=7 + k) for k in range(3)]
    want = [r.text for r in replies]
    assert len(set(want)) > 1  # sampled apart
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTIONS[0]}]
    reply = client.chat.completions.create(model="m", messages=messages, n=3, temperature=1.0, seed=7)
    assert [c.message.content for c in reply.choices] == want and [c.index for c in reply.choices] == [0, 1, 2]
    assert reply.usage.completion_tokens == sum(r.stats.generated_tokens for r in replies)  # the prompt counted once
    assert reply.usage.prompt_tokens == replies[0].stats.prompt_tokens
    chunks = list(client.chat.completions.create(model="m", messages=messages, n=3, temperature=1.0, seed=7,
                                                 stream=True, stream_options={"include_usage": True}))  # fmt: skip
    streamed = ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == k)
                for k in range(3)]  # fmt: skip
    assert streamed == want  # interleaved, each under its index
    finished = [c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason]
    assert sorted(finished) == [0, 1, 2] and chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    for choice in reply.choices:
        on = [*messages, {"role": "assistant", "content": choice.message.content}, {"role": "user", "content": "ok"}]
        again = client.chat.completions.create(model="m", messages=on)
        assert again.usage.prompt_tokens_details.cached_tokens > reply.usage.prompt_tokens  # its own session


def test_penalties_and_logit_bias_are_honoured_as_the_python_api_does(server, client, tiny_lm):
    options = {"frequency_penalty": 1.5, "presence_penalty": 0.5, "logit_bias": {198: -100, 30: 2.5}}
    with ChatRuntime(tiny_lm, Config().with_values(generation={"max_new_tokens": 12})) as rt:
        plain = rt.open_session("Be brief.").send(QUESTIONS[0])
        want = rt.open_session("Be brief.").send(QUESTIONS[0], **options)
        forced = rt.open_session("Be brief.").send(QUESTIONS[0], logit_bias={30: 100})
    assert want.token_ids != plain.token_ids and 198 not in want.token_ids
    assert set(forced.token_ids) == {30}  # a bias of 100 all but forces the token
    counts = [want.token_ids.count(t) for t in set(want.token_ids)]
    assert max(counts) <= max(plain.token_ids.count(t) for t in set(plain.token_ids))  # fewer repeats
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTIONS[0]}]
    reply = client.chat.completions.create(model="m", messages=messages, frequency_penalty=1.5, presence_penalty=0.5,
                                           logit_bias={"198": -100, "30": 2.5})  # fmt: skip
    assert reply.choices[0].message.content == want.text


def test_errors_and_discovery_request_ids_and_the_published_schema(server, client):
    echoed = httpx.get(f"{server}/models", headers={"x-request-id": "my-trace.42"})
    assert echoed.headers["x-request-id"] == "my-trace.42"
    made = httpx.post(f"{server}/chat/completions", json={"model": "m", "messages": []})
    assert made.status_code == 400 and made.headers["x-request-id"].startswith("req_")
    assert made.json()["error"]["param"] == "messages"
    odd = httpx.get(f"{server}/models", headers={"x-request-id": "no spaces\tor tabs"}).headers["x-request-id"]
    assert odd.startswith("req_")  # not echoed: only letters, digits and ._:- are
    schema = httpx.get(server.removesuffix("/v1") + "/openapi.json").json()
    body = schema["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    chat = schema["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]]
    assert {"model", "messages", "frequency_penalty", "session_id"} <= set(chat["properties"])
    assert "/v1/sessions/{session_id}/fork" in schema["paths"] and "ChatCompletion" in schema["components"]["schemas"]


def test_model_aliases_and_a_strict_model_name(tiny_folder):
    with serve(tiny_folder, SERVE__MODEL_ALIASES='["gpt-4o-mini"]', SERVE__STRICT_MODEL="true") as url:
        c = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        names = [m.id for m in c.models.list().data]
        assert len(names) == 2 and names[1] == "gpt-4o-mini"
        hi = [{"role": "user", "content": "hi"}]
        assert c.chat.completions.create(model="gpt-4o-mini", messages=hi).model == names[0]
        with pytest.raises(openai.NotFoundError) as refused:
            c.chat.completions.create(model="gpt-3.5-turbo", messages=hi)
        assert refused.value.body["param"] == "model" and refused.value.body["code"] == "model_not_found"


def test_a_client_that_disconnects_mid_stream_leaves_a_consistent_session(server, client):
    session_id = httpx.post(f"{server}/sessions", json={}).json()["session_id"]
    body = {"model": model_id(client), "messages": [{"role": "user", "content": "Tell me a long story"}],
            "stream": True, "max_tokens": 500, "session_id": session_id}  # fmt: skip
    received = ""
    with httpx.stream("POST", f"{server}/chat/completions", json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                received += json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                if len(received) > 20:
                    break  # the connection is closed here
    held = httpx.get(f"{server}/sessions/{session_id}").json()
    for _ in range(100):  # the server notices the disconnect at its next piece
        if held["messages"]:
            break
        threading.Event().wait(0.05)
        held = httpx.get(f"{server}/sessions/{session_id}").json()
    roles = [m["role"] for m in held["messages"]]
    reply = held["messages"][-1]["content"]
    assert roles == ["user", "assistant"] and reply.startswith(received) and held["stats"]["turns"] == 1
    # The session goes on from the recorded reply: its KV (cut where the stream was) is reused.
    got = client.chat.completions.create(model=model_id(client), messages=[{"role": "user", "content": "Go on"}],
                                         extra_headers={"X-Session-Id": session_id})  # fmt: skip
    assert got.usage.prompt_tokens_details.cached_tokens > 0
    held = httpx.get(f"{server}/sessions/{session_id}").json()
    assert [m["role"] for m in held["messages"]] == ["user", "assistant"] * 2 and held["stats"]["turns"] == 2


def test_limits_api_key_body_size_and_overload(tiny_folder):
    settings = {"SERVE__API_KEY": "sekret", "SERVE__MAX_BODY_BYTES": 2000, "SERVE__MAX_WAITING": 0,
                "ENGINE__MAX_BATCH": 1}  # fmt: skip
    with serve(tiny_folder, max_new_tokens=400, **settings) as url:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
        c = openai.OpenAI(base_url=url, api_key="sekret", max_retries=0)
        model = c.models.list().data[0].id
        with pytest.raises(openai.APIStatusError) as big:
            c.chat.completions.create(model=model, messages=[{"role": "user", "content": "x" * 3000}])
        assert big.value.status_code == 413
        # One request runs (max_batch 1, no queue): a second one at the same time is refused with Retry-After.
        first = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "a long one"}],
                                          stream=True)  # fmt: skip
        next(iter(first))
        response = httpx.post(f"{url}/chat/completions", headers={"Authorization": "Bearer sekret"},
                              json={"model": model, "messages": [{"role": "user", "content": "me too"}]})  # fmt: skip
        first.close()
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert response.json()["error"]["type"] == "overloaded_error"


def test_delete_frees_every_tier_and_a_session_held_elsewhere_is_409(tiny_folder, tiny_lm, redis_url, redis_client):
    with serve(tiny_folder, TIERS__REDIS_URL=redis_url, TIERS__DEVICE_BYTES=1, TIERS__HOST_BYTES=1) as url:
        c = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        model = c.models.list().data[0].id
        sid = httpx.post(f"{url}/sessions", json={"session_id": "served"}).json()["session_id"]
        c.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], extra_body={"session_id": sid}
        )
        assert any(b":kv:" in k for k in live_keys(redis_client))  # its cache went down to Redis
        assert httpx.delete(f"{url}/sessions/{sid}").status_code == 200
        assert [k for k in live_keys(redis_client) if k.startswith(b"chatrt:{")] == []  # no session key left
        ready = httpx.get(url.removesuffix("/v1") + "/readyz")
        assert ready.json().get("redis") == "ok", ready.text
        # A session another process holds (its lease) is a conflict, not an error of the server's.
        config = Config().with_values(tiers={"redis_url": redis_url})
        with ChatRuntime(tiny_lm, config) as other:
            other.open_session(session_id="elsewhere").send("mine")
            with pytest.raises(openai.ConflictError, match="in use"):
                c.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                          extra_headers={"X-Session-Id": "elsewhere"})  # fmt: skip


def test_the_bundled_model_served_answers_as_the_python_api_does(bundled_runtime):
    questions = ["What is the capital of France?", "And of Italy?"]
    session = bundled_runtime.open_session("You are a geography teacher.")
    expected = [session.send(q) for q in questions]
    with serve("bundled", max_new_tokens=24) as url:
        c = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        model = c.models.list().data[0].id
        messages = [{"role": "system", "content": "You are a geography teacher."}]
        for n, (question, want) in enumerate(zip(questions, expected, strict=True)):
            messages.append({"role": "user", "content": question})
            reply = c.chat.completions.create(model=model, messages=messages)
            assert reply.choices[0].message.content == want.text
            assert reply.usage.prompt_tokens_details.cached_tokens == (
                want.stats.reused_session_tokens + (want.stats.reused_prefix_tokens if n else 0)
            )
            messages.append({"role": "assistant", "content": reply.choices[0].message.content})


def test_a_stateless_edit_or_regenerate_of_an_earlier_turn_reuses_the_conversation_up_to_it():
    """The issue's measure on the bundled model: a stateless client's edit of turn 2 of 4 gets at least as many
    cached tokens as turn 2 itself had (the conversation before it, from the session that holds all four)."""
    questions = ["What is the capital of France?", "And of Italy?", "And of Spain?", "And of Portugal?"]
    with serve("bundled", max_new_tokens=16) as url:
        c = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        model = c.models.list().data[0].id
        messages, cached = [{"role": "system", "content": "You are a geography teacher."}], []
        for question in questions:
            messages.append({"role": "user", "content": question})
            reply = c.chat.completions.create(model=model, messages=messages)
            cached.append(reply.usage.prompt_tokens_details.cached_tokens)
            messages.append({"role": "assistant", "content": reply.choices[0].message.content})
        turn_2 = messages[:3]  # the system prompt and turn 1
        for last in ("And of Germany?", questions[1]):  # an edit of turn 2, then a regenerate of it
            again = c.chat.completions.create(model=model, messages=[*turn_2, {"role": "user", "content": last}])
            assert again.usage.prompt_tokens_details.cached_tokens >= cached[1], (last, cached)


def test_a_stop_string_before_any_text_ends_the_reply_empty_streamed_and_not(server, client, tiny_lm):
    """The first piece of the reply holds the stop string: a finish chunk with finish_reason "stop" and [DONE]
    (streamed), an empty reply with no completion tokens, and the session's next turn exact."""
    with ChatRuntime(tiny_lm, Config().with_values(generation={"max_new_tokens": 12})) as rt:
        stop = next(iter(rt.open_session().stream("Hi!")))
    assert stop
    model = model_id(client)
    plain = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi!"}], stop=[stop])
    assert plain.choices[0].message.content == "" and plain.choices[0].finish_reason == "stop"
    assert plain.usage.completion_tokens == 0
    body = {"model": model, "messages": [{"role": "user", "content": "Hi!"}], "stop": [stop], "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    with httpx.stream("POST", f"{server}/chat/completions", json=body) as response:
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == ""
    assert [c["choices"][0].get("finish_reason") for c in chunks if c["choices"]][-1] == "stop"
    assert chunks[-1]["usage"]["completion_tokens"] == 0
    held = httpx.get(f"{server}/sessions/{chunks[-1]['session_id']}").json()
    assert held["messages"] == [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": ""}]
    messages = [*held["messages"], {"role": "user", "content": "Go on"}]
    again = client.chat.completions.create(model=model, messages=messages)
    assert again.usage.prompt_tokens_details.cached_tokens > 0  # the session that holds it answered
    with ChatRuntime(tiny_lm, Config().with_values(generation={"max_new_tokens": 12})) as rt:
        s = rt.open_session(messages=held["messages"])
        assert again.choices[0].message.content == s.send("Go on").text


def test_a_lone_surrogate_is_named_as_such(server, client):
    body = json.dumps({"model": model_id(client), "messages": [{"role": "user", "content": "a @ b"}]})
    body = body.replace("@", "\\ud800")  # json.dumps would not write a lone surrogate escape
    response = httpx.post(f"{server}/chat/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400 and "lone surrogate" in response.json()["error"]["message"]
    paired = body.replace("\\ud800", "\\ud83d\\ude00")  # a surrogate pair is a character like any other
    assert httpx.post(f"{server}/chat/completions", content=paired).status_code == 200


def test_a_body_that_ends_early_is_one_log_line(tiny_folder):
    """A client that sends less than its Content-Length and leaves: one warning, no traceback."""
    with serve(tiny_folder) as url:
        host, port = url.removeprefix("http://").removesuffix("/v1").split(":")
        for _ in range(3):
            with socket.create_connection((host, int(port))) as sock:
                sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 1000\r\n\r\n{\"model\": ")  # fmt: skip
        assert httpx.get(url.removesuffix("/v1") + "/healthz").status_code == 200
        deadline = time.monotonic() + 10
        while url.printed().count("the client left after") < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        text = url.printed()
        assert text.count("the client left after") == 3 and "Traceback" not in text


def test_the_bearer_scheme_is_case_insensitive_and_readyz_shows_the_pid_only_with_the_key(tiny_folder):
    with serve(tiny_folder, SERVE__API_KEY="sekret") as url:
        base = url.removesuffix("/v1")
        for scheme in ("Bearer", "bearer", "BEARER"):
            assert httpx.get(f"{url}/models", headers={"Authorization": f"{scheme} sekret"}).status_code == 200
        assert httpx.get(f"{url}/models", headers={"Authorization": "Basic sekret"}).status_code == 401
        assert "pid" not in httpx.get(f"{base}/readyz").json()
        assert "pid" in httpx.get(f"{base}/readyz", headers={"Authorization": "Bearer sekret"}).json()


def test_serve_says_at_start_what_an_open_port_and_an_unsigned_redis_allow(tiny_folder, redis_url):
    with serve(tiny_folder, TIERS__REDIS_URL=redis_url) as url:
        text = " ".join(url.printed().split())  # the console wraps long lines
        assert "no serve.api_key" in text and "without tiers.redis_secret" in text
