"""Tools a turn may call: the client's functions, what `tool_choice` asks of the reply, and the calls read back
from it.

    forced  `tool_choice` names a function, or is "required": the reply is constrained to JSON that follows the
            function's parameters schema (for "required": one of the functions' name and arguments), as vLLM
            does. Needs no tool-aware template, so it works with any model. With a template that takes tools,
            the reply is constrained to a call block as the template writes calls (`<tool_call>` JSON
            `</tool_call>`), so later prompts hold it as the model wrote it, and its KV is reused.
    auto    the model decides: the functions go into the prompt through a chat template that takes `tools`, and
            calls are read from Hermes-style blocks in its text, `<tool_call>{"name": ..., "arguments": ...}
            </tool_call>` (vLLM's hermes parser; Qwen2.5, Qwen3 and Hermes models write them, and chatrt's
            shipped `chatml-tools` template asks any ChatML model for them). Once the reply writes `<tool_call>`,
            what follows is held to one of the tools' calls by a grammar (llama.cpp's lazy grammars). A template
            that takes no tools cannot offer them: auto is refused, saying so.
    none    the functions are offered all the same (as vLLM does: the prompt does not change with the choice),
            and nothing is read from the reply.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from chatrt.engine.grammar import Lazy, compile_calls
from chatrt.errors import ConfigError, SchemaError
from chatrt.message import ToolCall

ARGUMENTS_ANY: dict[str, Any] = {"type": "object"}
CALL_START, CALL_END = "<tool_call>", "</tool_call>"
_CALLS = re.compile(rf"{CALL_START}(.*?)(?:{CALL_END}|\Z)", re.DOTALL)


class ToolError(ConfigError):
    """A `tools` or `tool_choice` value that cannot be honoured; `param` names which."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ForcedTool:
    """What the reply must be: the arguments of `name`, or (name None) one call of any of the tools."""

    schema: dict[str, Any]
    name: str | None


@dataclass(frozen=True)
class ToolUse:
    """A turn's tools: the definitions its prompt offers (none when the template takes none), and how calls are
    read from the reply."""

    definitions: tuple[dict[str, Any], ...]
    forced: ForcedTool | None
    calls: Lazy | None = None
    """The grammar of the call blocks the reply may write: for calls the model chooses, held from where it
    begins one (one of the tools, with arguments valid under its parameters schema), as llama.cpp's lazy
    grammars; for a forced call under a template that takes tools, from the first token."""

    def read(self, text: str, finished: bool) -> tuple[str, tuple[ToolCall, ...]]:
        """The reply's text before its calls, and the calls it makes. `finished`: the reply ended by itself (not
        at the token limit, a stop string or a cancel): only then is a forced reply a whole call."""
        if self.forced is not None:
            if not finished:
                return text, ()
            if self.calls is not None:  # written as a call block
                return hermes_calls(text)
            if self.forced.name is not None:
                return "", (ToolCall(id=call_id(), name=self.forced.name, arguments=text),)
            call = json.loads(text)
            return "", (ToolCall(id=call_id(), name=call["name"], arguments=_json(call["arguments"])),)
        return hermes_calls(text) if self.calls is not None else (text, ())

    @property
    def free(self) -> bool:
        """The model may call the tools or not (tool_choice "auto"): its text is read for calls as it comes."""
        return self.forced is None and self.calls is not None


def hermes_calls(text: str) -> tuple[str, tuple[ToolCall, ...]]:
    """The text before the first `<tool_call>` and the calls in the blocks from there (the last may be cut by
    the end of the reply); the whole text and no calls when a block is not a call's JSON, as vLLM's parser."""
    start = text.find(CALL_START)
    if start < 0:
        return text, ()
    calls = []
    for block in _CALLS.findall(text, start):
        try:
            call = json.loads(block)
            name, arguments = call["name"], call.get("arguments", {})
        except (ValueError, KeyError, TypeError):
            return text, ()
        if not isinstance(name, str) or not isinstance(arguments, dict):
            return text, ()
        calls.append(ToolCall(id=call_id(), name=name, arguments=_json(arguments)))
    content = text[:start]
    return (content if content.strip() else ""), tuple(calls)


class Holdback:
    """A streamed reply's text up to its first `<tool_call>`: `feed` returns what may be shown now, holding back
    an end that may be the start of one (the calls go out whole once the reply has ended)."""

    def __init__(self) -> None:
        self.text = ""
        self.shown = 0
        self.calling = False

    def feed(self, piece: str) -> str:
        self.text += piece
        if self.calling:
            return ""
        end = self.text.find(CALL_START, max(0, self.shown - len(CALL_START)))
        if end >= 0:
            self.calling = True
        else:  # hold back the longest end of the text that begins the marker
            end = len(self.text) - next((k for k in range(len(CALL_START) - 1, 0, -1)
                                         if self.text.endswith(CALL_START[:k])), 0)  # fmt: skip
        if not self.text[:end].strip():  # leading whitespace waits: before a call it is no content
            return ""
        out, self.shown = self.text[self.shown : end], end
        return out

    def rest(self, content: str) -> str:
        """What is left to show of `content` (the reply's text before its calls) once the reply has ended."""
        assert content.startswith(self.text[: self.shown]), "shown text is the start of the content"
        return content[self.shown :]


def functions(tools: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each function tool's name and parameters schema."""
    found: dict[str, dict[str, Any]] = {}
    for tool in tools:
        function = tool.get("function") if isinstance(tool, Mapping) else None
        named = isinstance(function, Mapping) and isinstance(function.get("name"), str)
        if not named or tool.get("type") != "function":
            raise ToolError("tools", 'tools: each is {"type": "function", "function": {"name": ..., '
                            '"parameters": {...}}}')  # fmt: skip
        parameters = function.get("parameters") or ARGUMENTS_ANY
        if not isinstance(parameters, Mapping):
            raise ToolError("tools", f"the parameters of tool {function['name']!r} are not a JSON schema")
        found[function["name"]] = dict(parameters)
    return found


def tool_use(tools: Sequence[Mapping[str, Any]] | None, choice: str | Mapping[str, Any] | None, *,
             takes_tools: bool) -> ToolUse | None:  # fmt: skip
    """A turn's tools (None: its reply is text). `takes_tools`: the chat template renders tool definitions.
    Raises ToolError for what cannot be honoured."""
    named = functions(tools or [])
    choice = "auto" if choice is None else choice
    if not named:
        if choice not in ("none", "auto"):
            raise ToolError("tool_choice", "tool_choice forces a call, but no tools were sent")
        return None
    definitions = tuple(dict(t) for t in tools or ()) if takes_tools else ()
    if choice == "none":  # offered all the same (as vLLM does), so a prompt does not change with the choice
        return ToolUse(definitions, None) if definitions else None
    calls = [{"type": "object", "properties": {"name": {"const": name}, "arguments": parameters},
              "required": ["name", "arguments"], "additionalProperties": False}
             for name, parameters in named.items()]  # fmt: skip
    one_call = {"anyOf": calls} if len(calls) > 1 else calls[0]  # a call of any of the tools
    if choice == "auto":
        if not takes_tools:
            raise ToolError("tools", "tools with tool_choice auto need a chat template that takes tools, and this "
                            "model's takes none: set model.chat_template (chatrt ships 'chatml-tools' for ChatML "
                            'models such as the bundled one), or force a call with tool_choice "required" or a '
                            "named function")  # fmt: skip
        return ToolUse(definitions, None, call_blocks(one_call, lazy=True))
    if choice == "required":
        return forced_use(definitions, ForcedTool(one_call, None))
    function = choice.get("function") if isinstance(choice, Mapping) else None
    name = function.get("name") if isinstance(function, Mapping) else None
    if not isinstance(name, str):
        raise ToolError("tool_choice", 'tool_choice is "none", "auto", "required" or '
                        '{"type": "function", "function": {"name": ...}}')  # fmt: skip
    if name not in named:
        raise ToolError("tool_choice", f"tool_choice names {name!r}, which is not among the tools sent")
    return forced_use(definitions, ForcedTool(named[name], name), calls[list(named).index(name)])


def forced_use(definitions: tuple[dict[str, Any], ...], forced: ForcedTool, call: dict[str, Any] | None = None) -> (
    ToolUse
):  # fmt: skip
    """A forced call: bare JSON (`forced.schema`) with a template that takes no tools; with one that does, a call
    block as the template writes calls, `call` (default: `forced.schema`, a call of any tool) in it."""
    if not definitions:
        return ToolUse(definitions, forced)
    return ToolUse(definitions, forced, call_blocks(call or forced.schema, lazy=False))


def call_blocks(call: dict[str, Any], *, lazy: bool) -> Lazy:
    """The grammar of `<tool_call>` blocks, each holding a call valid under `call`: held from where the reply
    begins one (`lazy`: as many as it writes), or from its first token (one call: the one forced)."""
    try:
        blocks = compile_calls(CALL_START, CALL_END, call, many=lazy)
    except SchemaError as e:
        raise ToolError("tools", str(e)) from None
    return blocks if lazy else Lazy("", blocks.grammar)


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _json(value: object) -> str:
    return json.dumps(value, ensure_ascii=False)
