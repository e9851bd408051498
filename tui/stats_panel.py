"""The stats panel: what the cache did for each turn of the shown session, and the runtime's tiers.

Refreshed after every turn and once a second, from `Session.stats`, `Conversation.turns` and `rt.stats()`.
"""

from __future__ import annotations

from rich.table import Table
from textual.containers import VerticalScroll
from textual.widgets import DataTable, Label, Static

from chatrt.stats import RuntimeStats
from tui.conversation import Conversation
from tui.sidebar import human_bytes

TURN_COLUMNS = ("#", "reused", "TTFT", "KV from", "prompt", "prefill", "tok/s")
"""What the cache did first: in a narrow panel the rest is a scroll away."""


class StatsPanel(VerticalScroll):
    def compose(self):  # type: ignore[no-untyped-def]
        yield Label("this session", classes="heading", id="session-heading")
        yield DataTable(id="turns", show_cursor=False, zebra_stripes=True)
        yield Label("runtime", classes="heading")
        yield Static(id="runtime")

    def on_mount(self) -> None:
        self.query_one("#turns", DataTable).add_columns(*TURN_COLUMNS)

    def show(self, conversation: Conversation, stats: RuntimeStats) -> None:
        session = conversation.session.stats()
        kv = f" · {human_bytes(session.kv_bytes)}" if session.kv_bytes else ""
        n = len(conversation.session.messages) // 2  # the transcript's turns, as the sidebar counts them
        turns = f"{n} turn{'' if n == 1 else 's'}"
        self.query_one("#session-heading", Label).update(
            f"this session · {where(session.tier)}{kv}\n{turns} · hit rate {session.hit_rate:.1%}"
        )
        table = self.query_one("#turns", DataTable)
        if table.row_count != len(conversation.turns):
            table.clear()
            for n, t in enumerate(conversation.turns, 1):
                table.add_row(
                    str(n), str(t.reused_tokens), f"{t.ttft_s * 1000:.0f} ms", source(t.kv_source),
                    str(t.prompt_tokens), str(t.prefilled_tokens), f"{t.decode_tokens_per_s:.1f}",
                )  # fmt: skip
            table.scroll_end(animate=False)
        self.query_one("#runtime", Static).update(runtime_table(stats))


def where(tier: str) -> str:
    """Where a session's KV is, in words: "not cached" rather than "none"."""
    return "not cached" if tier == "none" else f"KV on {tier}"


def source(kv_source: str) -> str:
    """Where a turn's KV came from: a tier, or "not cached" (computed from the prompt)."""
    return "not cached" if kv_source == "none" else kv_source


def runtime_table(stats: RuntimeStats) -> Table:
    table = Table.grid(padding=(0, 1))
    table.add_column(style="dim")
    table.add_column()
    table.add_row("hit rate", f"{stats.hit_rate:.1%} of {stats.prompt_tokens:,} prompt tokens")
    table.add_row("reused", f"{stats.reused_session_tokens:,} session · {stats.reused_prefix_tokens:,} prefix")
    turns = f"{stats.turns:,} turn{'' if stats.turns == 1 else 's'}"
    table.add_row("prefilled", f"{stats.prefilled_tokens:,} tokens in {turns}")
    table.add_row("sessions", f"{stats.sessions_open} open · {stats.sessions_closed} closed")
    for tier, usage in stats.tiers.items():
        budget = f" / {human_bytes(usage.budget_bytes)}" if usage.budget_bytes else ""
        table.add_row(tier, f"{usage.sessions} · {human_bytes(usage.bytes)}{budget}")
    table.add_row("prefixes", f"{stats.prefix_entries} · {human_bytes(stats.prefix_bytes)} · {stats.prefix_hits} hits")
    c = stats.tier_counters
    table.add_row("moves", f"{c.demotions} down · {c.promotions} up")
    table.add_row("restores", f"{c.restores} restored · {c.recomputes} recomputed · {c.drops} dropped")
    if c.redis_errors:
        table.add_row("redis errors", f"[red]{c.redis_errors}[/red]")
    meanwhile = {"compiling": "compiling in the background", "loading": "loading the compiled step"}
    steps = f"{meanwhile[stats.decode_step]} (eager meanwhile)" if stats.decode_step in meanwhile else stats.decode_step
    table.add_row("decode steps", steps)
    return table
