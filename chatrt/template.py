"""Rendering transcripts to prompt token ids with the model's chat template, safely.

Message text is tokenized as text (never as control tokens); the template's own markup keeps its control tokens.
"""

from __future__ import annotations

import functools
import json
import re
import secrets
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from chatrt.errors import InvalidMessage, TemplateError
from chatrt.message import Message, Role, ToolCall

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["ChatTemplate", "Message", "Role", "ToolCall", "check_text", "check_turns", "decode", "order_problem"]


# transformers' fast tokenizers switch `split_special_tokens` by setting a flag on the shared Rust tokenizer
# for the duration of a call, so two threads encoding at once can each get the other's setting: user text
# would then become control tokens. Every encode goes through this one lock (encoding takes microseconds).
_ENCODE_LOCK = threading.Lock()


def check_turns(messages: list[Message], what: str = "the history") -> list[Message]:
    """`messages` when they are whole turns: valid text, in an order `order_problem` accepts, ending with a
    reply."""
    for m in messages:
        check_text(m.content, "a message")
    problem = order_problem(messages)
    if problem is None and messages and messages[-1].role != "assistant":
        problem = f"it ends with a {messages[-1].role} message, not a reply"
    if problem is not None:
        raise InvalidMessage(f"{what} must be whole turns, a user message then the reply, in order: {problem} (a "
                             "system prompt is passed apart)")  # fmt: skip
    return messages


def order_problem(messages: list[Message]) -> str | None:
    """What is out of order in a transcript (None: nothing). A user message is answered by an assistant
    message; one that calls tools is followed by one tool message per call (by its id), and those results are
    answered by the next assistant message, or left for a user message."""
    last, pending = "start", set[str]()
    for i, m in enumerate(messages):
        if (m.tool_calls and m.role != "assistant") or (m.tool_call_id is not None and m.role != "tool"):
            return f"message {i} is a {m.role} message with tool fields"
        if m.role == "tool":
            if m.tool_call_id not in pending:
                return f"message {i} is the result of call {m.tool_call_id!r}, which the reply before did not make"
            pending.discard(m.tool_call_id)
            last = "results"
            continue
        if pending:
            return f"message {i} comes before the results of the calls {sorted(pending)}"
        if m.role == "user" and last in ("start", "reply", "results"):
            last = "user"
        elif m.role == "assistant" and last in ("user", "results"):
            pending = {c.id for c in m.tool_calls}
            if len(pending) < len(m.tool_calls):
                return f"message {i} makes two tool calls with one id"
            last = "calls" if pending else "reply"
        else:
            return f"message {i} is a {m.role} message after a {last} one"
    return None


def turn_starts(messages: list[Message]) -> list[int]:
    """Where each turn of a transcript begins: at each user message."""
    return [i for i, m in enumerate(messages) if m.role == "user"]


def decode(tokenizer: PreTrainedTokenizerBase, ids: tuple[int, ...] | list[int]) -> str:
    """The text of generated ids, exactly (special tokens and spaces as they are)."""
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def check_text(text: object, what: str) -> str:
    """`text` when it is a str that is valid Unicode; else InvalidMessage saying what to do. NUL and other
    control characters are text like any other (tokenized as text); lone surrogates cannot be encoded at all."""
    if not isinstance(text, str):
        hint = " (decode it first, e.g. data.decode('utf-8'))" if isinstance(text, bytes | bytearray) else ""
        raise InvalidMessage(f"{what} must be text (str), not {type(text).__name__}{hint}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidMessage(
            f"{what} contains a lone surrogate ({text[e.start]!a} at character {e.start}), which is not valid "
            "Unicode; decode the text with errors='replace' or remove it"
        ) from None
    return text


class ChatTemplate:
    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        if not tokenizer.chat_template:
            raise TemplateError("the tokenizer has no chat template; chatrt needs one to render transcripts")
        self.tokenizer = tokenizer
        # A random tag, so no template literal and no message can be mistaken for a placeholder.
        self._tag = f"chatrt{secrets.token_hex(6)}"
        self._placeholder = re.compile(rf"<{self._tag}:(\d+)>")
        self.prefix_ids = functools.lru_cache(maxsize=256)(self._prefix_ids)

    def render(self, messages: list[Message], *, tools: Sequence[Mapping[str, Any]] = (),
               add_generation_prompt: bool = True) -> list[int]:  # fmt: skip
        """Token ids of the prompt: the template's markup with its control tokens, each message's text as text.
        `tools`: function definitions the template offers the model (it must take them: `takes_tools`)."""
        # Each message's content is replaced by a placeholder; the template text between placeholders is
        # tokenized with special tokens recognised and each content piece with them split into plain text.
        # What the template writes itself from the transcript (tool definitions, a call's name and arguments)
        # is markup, so it is refused when it holds a control token's text.
        chat = [self._entry(i, m) for i, m in enumerate(messages)]
        self._check_markup(tools, [c for m in messages if m.token_ids is None for c in m.tool_calls],
                           [m.tool_call_id for m in messages if m.tool_call_id is not None])  # fmt: skip
        try:
            text = self.tokenizer.apply_chat_template(chat, tools=list(tools) or None, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)  # fmt: skip
        except Exception as e:  # jinja raises its own errors for role order etc.
            raise TemplateError(f"the chat template rejected this transcript: {e}") from e
        pieces = self._placeholder.split(text)
        order = [int(i) for i in pieces[1::2]]
        if order != [i for i, m in enumerate(messages) if self._placed(m)]:
            raise TemplateError("the chat template drops, repeats or reorders message content; chatrt cannot render it")
        ids: list[int] = []
        for i, markup in enumerate(pieces[0::2]):
            ids += self._encode(markup, split_special=False)
            if i < len(order):
                m = messages[order[i]]
                ids += list(m.token_ids) if m.token_ids is not None else self._encode(self._text(m), split_special=True)
        return ids

    @functools.cached_property
    def takes_tools(self) -> bool:
        """Whether the template renders tool definitions (a prompt offered one differs from one offered none)."""
        chat = [{"role": "user", "content": "x"}]
        probe = {"type": "function", "function": {"name": "chatrt_probe", "parameters": {"type": "object"}}}
        try:
            with_tool = self.tokenizer.apply_chat_template(chat, tools=[probe], tokenize=False)
        except Exception:  # a template that refuses tools takes none
            return False
        return with_tool != self.tokenizer.apply_chat_template(chat, tokenize=False)

    def _placed(self, m: Message) -> bool:
        """Whether the message's body goes into the prompt through a placeholder (an empty one has none)."""
        return bool(m.token_ids) or bool(self._text(m))

    def _text(self, m: Message) -> str:
        """The message's text as the prompt holds it. A reply kept with its ids is what the model wrote, calls
        and all; a template that takes no tools has no way to show calls, so they are written out as the JSON
        of a forced call."""
        if not m.tool_calls or m.token_ids is not None or self.takes_tools:
            return m.content
        calls = [json.dumps({"name": c.name, "arguments": _arguments(c)}, ensure_ascii=False) for c in m.tool_calls]
        return "\n".join([m.content, *calls] if m.content else calls)

    def _entry(self, i: int, m: Message) -> dict[str, Any]:
        """The message as the template reads it, its body a placeholder."""
        entry: dict[str, Any] = {"role": m.role, "content": f"<{self._tag}:{i}>" if self._placed(m) else ""}
        if m.tool_calls and m.token_ids is None and self.takes_tools:
            entry["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name,
                                    "arguments": _arguments(c)}} for c in m.tool_calls]  # fmt: skip
        if m.tool_call_id is not None:
            entry["tool_call_id"] = m.tool_call_id
        return entry

    def _check_markup(self, tools: Sequence[Mapping[str, Any]], calls: list[ToolCall], call_ids: list[str]) -> None:
        """InvalidMessage when text the template writes as markup holds a control token's text (some templates
        write call ids too)."""
        text = json.dumps([list(tools), [(c.id, c.name, c.arguments) for c in calls], call_ids], ensure_ascii=False)
        if found := next((t for t in self._controls if t in text), None):
            raise InvalidMessage(f"the tools or tool calls hold the control token {found!r}, which the chat template "
                                 "would write as markup; remove it")  # fmt: skip

    @functools.cached_property
    def _controls(self) -> tuple[str, ...]:
        special = {t.content for t in self.tokenizer.added_tokens_decoder.values() if t.special}
        return tuple(sorted(special | set(self.tokenizer.all_special_tokens), key=len, reverse=True))

    def decode(self, ids: tuple[int, ...] | list[int]) -> str:
        return decode(self.tokenizer, ids)

    def spells(self, ids: tuple[int, ...], text: str, *, start: bool = False) -> bool:
        """Whether `ids` are ids of this tokenizer that decode to exactly `text` (`start`: to text that begins
        with it, as a reply's ids begin with its text before its tool calls)."""
        if not all(0 <= i < len(self.tokenizer) for i in ids):
            return False
        return self.decode(ids).startswith(text) if start else self.decode(ids) == text

    def encode_text(self, text: str) -> list[int]:
        """Ids of `text` as plain text: control-token strings in it stay text."""
        return self._encode(text, split_special=True)

    def _encode(self, text: str, *, split_special: bool) -> list[int]:
        if not text:
            return []
        with _ENCODE_LOCK:
            return self.tokenizer(text, add_special_tokens=False, split_special_tokens=split_special).input_ids

    def _prefix_ids(self, system_prompt: str | None) -> tuple[int, ...]:
        """Ids every conversation that opens with this system prompt starts with (the template's default
        system prompt when None): the common part of two renders that differ only in the first user message."""
        head = [Message(role="system", content=system_prompt)] if system_prompt is not None else []
        a = self.render([*head, Message(role="user", content="a")])
        b = self.render([*head, Message(role="user", content="b")])
        same = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        return tuple(a[:same])


def _arguments(call: ToolCall) -> object:
    """A call's arguments as the template reads them: the object (transformers' convention), or the text as it
    came when it is not JSON."""
    try:
        return json.loads(call.arguments)
    except ValueError:
        return call.arguments
