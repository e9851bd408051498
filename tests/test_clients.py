"""Client libraries as their users set them up, against a real `chatrt serve` of the bundled model: the `openai`
package, langchain-openai and pydantic-ai. Each: plain, streamed, a conversation sent back the library's way,
a model name the server does not serve, and structured output whose result validates against its schema."""

from __future__ import annotations

import json
import math

import openai
import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field
from pydantic_ai import Agent, NativeOutput
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.providers.openai import OpenAIProvider

from tests.conftest import serve

pytestmark = pytest.mark.bundled


class Capital(BaseModel):
    country: str = Field(max_length=40)
    capital: str = Field(max_length=40)


@pytest.fixture(scope="module")
def server():
    with serve("bundled", max_new_tokens=48) as url:
        yield url


ASK = [{"role": "system", "content": "You are a geography teacher."},
       {"role": "user", "content": "What is the capital of France?"}]  # fmt: skip


def test_openai_structured_output_parses_into_the_model(client):
    parsed = client.chat.completions.parse(model="gpt-4o-mini", messages=ASK, response_format=Capital)
    capital = parsed.choices[0].message.parsed
    assert isinstance(capital, Capital) and capital.capital, parsed
    anything = client.chat.completions.create(model="gpt-4o-mini", messages=ASK,
                                              response_format={"type": "json_object"}, max_tokens=200)  # fmt: skip
    assert isinstance(json.loads(anything.choices[0].message.content), dict)
    with pytest.raises(openai.BadRequestError) as bad:  # a schema that cannot be followed, named
        client.chat.completions.create(model="m", messages=ASK, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}})  # fmt: skip
    assert bad.value.body["param"] == "response_format", bad.value.body


WEATHER = {"type": "function", "function": {"name": "weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                          "required": ["city"]}}}  # fmt: skip
TIME = {"type": "function", "function": {"name": "time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}}  # fmt: skip


def test_openai_forced_tool_calls_follow_the_tools_schema(client):
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    named = client.chat.completions.create(model="m", messages=ask, tools=[WEATHER, TIME],
                                           tool_choice={"type": "function", "function": {"name": "weather"}})
    call = named.choices[0].message.tool_calls[0]
    assert named.choices[0].finish_reason == "stop" and named.choices[0].message.content is None
    assert call.function.name == "weather" and isinstance(json.loads(call.function.arguments)["city"], str)
    assert call.id.startswith("call_")
    required = client.chat.completions.create(model="m", messages=ask, tools=[WEATHER, TIME], tool_choice="required")
    call = required.choices[0].message.tool_calls[0]
    assert required.choices[0].finish_reason == "tool_calls" and call.function.name in ("weather", "time")
    json.loads(call.function.arguments)
    chunks = list(client.chat.completions.create(model="m", messages=ask, tools=[WEATHER], tool_choice="required",
                                                 stream=True))  # fmt: skip
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    streamed = [t for d in deltas if d.tool_calls for t in d.tool_calls]
    assert len(streamed) == 1 and streamed[0].function.name == "weather" and not any(d.content for d in deltas)
    cut = client.chat.completions.create(model="m", messages=ask, tools=[WEATHER], tool_choice="required", stop="y")
    assert cut.choices[0].message.tool_calls is None  # ended at a stop string, not by its grammar: text, as it is
    assert json.loads(streamed[0].function.arguments) == json.loads(
        client.chat.completions.create(model="m", messages=ask, tools=[WEATHER], tool_choice="required")
        .choices[0].message.tool_calls[0].function.arguments
    )


def test_openai_logprobs_in_both_shapes_agree(client):
    options = dict(model="m", messages=ASK, logprobs=True, top_logprobs=2, max_tokens=12)
    whole = client.chat.completions.create(**options)
    content = whole.choices[0].logprobs.content
    assert "".join(t.token for t in content) == whole.choices[0].message.content
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob for t in content)
    assert all(t.logprob <= 0 and t.bytes == list(t.token.encode()) for t in content)
    assert all(t.top_logprobs[0].token == t.token for t in content)  # greedy: the chosen one is the likeliest
    streamed = [c for chunk in client.chat.completions.create(**options, stream=True) for c in chunk.choices]
    tokens = [t for c in streamed if c.logprobs for t in c.logprobs.content]
    assert [t.token for t in tokens] == [t.token for t in content]
    assert all(math.isclose(a.logprob, b.logprob, abs_tol=1e-5) for a, b in zip(tokens, content, strict=True))
    plain = client.chat.completions.create(model="m", messages=ASK, max_tokens=4)
    assert plain.choices[0].logprobs is None


@pytest.mark.filterwarnings("ignore:Cannot use method='json_schema'")  # its note that it forces a tool call
def test_langchain_plain_streamed_a_conversation_and_structured_output(server, client):
    chat = ChatOpenAI(model="gpt-3.5-turbo", base_url=server, api_key="unused", max_retries=0, temperature=0)
    history = [SystemMessage("You are a geography teacher."), HumanMessage("What is the capital of France?")]
    first = chat.invoke(history)
    assert first.content == client.chat.completions.create(model="m", messages=ASK).choices[0].message.content
    streamed = "".join(chunk.content for chunk in chat.stream(history))
    assert streamed == first.content
    history += [first, HumanMessage("And of Italy?")]  # the library's way of sending a conversation back
    second = chat.invoke(history)
    assert isinstance(history[2], AIMessage) and second.content
    assert second.usage_metadata["input_token_details"]["cache_read"] > 0  # its conversation was recognised
    newer = ChatOpenAI(model="gpt-4o-mini", base_url=server, api_key="unused", max_retries=0, temperature=0)
    for model in (chat, newer):  # its default: a forced tool call for an older model's name, a JSON schema here
        capital = model.with_structured_output(Capital).invoke(history[:2])
        assert isinstance(capital, Capital) and capital.capital, model.model_name


def test_pydantic_ai_output_by_native_json_or_by_tool_validates(server, client):
    model = OpenAIChatModel("any-name", provider=OpenAIProvider(base_url=server, api_key="unused"))
    agent = Agent(model, output_type=NativeOutput(Capital), system_prompt="You are a geography teacher.")
    result = agent.run_sync("What is the capital of France?")
    assert isinstance(result.output, Capital) and result.output.capital
    by_tool = Agent(model, output_type=Capital, system_prompt="You are a geography teacher.")  # its default: a tool
    assert isinstance(by_tool.run_sync("What is the capital of France?").output, Capital)
    plain = Agent(model, system_prompt="You are a geography teacher.").run_sync("What is the capital of France?")
    assert plain.output == client.chat.completions.create(model="m", messages=ASK).choices[0].message.content
