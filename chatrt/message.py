"""Message: one transcript entry. Apart from the template so that code which only keeps transcripts (the chat
app's store, records) does not load the tokenizer stack."""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict

Role = Literal["system", "user", "assistant", "tool"]


class ToolCall(BaseModel):
    """A call of one of the client's functions that an assistant message makes."""

    model_config = ConfigDict(frozen=True)

    id: str
    name: str
    arguments: str
    """The arguments as JSON text (an object)."""

    @classmethod
    def of(cls, call: object) -> ToolCall:
        """A call as OpenAI's messages carry it (`{"id", "type": "function", "function": {"name", "arguments"}}`,
        the arguments JSON text or an object) or as chatrt's (`{"id", "name", "arguments"}`)."""
        if isinstance(call, ToolCall):
            return call
        if not isinstance(call, dict):
            raise ValueError(f"a tool call is an object with an id and a function, not {call!r:.60}")
        function = call.get("function", call)
        arguments = function.get("arguments", "{}") if isinstance(function, dict) else None
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        name = function.get("name") if isinstance(function, dict) else None
        return cls(id=call.get("id"), name=name, arguments=arguments)  # type: ignore[arg-type]

    def canonical(self) -> tuple[str, str, str]:
        """(id, name, arguments) with the arguments' JSON written one way: clients send back the calls they were
        given, some re-serialized (other spacing, key order, escapes)."""
        try:
            arguments = json.dumps(json.loads(self.arguments), sort_keys=True, ensure_ascii=False)
        except ValueError:
            arguments = self.arguments
        return self.id, self.name, arguments


class Message(BaseModel):
    """One transcript entry. An assistant message keeps the ids the model generated, so the next prompt
    holds exactly the tokens whose KV is cached (re-tokenizing a reply does not always give them back).

    An assistant message that calls tools has its `tool_calls`, and its `content` is only the text before them;
    its `token_ids` are then all it generated, the calls' markup included. Each call is answered by a `tool`
    message naming it by `tool_call_id`."""

    model_config = ConfigDict(frozen=True)

    role: Role
    content: str
    token_ids: tuple[int, ...] | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None

    def digest_form(self) -> tuple[object, ...]:
        """What a client sees of this message and sends back (token ids aside)."""
        return self.role, self.content, [c.canonical() for c in self.tool_calls], self.tool_call_id
