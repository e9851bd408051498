"""Tool calls a client forces (`tool_choice` naming a function, or "required"), answered by constrained decoding
as vLLM does: the reply is JSON that follows the tool's parameters schema (or, for "required", one of the
tools' names with its arguments), and goes back as the message's `tool_calls`. This needs no tool-aware chat
template, so it works with any model. Free tool use (`tool_choice: "auto"`: the model decides, through a
tool-aware template, and its calls are parsed from its text) is not built, and is refused by name.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

ARGUMENTS_ANY: dict[str, Any] = {"type": "object"}


class ToolRequestError(ValueError):
    """A tools or tool_choice value that cannot be honoured: (param, message)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ForcedTool:
    """What the reply must be: the arguments of `name`, or (name None) one call of any of `tools`."""

    schema: dict[str, Any]
    name: str | None

    def calls(self, text: str) -> list[tuple[str, str]]:
        """The (function name, arguments JSON) the reply's text spells."""
        if self.name is not None:
            return [(self.name, text)]
        call = json.loads(text)
        return [(call["name"], json.dumps(call["arguments"], ensure_ascii=False))]


def functions(tools: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each function tool's name and parameters schema."""
    found: dict[str, dict[str, Any]] = {}
    for tool in tools:
        function = tool.get("function")
        named = isinstance(function, dict) and isinstance(function.get("name"), str)
        if tool.get("type") != "function" or not named:
            raise ToolRequestError("tools", 'tools: each is {"type": "function", "function": {"name": ..., '
                                   '"parameters": {...}}}')  # fmt: skip
        parameters = function.get("parameters") or ARGUMENTS_ANY
        if not isinstance(parameters, dict):
            raise ToolRequestError("tools", f"the parameters of tool {function['name']!r} are not a JSON schema")
        found[function["name"]] = parameters
    return found


def forced(tools: list[dict[str, Any]] | None, choice: str | dict[str, Any] | None) -> ForcedTool | None:
    """The call a request forces (None: the reply is text). Raises ToolRequestError for what cannot be honoured."""
    named = functions(tools or [])
    if choice in (None, "none", "auto"):
        if named and choice != "none":
            raise ToolRequestError("tools", "tools with tool_choice auto are not supported: chatrt answers only "
                                   'forced calls; force one with tool_choice "required" or a named function, or '
                                   "send no tools")  # fmt: skip
        return None
    if not named:
        raise ToolRequestError("tool_choice", "tool_choice forces a call, but no tools were sent")
    if choice == "required":
        options = [{"type": "object", "properties": {"name": {"const": name}, "arguments": parameters},
                    "required": ["name", "arguments"], "additionalProperties": False}
                   for name, parameters in named.items()]  # fmt: skip
        return ForcedTool({"anyOf": options} if len(options) > 1 else options[0], None)
    function = choice.get("function") if isinstance(choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise ToolRequestError("tool_choice", 'tool_choice is "none", "auto", "required" or '
                               '{"type": "function", "function": {"name": ...}}')  # fmt: skip
    if name not in named:
        raise ToolRequestError("tool_choice", f"tool_choice names {name!r}, which is not among the tools sent")
    return ForcedTool(named[name], name)


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"
