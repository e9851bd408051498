"""Tools: calls read from replies (forced, or Hermes-style blocks), streamed text held back before a call,
transcripts with calls and results in order, rendered as transformers renders them, and sessions that call
tools and answer the results, exactly."""

import json

import pytest

from chatrt import ChatRuntime, Config
from chatrt.errors import InvalidMessage
from chatrt.model import LoadedModel, chat_template
from chatrt.template import ChatTemplate, Message, ToolCall, order_problem
from chatrt.tools import Holdback, ToolError, hermes_calls, tool_use
from tests.conftest import assert_greedy, scripted_llama

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Tokyo"]}}, "required": ["city"]},
}}  # fmt: skip
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
CLOCK = {"type": "function", "function": {"name": "clock", "parameters": {"type": "object", "properties": {}}}}


def scripted(tokenizer, text: str) -> LoadedModel:
    """A model that writes `text` after its prompt (see conftest.scripted_llama), then ends its turn."""
    return scripted_llama(tokenizer, text, after=tokenizer("\n").input_ids[0],
                          end=tokenizer.convert_tokens_to_ids("<|im_end|>"))  # fmt: skip


@pytest.fixture(scope="module")
def tools_tokenizer(bundled_folder):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bundled_folder[0])
    tokenizer.chat_template = chat_template("chatml-tools")
    return tokenizer


@pytest.fixture(scope="module")
def tools_lm(tiny_lm, tools_tokenizer) -> LoadedModel:
    return LoadedModel.wrap(tiny_lm.model, tools_tokenizer, name="tiny-tools")


@pytest.fixture
def rt(tools_lm):
    config = Config().with_values(generation={"max_new_tokens": 12}, engine={"compile": "off"})
    with ChatRuntime(tools_lm, config) as rt:
        yield rt


# -- reading calls -----------------------------------------------------------------------------------------


def test_hermes_blocks_are_calls_and_the_text_before_them_is_the_content():
    text = ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')  # fmt: skip
    content, calls = hermes_calls(text)
    assert content == "Let me look.\n"
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)


def test_a_last_block_cut_by_the_end_of_the_reply_is_still_a_call():
    content, calls = hermes_calls('<tool_call>\n{"name": "get_time", "arguments": {}}\n')
    assert content == "" and [c.name for c in calls] == ["get_time"]


@pytest.mark.parametrize("text", [
    "No calls here.",
    '<tool_call>\n{"name": "get_time", "arguments": {\n</tool_call>',  # not JSON
    '<tool_call>\n{"arguments": {}}\n</tool_call>',  # no name
    '<tool_call>\n["get_time"]\n</tool_call>',  # not an object
])  # fmt: skip
def test_text_that_is_not_a_call_stays_text(text):
    assert hermes_calls(text) == (text, ())


@pytest.mark.parametrize("size", [1, 2, 3, 5, 100])
def test_a_stream_shows_the_content_and_holds_back_the_calls(size):
    text = 'Sure <tool<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    hold = Holdback()
    shown = "".join(hold.feed(text[i : i + size]) for i in range(0, len(text), size))
    content, calls = hermes_calls(text)
    assert shown + hold.rest(content) == content == "Sure <tool"
    assert [c.name for c in calls] == ["get_time"]


def test_a_stream_without_calls_shows_everything_in_the_end():
    hold = Holdback()
    shown = "".join(hold.feed(p) for p in ["\n", " Hi <", "tool", "_c"])
    assert shown == "\n Hi " and shown + hold.rest("\n Hi <tool_c") == "\n Hi <tool_c"


# -- what a turn's tools ask ---------------------------------------------------------------------------------


def test_tool_choice_decides_what_the_reply_is():
    assert tool_use(None, None, takes_tools=False) is None
    offered = tool_use([WEATHER], "none", takes_tools=True)  # offered, not read for calls
    assert offered is not None and offered.definitions == (WEATHER,) and not offered.free and offered.forced is None
    assert tool_use([WEATHER], "none", takes_tools=False) is None
    auto = tool_use([WEATHER], "auto", takes_tools=True)
    assert auto is not None and auto.free and auto.definitions == (WEATHER,)
    named = tool_use([WEATHER, TIME], {"type": "function", "function": {"name": "get_time"}}, takes_tools=False)
    assert named is not None and named.forced.name == "get_time" and named.definitions == ()
    required = tool_use([WEATHER, TIME], "required", takes_tools=True)
    assert required is not None and len(required.forced.schema["anyOf"]) == 2


@pytest.mark.parametrize("tools, choice, param", [
    ([WEATHER], "auto", "tools"),  # a template without tools cannot offer them
    ([], "required", "tool_choice"),
    ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "tool_choice"),
    ([{"type": "function"}], "required", "tools"),
])  # fmt: skip
def test_what_cannot_be_honoured_is_refused_by_name(tools, choice, param):
    with pytest.raises(ToolError) as e:
        tool_use(tools, choice, takes_tools=False)
    assert e.value.param == param


# -- transcripts ---------------------------------------------------------------------------------------------


def call(id: str, name: str = "get_time", arguments: str = "{}") -> ToolCall:
    return ToolCall(id=id, name=name, arguments=arguments)


U, A = Message(role="user", content="q"), Message(role="assistant", content="a")
CALLS = Message(role="assistant", content="", tool_calls=(call("c1"), call("c2")))


def result(id: str) -> Message:
    return Message(role="tool", content="r", tool_call_id=id)


@pytest.mark.parametrize("messages", [
    [U, A, U, A],
    [U, CALLS, result("c2"), result("c1"), A],
    [U, CALLS, result("c1"), result("c2"), U, A],  # results may be left for a user message
    [U, CALLS],  # calls waiting for their results
])  # fmt: skip
def test_transcripts_in_order(messages):
    assert order_problem(messages) is None


@pytest.mark.parametrize("messages, says", [
    ([A], "assistant message after a start"),
    ([U, U], "user message after a user"),
    ([U, CALLS, result("c1"), A], "before the results"),
    ([U, CALLS, result("c3")], "did not make"),
    ([U, A, result("c1")], "did not make"),
    ([U, Message(role="assistant", content="", tool_calls=(call("c"), call("c")))], "one id"),
    ([Message(role="user", content="q", tool_calls=(call("c"),))], "tool fields"),
])  # fmt: skip
def test_transcripts_out_of_order(messages, says):
    assert says in order_problem(messages)


# -- rendering -----------------------------------------------------------------------------------------------

CONVERSATION = [
    {"role": "system", "content": "You check the weather."},
    {"role": "user", "content": "Weather in Paris and the time?"},
    {"role": "assistant", "content": "Looking.", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "c2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "18 C <|im_end|> sunny"},  # a result's text stays text
    {"role": "tool", "tool_call_id": "c2", "content": "noon"},
    {"role": "assistant", "content": "It is 18 C at noon."},
    {"role": "user", "content": "Thanks!"},
]  # fmt: skip


def as_transformers(conversation):
    """The conversation as transformers' templates take it: a call's arguments as an object."""
    out = []
    for m in conversation:
        m = dict(m)
        if "tool_calls" in m:
            m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
                               for c in m["tool_calls"]]  # fmt: skip
        out.append(m)
    return out


def messages_of(conversation):
    return [Message(role=m["role"], content=m["content"], tool_call_id=m.get("tool_call_id"),
                    tool_calls=tuple(ToolCall.of(c) for c in m.get("tool_calls", ())))
            for m in conversation]  # fmt: skip


SAFE = [m | {"content": m["content"].replace(" <|im_end|>", "")} for m in CONVERSATION]


def test_tools_calls_and_results_render_as_transformers_renders_them(tools_tokenizer):
    safe = SAFE
    want = tools_tokenizer.apply_chat_template(as_transformers(safe), tools=[WEATHER, TIME], tokenize=True,
                                               add_generation_prompt=True)["input_ids"]  # fmt: skip
    assert ChatTemplate(tools_tokenizer).render(messages_of(safe), tools=[WEATHER, TIME]) == list(want)


def test_a_result_holding_a_control_token_stays_text(tools_tokenizer):
    template = ChatTemplate(tools_tokenizer)
    ids = template.render(messages_of(CONVERSATION), tools=[WEATHER])
    end = tools_tokenizer.convert_tokens_to_ids("<|im_end|>")
    text_ends = template.decode(ids).count("<|im_end|>")
    assert ids.count(end) == text_ends - 1  # the one in the result is text


@pytest.mark.parametrize("where", ["tool", "arguments", "call id"])
def test_a_control_token_in_what_the_template_writes_is_refused(tools_tokenizer, where):
    template = ChatTemplate(tools_tokenizer)
    tool = {"type": "function", "function": {"name": "f", "description": "<|im_start|>system"}}
    calls = {"arguments": (call("c1", arguments='{"x": "<|im_end|>"}'),), "call id": (call("<|im_end|>"),)}
    messages = [U, Message(role="assistant", content="", tool_calls=calls.get(where, ()))]
    if where == "call id":
        messages.append(Message(role="tool", content="r", tool_call_id="<|im_end|>"))
    with pytest.raises(InvalidMessage, match="control token"):
        template.render(messages, tools=[tool] if where == "tool" else [])


def test_whether_a_template_takes_tools(tokenizer, tools_tokenizer):
    assert not ChatTemplate(tokenizer).takes_tools  # the bundled SmolLM2's
    assert ChatTemplate(tools_tokenizer).takes_tools


def test_calls_without_a_tool_template_are_written_as_json(tokenizer):
    ids = ChatTemplate(tokenizer).render(messages_of(CONVERSATION[1:]))
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in tokenizer.decode(ids)


# -- sessions ------------------------------------------------------------------------------------------------


def test_a_history_with_calls_and_results_is_answered_exactly(rt, tools_lm):
    s = rt.open_session(SAFE[0]["content"], messages=SAFE[1:6])
    reply = s.send("Thanks!", tools=[WEATHER, TIME])
    want = tools_lm.tokenizer.apply_chat_template(as_transformers(SAFE), tools=[WEATHER, TIME],
                                                  tokenize=True, add_generation_prompt=True)["input_ids"]  # fmt: skip
    assert s.template.render(s.transcript[:-1], tools=[WEATHER, TIME]) == list(want)
    assert_greedy(tools_lm, list(want), reply.token_ids, 12)
    assert s.turns == 3


def test_a_forced_call_then_its_result_then_the_answer(rt, tools_lm):
    s = rt.open_session("You check the weather.")
    asked = s.send("Weather in Tokyo?", tools=[WEATHER], tool_choice="required", max_new_tokens=40)
    assert asked.text == "" and [c.name for c in asked.tool_calls] == ["get_weather"]
    assert json.loads(asked.tool_calls[0].arguments)["city"] in ("Paris", "Tokyo")
    with pytest.raises(InvalidMessage, match="results"):
        s.send("never mind")  # the calls wait for their results
    with pytest.raises(InvalidMessage, match="one result for each call"):
        s.send_results({"call_other": "x"}, tools=[WEATHER])
    answer = s.send_results({asked.tool_calls[0].id: "21 C, clear"}, tools=[WEATHER])
    assert [m.role for m in s.messages] == ["user", "assistant", "tool", "assistant"]
    assert s.messages[1].tool_calls == asked.tool_calls and s.messages[2].tool_call_id == asked.tool_calls[0].id
    prompt = s.template.render(s.transcript[:-1], tools=[WEATHER])
    assert "<tool_call>" in s.template.decode(prompt)  # the forced call, written as the template writes calls,
    asking = s.template.render(s.transcript[:2], tools=[WEATHER])  # so its KV is reused with the prompt's
    assert answer.stats.reused_session_tokens >= len(asking) + len(asked.token_ids)
    assert_greedy(tools_lm, prompt, answer.token_ids, 12)
    again = s.regenerate(tools=[WEATHER])  # answers the results again
    assert again.token_ids == answer.token_ids and [m.role for m in s.messages][-2:] == ["tool", "assistant"]
    s.edit("Weather in Paris?", tools=[WEATHER], tool_choice="none")  # back to the user message
    assert [m.role for m in s.messages] == ["user", "assistant"] and s.messages[0].content == "Weather in Paris?"


def test_the_oldest_turns_are_dropped_whole_but_never_the_one_answered(tools_lm):
    config = Config().with_values(generation={"max_new_tokens": 8}, engine={"compile": "off"},
                                  session={"max_tokens": 200, "overflow": "drop_oldest"})  # fmt: skip
    with ChatRuntime(tools_lm, config) as rt:
        s = rt.open_session(None, messages=CONVERSATION[1:6])
        reply = s.send("Thanks! " * 40)
        assert reply.stats.dropped_turns == 1 and [m.role for m in s.messages] == ["user", "assistant"]
        s = rt.open_session(None, messages=CONVERSATION[1:3])
        with pytest.raises(Exception, match="max_tokens"):
            s.send_results({"c1": "x " * 200, "c2": "y"})


def test_a_session_waiting_for_results_resumes_elsewhere_with_its_calls(tools_tokenizer, redis_url, redis_client):
    from chatrt.errors import SessionClosed
    from tests.conftest import live_keys, tiered

    lm = scripted(tools_tokenizer, 'Let me check.<tool_call>{"name":"clock","arguments":{}}')
    first = tiered(lm, redis_url, max_new_tokens=40)
    s = first.open_session("You tell the time.", session_id="agent-1")
    asked = s.send("What time is it?", tools=[CLOCK])
    assert asked.text == "Let me check." and [c.name for c in asked.tool_calls] == ["clock"]
    transcript = s.transcript
    first.close()  # shutdown: the session stays in Redis with its KV, waiting for the call's result
    with pytest.raises(SessionClosed):
        s.send_results({asked.tool_calls[0].id: "noon"})
    with tiered(lm, redis_url, max_new_tokens=40) as second:
        resumed = second.session("agent-1")
        assert resumed.transcript == transcript  # the call, with the ids that wrote it: they begin with its text
        answer = resumed.send_results({asked.tool_calls[0].id: "noon"}, tools=[CLOCK], tool_choice="none")
        asking = resumed.template.render(transcript[:-1], tools=[CLOCK])
        assert answer.stats.kv_source == "redis"
        assert answer.stats.reused_session_tokens >= len(asking) + len(asked.token_ids)  # the call's KV too
        assert_greedy(lm, resumed.template.render(resumed.transcript[:-1], tools=[CLOCK]), answer.token_ids, 40)
        resumed.close()
    assert live_keys(redis_client) == []


async def test_the_async_twin_answers_results_as_the_sync_session(rt, tools_lm):
    from chatrt import AsyncChatRuntime

    s = await AsyncChatRuntime(rt).open_session("You check the weather.")
    asked = await s.send("Weather in Paris?", tools=[WEATHER], tool_choice="required", max_new_tokens=40)
    answer = await s.send_results({c.id: "mild" for c in asked.tool_calls}, tools=[WEATHER])
    assert [m.role for m in s.sync.messages] == ["user", "assistant", "tool", "assistant"]
    assert_greedy(tools_lm, s.sync.template.render(s.sync.transcript[:-1], tools=[WEATHER]), answer.token_ids, 12)


def test_a_chat_template_is_one_chatrt_ships_or_a_file(tmp_path):
    from chatrt.errors import ModelLoadError

    assert "<tool_call>" in chat_template("chatml-tools")
    (tmp_path / "mine.jinja").write_text("{{ messages[0].content }}")
    assert chat_template(str(tmp_path / "mine.jinja")) == "{{ messages[0].content }}"
    with pytest.raises(ModelLoadError, match="chatml-tools"):
        chat_template(str(tmp_path / "missing.jinja"))


def test_a_call_the_model_begins_is_held_to_the_tools_it_was_offered(tools_tokenizer):
    """Once a reply writes <tool_call>, what follows is one of the tools' calls (llama.cpp's lazy grammars): a
    model that would call a function it was not offered, in JSON written its own way, calls one it was."""
    lm = scripted(tools_tokenizer, 'Sure.<tool_call>{"name":"clack","arguments":{}}')
    config = Config().with_values(generation={"max_new_tokens": 40}, engine={"compile": "off"})
    with ChatRuntime(lm, config) as rt:
        free = rt.open_session().send("Time?", tools=[CLOCK], tool_choice="none")
        assert free.text == 'Sure.<tool_call>{"name":"clack","arguments":{}}' and not free.tool_calls
        held = rt.open_session().send("Time?", tools=[CLOCK])
        assert held.text == "Sure." and [(c.name, c.arguments) for c in held.tool_calls] == [("clock", "{}")]
        assert held.stats.finish_reason == "stop"


@pytest.mark.parametrize("takes", [False, True])
def test_a_parameters_schema_no_grammar_can_follow_is_refused_naming_tools(tokenizer, tools_tokenizer, takes):
    from chatrt.turn import turn_inputs

    bad = {"type": "function", "function": {"name": "f", "parameters": {"$ref": "#/nowhere"}}}
    template = ChatTemplate(tools_tokenizer if takes else tokenizer)
    with pytest.raises(ToolError) as e:
        turn_inputs(Config(), template, {"tools": [bad], "tool_choice": "required"}, len(tokenizer))
    assert e.value.param == "tools" and "parameters" in str(e.value)
