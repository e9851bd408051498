"""Tool use through a real `chatrt serve` and the official client: calls a model writes on its own (auto), read
from its Hermes-style blocks, whole and streamed with the text before them shown and the markup held back; and
the agent loop (a call, its result sent back, the answer) matched to the session that holds it, exactly.

A model that writes calls on cue is needed for the first: `scripted_llama`, a real Llama whose weights write one
fixed reply, a call, after its prompt. The loop runs on the bundled model, whose calls are forced."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch
from langchain_core.messages import HumanMessage, ToolMessage
from langchain_openai import ChatOpenAI
from transformers import AutoModelForCausalLM, AutoTokenizer

from chatrt import ChatRuntime, Config
from chatrt.model import LoadedModel, chat_template
from tests.conftest import scripted_llama, serve

SCRIPT = 'Let me check.<tool_call>{"name":"clock","arguments":{}}'
CLOCK = {"type": "function", "function": {"name": "clock", "description": "The time now",
         "parameters": {"type": "object", "properties": {}}}}  # fmt: skip
ASK = [{"role": "user", "content": "What time is it?"}]


@pytest.fixture(scope="module")
def scripted_folder(tokenizer, tmp_path_factory):
    lm = scripted_llama(tokenizer, SCRIPT, after=tokenizer("\n").input_ids[0],
                        end=tokenizer.convert_tokens_to_ids("<|im_end|>"))  # fmt: skip
    folder = tmp_path_factory.mktemp("scripted")
    lm.model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def server(scripted_folder):
    with serve(scripted_folder, max_new_tokens=40, MODEL__CHAT_TEMPLATE="chatml-tools", ENGINE__COMPILE="off") as url:
        yield url


def test_a_call_the_model_writes_is_a_tool_call(client):
    message = client.chat.completions.create(model="any", messages=ASK, tools=[CLOCK])
    choice = message.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    [call] = choice.message.tool_calls
    assert call.function.name == "clock" and json.loads(call.function.arguments) == {} and call.id.startswith("call_")


def test_a_streamed_call_shows_the_text_and_holds_back_the_markup(client):
    content, calls, reasons = [], [], []
    for chunk in client.chat.completions.create(model="any", messages=ASK, tools=[CLOCK], stream=True):
        for c in chunk.choices:
            content.append(c.delta.content or "")
            calls += c.delta.tool_calls or []
            reasons.append(c.finish_reason)
    assert "".join(content) == "Let me check." and not any("<" in piece for piece in content)
    assert [c.function.name for c in calls] == ["clock"] and reasons[-1] == "tool_calls"


def test_without_tools_the_same_text_is_text(client):
    for tools in ({}, {"tools": [CLOCK], "tool_choice": "none"}):
        choice = client.chat.completions.create(model="any", messages=ASK, **tools).choices[0]
        assert choice.message.tool_calls is None and choice.finish_reason == "stop"
        assert choice.message.content == SCRIPT  # the scripted model writes its script, offered tools or not


def test_the_result_sent_back_continues_the_session_that_made_the_call(server, client):
    first = client.chat.completions.create(model="any", messages=ASK, tools=[CLOCK])
    call = first.choices[0].message.tool_calls[0]
    result = {"role": "tool", "tool_call_id": call.id, "content": "noon"}
    history = [*ASK, first.choices[0].message.model_dump(), result]
    second = client.chat.completions.create(model="any", messages=history, tools=[CLOCK])
    info = second.model_extra["chatrt"]
    assert info["kv_source"] == "device" and second.model_extra["session_id"] == first.model_extra["session_id"]
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
    assert second.choices[0].message.tool_calls[0].function.name == "clock"  # the script again
    session = httpx.get(f"{server}/sessions/{second.model_extra['session_id']}").json()
    assert [m["role"] for m in session["messages"]] == ["user", "assistant", "tool", "assistant"]
    asked, answered = session["messages"][1:3]
    assert asked["tool_calls"][0]["id"] == call.id and answered["tool_call_id"] == call.id


def test_results_for_calls_that_were_not_made_are_refused(server, client):
    first = client.chat.completions.create(model="any", messages=ASK, tools=[CLOCK])
    result = {"role": "tool", "tool_call_id": "call_other", "content": "x"}
    history = [*ASK, first.choices[0].message.model_dump(), result]
    response = httpx.post(f"{server}/chat/completions", json={"model": "any", "messages": history})
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages", response.text
    assert "did not make" in response.json()["error"]["message"]


# -- the agent loop on the bundled model -------------------------------------------------------------------

WEATHER = {"type": "function", "function": {"name": "weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Tokyo", "Lima"]}},
                          "required": ["city"]}}}  # fmt: skip
QUESTION = [{"role": "system", "content": "You are a weather assistant."},
            {"role": "user", "content": "What is the weather in Tokyo?"}]  # fmt: skip


@pytest.fixture(scope="module")
def bundled_tools_server():
    with serve("bundled", max_new_tokens=24, MODEL__CHAT_TEMPLATE="chatml-tools", ENGINE__COMPILE="off") as url:
        yield url


@pytest.mark.bundled
def test_the_bundled_model_calls_a_tool_and_answers_its_result_exactly(bundled_tools_server, bundled_folder):
    client = openai.OpenAI(base_url=bundled_tools_server, api_key="unused", max_retries=0)
    first = client.chat.completions.create(model="gpt-4o-mini", messages=QUESTION, tools=[WEATHER],
                                           tool_choice="required", max_tokens=64)  # fmt: skip
    [call] = first.choices[0].message.tool_calls
    assert first.choices[0].finish_reason == "tool_calls" and call.function.name == "weather"
    history = [*QUESTION, first.choices[0].message.model_dump(),
               {"role": "tool", "tool_call_id": call.id, "content": "Rain, 14 C"}]  # fmt: skip
    second = client.chat.completions.create(model="gpt-4o-mini", messages=history, tools=[WEATHER])
    assert second.model_extra["chatrt"]["kv_source"] == "device"
    # The first prompt and the call: forced under a template that takes tools, it is a call block as the template
    # writes them, so the client's resent call renders to the ids the model wrote
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens + first.usage.completion_tokens

    # The Python API, on the same weights and template, answers the same (level 1: one session, eager, float32).

    folder, weights_id = bundled_folder
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = chat_template("chatml-tools")
    lm = LoadedModel.wrap(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), tokenizer,
                          name="bundled", weights_id=weights_id)  # fmt: skip
    config = Config().with_values(generation={"max_new_tokens": 24}, engine={"compile": "off", "max_batch": 1})
    with ChatRuntime(lm, config) as rt:
        s = rt.open_session(QUESTION[0]["content"])
        asked = s.send(QUESTION[1]["content"], tools=[WEATHER], tool_choice="required", max_new_tokens=64)
        assert asked.tool_calls[0].arguments == call.function.arguments
        answer = s.send_results({asked.tool_calls[0].id: "Rain, 14 C"}, tools=[WEATHER])
    assert second.choices[0].message.content == answer.text and not answer.tool_calls


@pytest.mark.bundled
def test_langchain_binds_a_tool_and_sends_its_result_back(bundled_tools_server):
    llm = ChatOpenAI(model="gpt-4o-mini", base_url=bundled_tools_server, api_key="unused", max_retries=0)
    bound = llm.bind_tools([WEATHER], tool_choice="required").bind(max_tokens=64)
    messages = [HumanMessage("What is the weather in Lima?")]
    asked = bound.invoke(messages)
    [call] = asked.tool_calls
    assert call["name"] == "weather" and call["args"]["city"] in ("Paris", "Tokyo", "Lima")
    messages += [asked, ToolMessage("Sunny, 22 C", tool_call_id=call["id"])]
    answer = llm.bind_tools([WEATHER]).invoke(messages)  # langchain writes the call's arguments anew
    assert answer.content and not answer.tool_calls
    assert answer.usage_metadata["input_token_details"]["cache_read"] > 0


@pytest.mark.bundled
def test_the_bundled_model_offered_tools_reads_them_and_may_answer_in_words(bundled_tools_server):
    client = openai.OpenAI(base_url=bundled_tools_server, api_key="unused", max_retries=0)
    plain = client.chat.completions.create(model="m", messages=QUESTION, max_tokens=4)
    offered = client.chat.completions.create(model="m", messages=QUESTION, tools=[WEATHER], max_tokens=24)
    choice = offered.choices[0]
    # The definitions are in the prompt (chatml-tools' system block); the 135M model answers in words here, as
    # text with no calls. A model trained on the format writes <tool_call> blocks (the scripted model's tests).
    assert offered.usage.prompt_tokens > plain.usage.prompt_tokens + 100  # the tools block: its text and WEATHER
    assert choice.finish_reason in ("stop", "length") and choice.message.tool_calls is None and choice.message.content


def test_results_sent_to_a_session_by_id_are_checked_against_its_calls(server, client):
    first = client.chat.completions.create(model="any", messages=ASK, tools=[CLOCK])
    sid, call = first.model_extra["session_id"], first.choices[0].message.tool_calls[0]
    twice = [{"role": "tool", "tool_call_id": call.id, "content": "noon"}] * 2
    response = httpx.post(f"{server}/chat/completions", json={"model": "any", "messages": twice, "session_id": sid})
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages", response.text
    answer = client.chat.completions.create(model="any", messages=twice[:1], tools=[CLOCK],
                                            extra_body={"session_id": sid})  # fmt: skip
    assert answer.model_extra["chatrt"]["kv_source"] == "device" and answer.choices[0].message.tool_calls
