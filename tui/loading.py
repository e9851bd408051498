"""The screen shown while the model loads: a spinner and the loader's progress, or the error if it failed.

A failed load leaves the app running on this screen, with the error, until the user quits.
"""

from __future__ import annotations

from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import Footer, Label, LoadingIndicator


class LoadingScreen(Screen[None]):
    BINDINGS = [Binding("q", "app.quit", "Quit")]

    def compose(self):  # type: ignore[no-untyped-def]
        with Vertical(id="loading"):
            yield Label("chatrt", classes="heading")
            yield LoadingIndicator()
            yield Label("starting…", id="progress")
        yield Footer()

    def progress(self, message: str) -> None:
        self.query_one("#progress", Label).update(message)

    def failed(self, message: str) -> None:
        self.query_one(LoadingIndicator).display = False
        label = self.query_one("#progress", Label)
        label.update(f"The model could not be loaded:\n{message}\n\nPress q to quit.")
        label.add_class("-error")
