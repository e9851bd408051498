"""The per-chat settings dialog: the turn options of one chat (temperature, top-p, top-k, repetition penalty,
max new tokens, seed), checked as a turn checks them, and two presets that fill them in: "Chat" (the sampling the
model recommends, which new chats start from) and "Exact" (the runtime's defaults: greedy, the same reply as plain
transformers). Dismisses with the options that differ from the runtime's defaults (empty: use the defaults), or
None when cancelled.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label

from chatrt.config import GenerationConfig

FIELDS = {
    "temperature": "temperature (0: greedy, the same reply every time)",
    "top_p": "top-p (1: off)",
    "top_k": "top-k (0: off)",
    "repetition_penalty": "repetition penalty (1: off; 1.1 breaks small models' loops)",
    "max_new_tokens": "max new tokens",
    "seed": "seed (empty: a new one each time)",
}


class SettingsScreen(ModalScreen[dict[str, Any] | None]):
    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]

    def __init__(self, defaults: GenerationConfig, settings: dict[str, Any], model: str, chat: dict[str, Any]) -> (
        None
    ):  # fmt: skip
        super().__init__()
        self.defaults, self.settings, self.model, self.chat = defaults, settings, model, chat

    def compose(self):  # type: ignore[no-untyped-def]
        values = {**self.defaults.model_dump(), **self.settings}
        with Vertical(id="dialog"):
            yield Label(f"Settings of this chat · {self.model}", classes="heading")
            for name, label in FIELDS.items():
                with Horizontal(classes="field"):
                    yield Label(label)
                    value = values.get(name)
                    yield Input("" if value is None else str(value), id=name)
            yield Label("", id="problem")
            with Horizontal(classes="buttons"):
                yield Button("Save", variant="primary", id="save")
                yield Button("Chat", id="chat", tooltip="the sampling the model recommends")
                yield Button("Exact", id="exact", tooltip="greedy: plain transformers' reply")
                yield Button("Cancel", id="cancel")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "save":
            self.save()
        elif event.button.id in ("chat", "exact"):
            self.fill(self.chat if event.button.id == "chat" else {})
        else:
            self.dismiss(None)

    def fill(self, preset: dict[str, Any]) -> None:
        """The fields as the preset sets them over the runtime's defaults (saved only with Save)."""
        values = {**self.defaults.model_dump(), **preset}
        for name in FIELDS:
            value = values.get(name)
            self.query_one(f"#{name}", Input).value = "" if value is None else str(value)

    def on_input_submitted(self, _: Input.Submitted) -> None:
        self.save()

    def save(self) -> None:
        given = {name: self.query_one(f"#{name}", Input).value.strip() for name in FIELDS}
        values = {k: (v if v else None) for k, v in given.items()}
        try:
            checked = GenerationConfig.model_validate({**self.defaults.model_dump(), **values})
        except ValidationError as e:
            err = e.errors()[0]
            self.query_one("#problem", Label).update(f"[red]{err['loc'][0]}: {err['msg']}[/red]")
            return
        defaults = self.defaults.model_dump()
        self.dismiss({k: v for k, v in checked.model_dump().items() if k in FIELDS and v != defaults[k]})
