"""Constrained decoding: a reply that must be JSON matching a schema, by llguidance's token masks.

A schema is compiled once into a grammar (`compile_schema`, cached by its text); each reply gets its own
`Constraint`, a matcher that says which tokens may come next (`mask`) and follows the tokens sampled (`feed`).
Rows of one batch each carry their own constraint, so a step can hold rows with different schemas and rows with
none. JSON is written compactly (", " and ": " between items, no other whitespace): a small model offered free
whitespace can spend its whole reply on newlines.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import llguidance
import llguidance.hf
import torch
from transformers import PreTrainedTokenizerBase

from chatrt.errors import SchemaError

ANY_OBJECT: dict[str, Any] = {"type": "object"}
"""OpenAI's `json_object`: any JSON object."""

_BIT = torch.arange(8, dtype=torch.uint8)  # a mask byte's bits, lowest first
_COMPACT: llguidance.JsonCompileOptions = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def schema_of(response_format: Any) -> dict[str, Any] | None:
    """The JSON schema a turn's `response_format` asks for (None: free text). It takes a pydantic model class,
    OpenAI's `{"type": "json_schema", "json_schema": {"schema": ...}}`, `{"type": "json_object"}` or
    `{"type": "text"}`, or a JSON schema itself."""
    if response_format is None:
        return None
    if isinstance(response_format, type) and hasattr(response_format, "model_json_schema"):
        return response_format.model_json_schema()
    if not isinstance(response_format, Mapping):
        raise SchemaError("response_format takes a pydantic model class, a JSON schema, or OpenAI's response_format "
                          f"object, not {type(response_format).__name__}")  # fmt: skip
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return ANY_OBJECT
    if kind == "json_schema":
        inner = response_format.get("json_schema") or {}
        schema = inner.get("schema") if isinstance(inner, Mapping) else None
        if not isinstance(schema, Mapping):
            raise SchemaError('response_format of type "json_schema" needs json_schema.schema: the JSON schema')
        return dict(schema)
    return dict(response_format)


@functools.lru_cache(maxsize=256)
def _compiled(schema_text: str) -> str:
    return _valid(llguidance.LLMatcher.grammar_from_json_schema(schema_text, overrides=_COMPACT))


def _valid(grammar: str) -> str:
    """The grammar, when llguidance can use it; else ValueError with its first error (warnings are no failure)."""
    failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if failed:
        raise ValueError(messages[0])
    return grammar


def closed(schema: Any) -> Any:
    """The schema with every object that lists its properties closed to others, unless it says otherwise (as
    xgrammar's strict mode and OpenAI's strict schemas do): a pydantic model's schema leaves them open, and a
    small model then invents keys until its tokens run out."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, Mapping):
        return schema
    out = {k: closed(v) for k, v in schema.items()}
    if isinstance(out.get("properties"), dict) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def compile_schema(schema: Mapping[str, Any], what: str = "response_format: the JSON schema") -> str:
    """The schema, closed, as an llguidance grammar; a schema it cannot compile is a SchemaError that says why
    (`what`: the schema, as the message names it)."""
    try:
        text = json.dumps(closed(schema))
    except (TypeError, ValueError) as e:
        raise SchemaError(f"{what} is not JSON: {e}") from None
    try:
        return _compiled(text)
    except ValueError as e:
        raise SchemaError(f"{what} cannot be used: {e}") from None


@dataclass(frozen=True)
class Lazy:
    """A grammar that holds from where the reply writes `trigger` on (a compiled grammar that begins with it);
    with no trigger, from the reply's first token."""

    trigger: str
    grammar: str


def compile_calls(trigger: str, end: str, schema: Mapping[str, Any], *, many: bool = True) -> Lazy:
    """Blocks `trigger` JSON `end` (one or more; one alone unless `many`; a newline allowed inside each, and
    between them), the JSON valid under `schema`, written compactly: the Hermes-style tool calls a model may write
    after its text."""
    try:
        body = json.dumps({**closed(schema), "x-guidance": _COMPACT})
    except (TypeError, ValueError) as e:
        raise SchemaError(f"tools: a function's parameters are not JSON: {e}") from None
    lark = "\n".join([
        "start: call (NL? call)*" if many else "start: call",
        f"call: {json.dumps(trigger)} NL? body NL? {json.dumps(end)}",
        f"body: %json {body}",
        'NL: "\\n"',
    ])  # fmt: skip
    try:
        return Lazy(trigger, _compiled_lark(lark))
    except ValueError as e:
        raise SchemaError(f"tools: a function's parameters schema cannot be used: {e}") from None


@functools.lru_cache(maxsize=64)
def _compiled_lark(lark: str) -> str:
    return _valid(llguidance.LLMatcher.grammar_from_lark(lark))


@functools.lru_cache(maxsize=8)
def _tokenizer(tokenizer: PreTrainedTokenizerBase, vocab_size: int, stop_ids: tuple[int, ...]) -> (
    llguidance.LLTokenizer
):
    return llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=list(stop_ids))


class Constraint:
    """One reply's place in its grammar: which tokens may come next, and the tokens that came."""

    def __init__(self, grammar: str, tokenizer: PreTrainedTokenizerBase, vocab_size: int, stop_ids: Iterable[int]):
        """Building the tokenizer's table takes about a second, once per model; matching a grammar, a few ms."""
        self.matcher = llguidance.LLMatcher(_tokenizer(tokenizer, vocab_size, tuple(sorted(stop_ids))), grammar,
                                            log_level=0)  # fmt: skip
        self._check()

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits ([V]) with every token the grammar does not allow next at -inf."""
        self._check()
        words = torch.frombuffer(bytearray(self.matcher.compute_bitmask()), dtype=torch.uint8)  # [ceil(V/32)*4]
        bits = (words.unsqueeze(1) >> _BIT) & 1  # [bytes, 8]: token 8*byte + bit
        allowed = bits.flatten()[: logits.numel()].to(device=logits.device, dtype=torch.bool)
        return logits.masked_fill(~allowed, float("-inf"))

    def feed(self, token: int) -> None:
        """The token sampled (from masked logits, so the grammar takes it)."""
        ok = self.matcher.consume_token(token)
        assert ok, f"the grammar refused token {token} it allowed: {self.matcher.get_error()}"

    @property
    def complete(self) -> bool:
        """The reply so far is a whole match (the end of the turn may come now)."""
        return self.matcher.is_accepting()

    def _check(self) -> None:
        if self.matcher.is_error():
            raise SchemaError(f"response_format: the JSON schema cannot be followed: {self.matcher.get_error()}")


class Triggered:
    """A constraint that holds from where the reply writes its grammar's trigger on, as llama.cpp's lazy grammars:
    before it every token may come; from it, only what the grammar allows. The trigger is looked for in the text
    of the last tokens; the grammar is given the text from the trigger on (the trigger's token may hold more). A
    reply that went on with what the grammar refuses, within that token, goes on free. Without a trigger, the
    grammar holds from the first token."""

    WINDOW = 16  # tokens: more than any trigger's

    def __init__(self, lazy: Lazy, tokenizer: PreTrainedTokenizerBase, vocab_size: int, stop_ids: Iterable[int]):
        self.lazy = lazy
        self._args = (tokenizer, vocab_size, tuple(sorted(stop_ids)))
        # llguidance's own table decodes and tokenizes here: the transformers tokenizer is shared with threads
        # that switch its split_special_tokens flag (see chatrt.template), and this runs on the engine thread
        self.table = _tokenizer(*self._args)
        self.tail: list[int] = []
        self.held: Constraint | None = None if lazy.trigger else Constraint(lazy.grammar, *self._args)
        self.free = False

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits ([V]), masked once the trigger was written."""
        return self.held.mask(logits) if self.held is not None else logits

    def feed(self, token: int) -> None:
        if self.held is not None:
            self.held.feed(token)
            return
        if self.free:
            return
        self.tail = [*self.tail, token][-self.WINDOW :]
        text = self.table.decode_str(self.tail)
        start = text.find(self.lazy.trigger)
        if start < 0:
            return
        held = Constraint(self.lazy.grammar, *self._args)
        ids = self.table.greedy_tokenize(text[start:])
        if all(held.matcher.consume_token(t) for t in ids) and not held.matcher.is_error():
            self.held = held
        else:
            self.free = True
