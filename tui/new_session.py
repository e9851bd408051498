"""The new-session dialog: pick a system prompt from the presets in `configs/prompts.toml` or type one.

Dismisses with the chosen system prompt ("" for the model's default), or None when cancelled.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Label, OptionList, TextArea
from textual.widgets.option_list import Option

from chatrt import ConfigError

PRESETS = Path(__file__).resolve().parent.parent / "configs" / "prompts.toml"


class Preset(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    system: str


def load_presets(path: Path = PRESETS) -> list[Preset]:
    """The presets in a prompts file; none when the file is missing (an installed copy without `configs/`)."""
    if not path.exists():
        return []
    try:
        return [Preset.model_validate(p) for p in tomllib.loads(path.read_text()).get("preset", [])]
    except (tomllib.TOMLDecodeError, ValueError) as e:
        raise ConfigError(f"{path}: {e}; each [[preset]] needs a name and a system prompt") from None


class NewSessionScreen(ModalScreen[str | None]):
    BINDINGS = [
        Binding("escape", "dismiss(None)", "Cancel"),
        Binding("ctrl+s", "open_typed", "Open with typed prompt", priority=True),
    ]

    def __init__(self, presets: list[Preset]) -> None:
        super().__init__()
        self.presets = presets

    def compose(self):  # type: ignore[no-untyped-def]
        with Vertical(id="dialog"):
            yield Label("New session · choose a system prompt", classes="heading")
            yield OptionList(*(Option(p.name, id=str(i)) for i, p in enumerate(self.presets)), id="presets")
            yield Label("or type one (Ctrl+S opens it):")
            yield TextArea(id="typed", soft_wrap=True)
            with Horizontal(classes="buttons"):
                yield Button("Open", variant="primary", id="open")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        presets = self.query_one("#presets", OptionList)
        if self.presets:
            presets.highlighted = 0  # Enter opens the first preset right away
        presets.focus()

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(self.presets[int(event.option.id or 0)].system)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "open":
            self.action_open_typed()
        else:
            self.dismiss(None)

    def action_open_typed(self) -> None:
        typed = self.query_one("#typed", TextArea).text.strip()
        if typed:
            self.dismiss(typed)
            return
        presets = self.query_one("#presets", OptionList)
        if presets.highlighted is not None:
            self.dismiss(self.presets[presets.highlighted].system)
        else:
            self.dismiss("")
