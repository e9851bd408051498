"""Constrained decoding: schemas become grammars, a reply follows its own grammar token by token, rows of one
batch follow different grammars (or none), and logprobs report the model's own distribution."""

from __future__ import annotations

import json
import math
import random
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Literal

import pytest
import torch
from pydantic import BaseModel, Field

from chatrt import ConfigError, SchemaError
from chatrt.config import EngineConfig, GenerationConfig
from chatrt.engine import Engine, Generation, Piece
from chatrt.engine.grammar import ANY_OBJECT, Constraint, Triggered, compile_calls, compile_schema, schema_of

CHOICE = {"type": "object", "properties": {"pick": {"enum": ["sea", "sky"]}, "ok": {"type": "boolean"}},
          "required": ["pick", "ok"], "additionalProperties": False}  # fmt: skip
COUNT = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
         "required": ["n"], "additionalProperties": False}  # fmt: skip


class Point(BaseModel):
    x: int
    label: str = Field(max_length=8)


def test_response_format_takes_a_model_class_openais_objects_or_a_schema():
    assert schema_of(Point) == Point.model_json_schema()
    assert schema_of({"type": "json_schema", "json_schema": {"name": "p", "schema": CHOICE, "strict": True}}) == CHOICE
    assert schema_of({"type": "json_object"}) == ANY_OBJECT
    assert schema_of({"type": "text"}) is None and schema_of(None) is None
    assert schema_of(COUNT) == COUNT
    with pytest.raises(ConfigError, match=r"json_schema\.schema"):
        schema_of({"type": "json_schema", "json_schema": {"name": "p"}})
    with pytest.raises(ConfigError, match="pydantic model class"):
        schema_of("json")
    with pytest.raises(ConfigError, match="cannot be used"):
        compile_schema({"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}})


def test_a_constraint_allows_only_what_continues_the_json(tokenizer):
    vocab = len(tokenizer)
    stop = {tokenizer.convert_tokens_to_ids("<|im_end|>")}
    c = Constraint(compile_schema(CHOICE), tokenizer, vocab, stop)
    logits = torch.zeros(vocab)
    text = ""
    for _ in range(40):
        allowed = torch.isfinite(c.mask(logits)).nonzero().flatten().tolist()
        assert allowed, "the grammar always allows something"
        if c.complete:
            assert set(allowed) <= stop  # a whole object: only the end of the turn may follow
            break
        assert not set(allowed) & stop  # not before
        token = random.Random(len(text)).choice(allowed)
        c.feed(token)
        text += tokenizer.decode([token])
    assert json.loads(text) in ({"pick": p, "ok": b} for p in ("sea", "sky") for b in (True, False)), text


def run(engine: Engine, gens: list[Generation]) -> list[str]:
    requests = [engine.submit(gen) for gen in gens]
    while engine.scheduler.has_work():
        engine.step()
    return ["".join(r.stream()) for r in requests]


def test_rows_of_one_batch_follow_their_own_grammars(tiny_lm):
    """Four rows decode together: two schemas, an any-object row and a free one. A random model's constrained
    replies all parse and validate; the free row is what it is alone."""
    prompt = list(range(300, 340))
    schemas = [CHOICE, COUNT, ANY_OBJECT, None]
    engine = Engine(tiny_lm, EngineConfig(max_batch=4, prefill_chunk=0), thread=False)
    gens = [Generation(tiny_lm, None, prompt, GenerationConfig(max_new_tokens=200, json_schema=s)) for s in schemas]
    texts = run(engine, gens)
    assert engine.rows > engine.steps  # they did share steps
    assert [g.finish_reason for g in gens[:2]] == ["stop", "stop"]  # bounded schemas: whole objects
    choice, count = json.loads(texts[0]), json.loads(texts[1])
    assert choice["pick"] in ("sea", "sky") and isinstance(choice["ok"], bool) and set(choice) == {"pick", "ok"}
    assert set(count) == {"n"} and 0 <= count["n"] <= 99
    assert texts[2].startswith("{")  # any object: a random model may not close it in 200 tokens
    if gens[2].finish_reason == "stop":
        assert isinstance(json.loads(texts[2]), dict)
    free = texts[3]
    alone = Generation(tiny_lm, None, prompt, GenerationConfig(max_new_tokens=200))
    assert run(Engine(tiny_lm, EngineConfig(max_batch=1, prefill_chunk=0), thread=False), [alone]) == [free]


def test_logprobs_are_the_models_own_and_travel_with_each_piece(tiny_lm):
    prompt = list(range(300, 330))
    gen = Generation(tiny_lm, None, prompt, GenerationConfig(max_new_tokens=10, logprobs=3))
    engine = Engine(tiny_lm, EngineConfig(max_batch=1, prefill_chunk=0), thread=False)
    request = engine.submit(gen)
    while engine.scheduler.has_work():
        engine.step()
    pieces = list(request.stream())
    assert all(isinstance(p, Piece) for p in pieces)
    assert [e for p in pieces for e in p.logprobs] == gen.logprobs  # every token told once, in order
    assert [e.token for e in gen.logprobs] == gen.token_ids
    ids = torch.tensor([[*prompt, *gen.token_ids]])
    with torch.no_grad():
        logits = tiny_lm.model(ids).logits[0, len(prompt) - 1 : -1].float()  # [T, V]: the step of each token
    for entry, row in zip(gen.logprobs, torch.log_softmax(logits, -1), strict=True):
        assert math.isclose(entry.logprob, float(row[entry.token]), abs_tol=1e-4)
        assert [t for t, _ in entry.top] == row.topk(3).indices.tolist()
        assert entry.top[0][0] == entry.token  # greedy: the chosen token is the most likely


Name = Annotated[str, Field(max_length=40)]  # real schemas bound what they take; a greedy 135M model needs it


class City(BaseModel):
    name: Name
    country: Name
    population: int = Field(ge=0, le=10**9)


class Recipe(BaseModel):
    title: Name
    ingredients: list[Name] = Field(max_length=6)
    minutes: int = Field(ge=1, le=600)


class Verdict(BaseModel):
    sentiment: Literal["positive", "negative", "neutral"]
    confidence: float = Field(ge=0, le=1)


class Contact(BaseModel):
    name: Name
    email: Name
    phone: Name | None = None


class Event(BaseModel):
    title: Name
    year: int = Field(ge=-3000, le=2100)
    places: list[Name] = Field(max_length=4)


ASKS = [
    (City, ["Paris", "Tokyo", "Cairo", "Lima", "Oslo", "Delhi", "Rome", "Quito", "Seoul", "Accra"],
     "Describe the city of {} as JSON."),
    (Recipe, ["pancakes", "soup", "salad", "bread", "curry", "pasta", "tea", "rice", "pie", "stew"],
     "Give a short recipe for {} as JSON."),
    (Verdict, ["I love it", "This is awful", "It is fine", "Best day ever", "I am sad", "Meh", "Great job",
               "Terrible service", "Nothing special", "Wonderful"], "Classify the sentiment of: {}"),
    (Contact, ["Ann", "Bob", "Chen", "Dana", "Eli", "Fay", "Gus", "Hana", "Ivan", "Jo"],
     "Make up contact details for {} as JSON."),
    (Event, ["the moon landing", "the fall of Rome", "the first Olympics", "the printing press", "the Titanic",
             "the Eiffel Tower", "the Renaissance", "the internet", "the steam engine", "the telephone"],
     "Describe {} as a historical event in JSON."),
]  # fmt: skip


@pytest.mark.bundled
def test_fifty_schema_constrained_replies_on_the_bundled_model_all_validate(bundled_runtime):
    """Five schemas, ten prompts each, sent by 50 sessions at once (the engine batches their rows, each with
    its own grammar): every reply parses and validates against its model."""
    jobs = [(model, ask.format(topic)) for model, topics, ask in ASKS for topic in topics]

    def send(job: tuple[type[BaseModel], str]) -> tuple[type[BaseModel], str, str]:
        model, text = job
        reply = bundled_runtime.open_session("You answer in JSON.").send(text, response_format=model,
                                                                           max_new_tokens=160)  # fmt: skip
        return model, reply.text, reply.stats.finish_reason

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(send, jobs))
    assert len(results) == 50
    bad = [(model.__name__, text) for model, text, reason in results if reason != "stop"]
    print(f"{50 - len(bad)} of 50 ended by themselves", *bad, sep="\n")
    for model, text, _ in results:
        model.model_validate_json(text)


def test_a_session_refuses_a_bad_schema_when_asked_and_answers_a_good_one(runtime):
    s = runtime.open_session("Be brief.")
    with pytest.raises(SchemaError, match="cannot be used"):
        s.stream("hi", response_format={"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}})
    assert s.messages == []  # nothing was sent
    reply = s.send("hi", response_format=CHOICE, max_new_tokens=60, logprobs=1)
    assert set(json.loads(reply.text)) == {"pick", "ok"}
    assert [e.token for e in reply.logprobs] == list(reply.token_ids)


def test_a_lazy_grammar_holds_from_its_trigger_on(tokenizer):
    lazy = compile_calls("<tool_call>", "</tool_call>", {"type": "object", "properties": {"name": {"const": "f"}},
                                                         "required": ["name"]})  # fmt: skip
    logits = torch.zeros(len(tokenizer))

    def fed(text: str) -> Triggered:
        held = Triggered(lazy, tokenizer, len(tokenizer), {2})
        for token in tokenizer(text, add_special_tokens=False).input_ids:
            assert held.mask(logits) is logits  # nothing is held before the trigger is whole
            held.feed(token)
        return held

    held = fed("Sure, <tool_call>")
    allowed = [tokenizer.decode([i]) for i in (held.mask(logits) > float("-inf")).nonzero().flatten().tolist()]
    assert allowed and all(a.startswith(("\n", "{")) for a in allowed), allowed[:10]  # the call's JSON, next
    assert fed("Sure, <tool_call>)").mask(logits) is logits  # its last token, ">)", went on with what no call
    # can: the reply is left free
