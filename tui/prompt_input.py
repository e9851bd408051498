"""The multi-line message input: Enter sends, Shift+Enter / Alt+Enter / Ctrl+J start a new line.

In edit mode it holds the last user message, and sending replaces that message.
"""

from __future__ import annotations

from dataclasses import dataclass

from textual import events
from textual.message import Message
from textual.reactive import reactive
from textual.widgets import TextArea

_NEWLINE_KEYS = ("shift+enter", "alt+enter", "ctrl+j")
_TITLE = "message · Enter sends · Shift+Enter new line"


class PromptInput(TextArea):
    @dataclass
    class Submitted(Message):
        text: str
        editing: bool
        """The text replaces the last user message instead of being a new one."""

    editing: reactive[bool] = reactive(False)

    def __init__(self, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(soft_wrap=True, show_line_numbers=False, **kwargs)
        self.border_title = _TITLE

    def watch_editing(self, editing: bool) -> None:
        self.set_class(editing, "-editing")
        self.border_title = "editing your last message · Enter resends · Esc cancels" if editing else _TITLE

    def start_edit(self, text: str) -> None:
        self.text = text
        self.editing = True
        self.move_cursor(self.document.end)
        self.focus()

    def reset(self) -> None:
        self.text = ""
        self.editing = False

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            if self.text.strip():  # the screen clears the input once it takes the message
                self.post_message(self.Submitted(self.text, self.editing))
            return
        if event.key in _NEWLINE_KEYS:
            event.stop()
            event.prevent_default()
            self.insert("\n")
            return
        await super()._on_key(event)
