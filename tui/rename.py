"""A one-line dialog that renames a chat; dismisses with the new title, or None when cancelled."""

from __future__ import annotations

from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Label


class RenameScreen(ModalScreen[str | None]):
    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]

    def __init__(self, title: str) -> None:
        super().__init__()
        self.current_title = title

    def compose(self):  # type: ignore[no-untyped-def]
        with Vertical(id="dialog"):
            yield Label("Rename the chat (Enter saves, Esc cancels):")
            yield Input(value=self.current_title, id="title")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(" ".join(event.value.split()) or None)
