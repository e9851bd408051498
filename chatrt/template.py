"""Rendering transcripts to prompt token ids with the model's chat template, safely.

Message text is tokenized as text (never as control tokens); the template's own markup keeps its control tokens.
"""

from __future__ import annotations

import re
import secrets
import threading
from functools import lru_cache
from typing import TYPE_CHECKING

from chatrt.errors import InvalidMessage, TemplateError
from chatrt.message import Message, Role

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["ChatTemplate", "Message", "Role", "check_text", "check_turns", "decode"]


# transformers' fast tokenizers switch `split_special_tokens` by setting a flag on the shared Rust tokenizer
# for the duration of a call, so two threads encoding at once can each get the other's setting: user text
# would then become control tokens. Every encode goes through this one lock (encoding takes microseconds).
_ENCODE_LOCK = threading.Lock()


def check_turns(messages: list[Message], what: str = "the history") -> list[Message]:
    """`messages` when they are whole turns: valid text, user and assistant in order, ending with a reply."""
    for m in messages:
        check_text(m.content, "a message")
    roles = [m.role for m in messages]
    if roles != ["user", "assistant"] * (len(roles) // 2):
        raise InvalidMessage(
            f"{what} must be whole turns, user then assistant, in order ({', '.join(roles[:8]) or 'none'} given); "
            "a system prompt is passed apart"
        )
    return messages


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
        self.prefix_ids = lru_cache(maxsize=256)(self._prefix_ids)

    def render(self, messages: list[Message], *, add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the prompt: the template's markup with its control tokens, each message's text as text."""
        # Each message's content is replaced by a placeholder; the template text between placeholders is
        # tokenized with special tokens recognised and each content piece with them split into plain text.
        chat = [{"role": m.role, "content": f"<{self._tag}:{i}>"} for i, m in enumerate(messages)]
        try:
            text = self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt)
        except Exception as e:  # jinja raises its own errors for role order etc.
            raise TemplateError(f"the chat template rejected this transcript: {e}") from e
        pieces = self._placeholder.split(text)
        order = [int(i) for i in pieces[1::2]]
        if order != list(range(len(messages))):
            raise TemplateError("the chat template drops, repeats or reorders message content; chatrt cannot render it")
        ids: list[int] = []
        for i, markup in enumerate(pieces[0::2]):
            ids += self._encode(markup, split_special=False)
            if i < len(messages):
                m = messages[i]
                ids += list(m.token_ids) if m.token_ids is not None else self._encode(m.content, split_special=True)
        return ids

    def decode(self, ids: tuple[int, ...] | list[int]) -> str:
        return decode(self.tokenizer, ids)

    def spells(self, ids: tuple[int, ...], text: str) -> bool:
        """Whether `ids` are ids of this tokenizer that decode to exactly `text`."""
        return all(0 <= i < len(self.tokenizer) for i in ids) and self.decode(ids) == text

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
