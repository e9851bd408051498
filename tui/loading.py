"""The screen shown while the model loads: a spinner and the loader's progress, or the error if it failed.

A failed load leaves the app running on this screen, with the error, until the user quits.
"""

from __future__ import annotations

import time

from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import Footer, Label, LoadingIndicator


class LoadingScreen(Screen[None]):
    BINDINGS = [Binding("q", "app.quit", "Quit")]

    def __init__(self) -> None:
        super().__init__()
        self._done: list[tuple[str, float]] = []  # stages finished, with their seconds
        self._stage, self._since = "", time.monotonic()

    def compose(self):  # type: ignore[no-untyped-def]
        with Vertical(id="loading"):
            yield Label("chatrt", classes="heading")
            yield LoadingIndicator()
            yield Label("starting…", id="progress")
        yield Footer()

    def progress(self, message: str) -> None:
        """A new stage began: the ones before it are listed with the seconds they took."""
        now = time.monotonic()
        if self._stage:
            self._done.append((self._stage, now - self._since))
        self._stage, self._since = message, now
        lines = [f"✓ {stage} ({seconds:.1f} s)" for stage, seconds in self._done]
        self.query_one("#progress", Label).update("\n".join([*lines, f"… {message}"]))

    def failed(self, message: str) -> None:
        self.query_one(LoadingIndicator).display = False
        label = self.query_one("#progress", Label)
        label.update(f"The model could not be loaded:\n{message}\n\nPress q to quit.")
        label.add_class("-error")
