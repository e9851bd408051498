"""The OpenAI chat-completions wire format, as far as chatrt serves it, plus chatrt's session extensions.

Requests take what the official clients send: the fields a response's message carries when it is sent back
(`message.model_dump()`), and every parameter at its neutral value (`frequency_penalty: 0`, `logprobs: false`,
`tools: []`, ...). A value chatrt cannot honour is a 400 that names it (`unsupported`), not a silently different
answer, and no value is coerced (`"stream": "yes"` and `"max_tokens": "5"` are 400s, as in OpenAI's API).
Responses carry the fields the official clients read.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from transformers import PreTrainedTokenizerBase

from chatrt import message
from chatrt.engine import FinishReason, TokenLogprob

STRICT = ConfigDict(extra="forbid", strict=True)
StopString = Annotated[str, Field(min_length=1)]


class FunctionCall(BaseModel):
    name: str
    arguments: str
    """The arguments as JSON text."""


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class SentToolCall(ToolCall):
    """A call as a client sends it back in an assistant message (a streamed one's may keep its index)."""

    model_config = STRICT
    index: int | None = None


class WireMessage(BaseModel):
    model_config = STRICT

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    """Text, or OpenAI's list of content parts (only text parts); an assistant's may be null."""
    name: str | None = None
    tool_calls: list[SentToolCall] | None = None
    """An assistant message's calls, sent back as they came."""
    tool_call_id: str | None = None
    """A tool message's: the call it is the result of."""
    # What a response's message carries, sent back as it came (`messages.append(message.model_dump())`):
    refusal: str | None = None
    annotations: list[Any] | None = None
    audio: Any = None
    function_call: Any = None

    @model_validator(mode="after")
    def _honourable(self) -> WireMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        if (self.tool_call_id is None) == (self.role == "tool"):
            raise ValueError("a tool message, and only a tool message, has a tool_call_id: the id of the call it "
                             "answers")  # fmt: skip
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only an assistant message makes tool_calls")
        if self.function_call is not None:
            raise ValueError("function_call is the deprecated form of a call: send tool_calls")
        if self.audio is not None:
            raise ValueError("audio is not supported: send text")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"only text content parts are supported, not {part.get('type')!r}")
            parts.append(part["text"])
        return "".join(parts)


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False
    """vLLM's: usage in every chunk (accepted; chatrt sends it in the last)."""


class ResponseFormat(BaseModel):
    model_config = STRICT

    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class ChatRequest(BaseModel):
    model_config = STRICT

    model: str
    messages: list[WireMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: StopString | Annotated[list[StopString], Field(max_length=4)] | None = None
    """Up to 4 non-empty strings, as OpenAI allows."""
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(1, ge=1)
    frequency_penalty: float | None = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    presence_penalty: float | None = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    # accepted and not used: OpenAI's storage, routing and tiering hints
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    user: str | None = None
    """Narrows a stateless client's matching: its conversations continue only sessions of the same user."""
    cache_salt: str | None = None
    """vLLM's: as `user`, a scope of its own for this client's conversations."""
    # chatrt's extensions (vLLM accepts the same two sampling fields)
    session_id: str | None = None
    """Continue this session: send only the new user message (the X-Session-Id header does the same)."""
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0, allow_inf_nan=False)

    def unsupported(self, vocab_size: int) -> tuple[str, str] | None:
        """The first parameter set to a value chatrt does not honour (yet), and why: (param, message)."""
        checks = [
            ("logit_bias", not all(k.isdigit() and int(k) < vocab_size and -100 <= v <= 100
                                   for k, v in (self.logit_bias or {}).items()),
             f"logit_bias other than the model's token ids (0 to {vocab_size - 1}, as strings) with biases from -100 "
             "to 100"),
            ("top_logprobs", self.top_logprobs is not None and not self.logprobs,
             "top_logprobs without logprobs: true"),
        ]  # fmt: skip
        return next(((param, f"{why} is not supported") for param, bad, why in checks if bad), None)

    def response_schema(self) -> dict[str, Any] | None:
        """The JSON schema the reply must follow, as chatrt's `response_format` option takes it (None: text)."""
        if self.response_format is None or self.response_format.type == "text":
            return None
        return self.response_format.model_dump(exclude_none=True)

    def options(self, choice: int = 0) -> dict[str, Any]:
        """The chatrt turn options this request sets, for its `choice`-th choice (with a seed, each choice is
        seeded apart: seed + choice)."""
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        values = {
            "max_new_tokens": self.max_completion_tokens or self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "repetition_penalty": self.repetition_penalty,
            "frequency_penalty": self.frequency_penalty,
            "presence_penalty": self.presence_penalty,
            "logit_bias": {int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None,
            "seed": self.seed + choice if self.seed is not None else None,
            "stop": tuple(stop) if stop is not None else None,
            "response_format": self.response_schema(),
            "logprobs": (self.top_logprobs or 0) if self.logprobs else None,
            "tools": self.tools or None,
            "tool_choice": self.tool_choice,
        }
        return {k: v for k, v in values.items() if v is not None}


class SessionRequest(BaseModel):
    """POST /v1/sessions: open a session (optionally with a history the client kept)."""

    model_config = STRICT

    session_id: str | None = None
    system_prompt: str | None = None
    messages: list[WireMessage] = []


class ForkRequest(BaseModel):
    """POST /v1/sessions/{id}/fork: a new session that goes on from that one as it is now (the body may be empty)."""

    model_config = STRICT

    session_id: str | None = None


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class DeltaToolCall(ToolCall):
    index: int


class ReplyMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: None = None
    tool_calls: list[ToolCall] | None = None


def tool_calls(calls: Sequence[message.ToolCall]) -> list[ToolCall] | None:
    """A reply's calls as OpenAI's messages carry them (None: it makes none)."""
    return [ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments)) for c in calls] or None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ContentLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[ContentLogprob]
    refusal: None = None


def choice_logprobs(tokenizer: PreTrainedTokenizerBase, entries: Sequence[TokenLogprob] | None) -> (
    ChoiceLogprobs | None
):
    """OpenAI's logprobs of a choice (or a chunk): each token's text and UTF-8 bytes, its log-probability, and
    the most likely tokens at its step."""
    if entries is None:
        return None

    def top(token: int, logprob: float) -> TopLogprob:
        text = tokenizer.decode([token])
        return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode("utf-8", "replace")))

    return ChoiceLogprobs(content=[
        ContentLogprob(**top(e.token, e.logprob).model_dump(), top_logprobs=[top(t, lp) for t, lp in e.top])
        for e in entries
    ])  # fmt: skip


class Choice(BaseModel):
    index: int = 0
    message: ReplyMessage
    finish_reason: str
    logprobs: ChoiceLogprobs | None = None


class TurnInfo(BaseModel):
    """chatrt: how the turn was answered (the session's TurnStats, in part)."""

    kv_source: str
    """Where the session's cache came from: device, host, redis, or none (recomputed)."""
    kv_decision: str
    reused_session_tokens: int
    reused_prefix_tokens: int
    ttft_s: float


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    session_id: str
    """chatrt: the session that answered (send it back as X-Session-Id to continue it)."""
    chatrt: TurnInfo


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    session_id: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "chatrt"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def finish_reason(reason: FinishReason, calls: Sequence[message.ToolCall] = (), named: bool = False) -> str:
    """OpenAI's names: a stop token or string is "stop", the token limit "length"; a reply stopped by its
    client never reaches it. A reply that calls tools the model chose ends with "tool_calls", one that calls the
    function the client named with "stop" (as OpenAI's does)."""
    if calls and not named:
        return "tool_calls"
    return "length" if reason == "length" else "stop"
