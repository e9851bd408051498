"""The sidebar: one row per open session with its title, turn count, tier badge and KV size.

Rows are refreshed from the sessions' public stats, so a cache moving tiers shows within a second.
"""

from __future__ import annotations

from textual.containers import Horizontal
from textual.widgets import Label, ListItem, ListView

from tui.conversation import Conversation


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class SessionItem(ListItem):
    def __init__(self, conversation: Conversation) -> None:
        super().__init__()
        self.conversation = conversation
        self.title_label = Label("", classes="title")
        self.turns_label = Label("", classes="turns")
        self.tier_label = Label("", classes="badge")
        self.size_label = Label("", classes="size")

    def compose(self):  # type: ignore[no-untyped-def]
        yield self.title_label
        with Horizontal(classes="meta"):
            yield self.turns_label
            yield self.tier_label
            yield self.size_label

    def on_mount(self) -> None:
        self.sync()

    def sync(self) -> None:
        stats = self.conversation.session.stats()
        self.title_label.update(self.conversation.title)
        turns = len(self.conversation.session.messages) // 2  # in the transcript: a regenerated reply is no new turn
        self.turns_label.update(f"{turns} turn{'' if turns == 1 else 's'}")
        self.tier_label.update("not cached" if stats.tier == "none" else stats.tier)
        self.tier_label.set_classes(f"badge -{stats.tier}")
        self.size_label.update(human_bytes(stats.kv_bytes) if stats.kv_bytes else "")


class SessionList(ListView):
    """Selecting a row (click, or arrows and Enter) asks the screen to show that session."""

    def items(self) -> list[SessionItem]:
        return list(self.query(SessionItem))

    def sync(self) -> None:
        for item in self.items():
            item.sync()
