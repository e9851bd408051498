"""The OpenAI chat-completions wire format, as far as chatrt serves it, plus chatrt's session extensions.

Requests are strict: a field chatrt does not honour (tools, n > 1, logprobs, ...) is a 400 that names it, not a
silently different answer, and no value is coerced (`"stream": "yes"` and `"max_tokens": "5"` are 400s, as in
OpenAI's API). Responses carry the fields the official clients read.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from chatrt.engine import FinishReason

STRICT = ConfigDict(extra="forbid", strict=True)
StopString = Annotated[str, Field(min_length=1)]


class WireMessage(BaseModel):
    model_config = STRICT

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]]
    """Text, or OpenAI's list of content parts (only text parts)."""
    name: str | None = None

    def text(self) -> str:
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

    include_usage: bool = False


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
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    user: str | None = None
    """Narrows a stateless client's matching: its conversations continue only sessions of the same user."""
    cache_salt: str | None = None
    """vLLM's: as `user`, a scope of its own for this client's conversations."""
    # chatrt's extensions (vLLM accepts the same two sampling fields)
    session_id: str | None = None
    """Continue this session: send only the new user message (the X-Session-Id header does the same)."""
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0, allow_inf_nan=False)

    def options(self) -> dict[str, Any]:
        """The chatrt turn options this request sets."""
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        values = {
            "max_new_tokens": self.max_completion_tokens or self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "repetition_penalty": self.repetition_penalty,
            "seed": self.seed,
            "stop": tuple(stop) if stop is not None else None,
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


class ReplyMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: ReplyMessage
    finish_reason: str


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


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None


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


def finish_reason(reason: FinishReason) -> str:
    """OpenAI's names: a stop token or string is "stop", the token limit "length"; a reply stopped by its
    client never reaches it."""
    return "length" if reason == "length" else "stop"
