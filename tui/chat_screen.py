"""The main screen: sessions on the left, the conversation and its input in the middle, stats on the right.

Every action (new, switch, close, stop, regenerate, edit, copy, stats) is a binding here and a palette command.
"""

from __future__ import annotations

from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.reactive import reactive
from textual.screen import Screen
from textual.widgets import ContentSwitcher, Footer, Header, Label, ListView

from chatrt import ChatrtError, ChatRuntime
from tui.confirm import ConfirmScreen
from tui.conversation import Conversation
from tui.new_session import NewSessionScreen, Preset
from tui.prompt_input import PromptInput
from tui.sidebar import SessionItem, SessionList
from tui.stats_panel import StatsPanel

TITLE_CHARS = 26


class ChatScreen(Screen[None]):
    # Priority bindings win over the input's own keys (Ctrl+E end of line, Ctrl+W delete word, Ctrl+Y redo).
    BINDINGS = [
        Binding("ctrl+n", "new_session", "New"),
        Binding("ctrl+up", "switch(-1)", "Prev", show=False),
        Binding("ctrl+down", "switch(1)", "Next", show=False),
        Binding("ctrl+w", "close_session", "Close", priority=True),
        Binding("escape", "stop", "Stop"),
        Binding("ctrl+r", "regenerate", "Regenerate"),
        Binding("ctrl+e", "edit_last", "Edit last", priority=True),
        Binding("ctrl+y", "copy_reply", "Copy reply", priority=True),
        Binding("ctrl+t", "toggle_stats", "Stats"),
    ]
    show_stats: reactive[bool] = reactive(True, init=False)

    def __init__(self, rt: ChatRuntime, presets: list[Preset], system_prompt: str | None = None) -> None:
        super().__init__()
        self.rt = rt
        self.presets = presets
        self.first_system_prompt = system_prompt
        self.current: Conversation | None = None
        self._opened = 0
        self._redis_errors = 0

    def compose(self):  # type: ignore[no-untyped-def]
        yield Header()
        with Horizontal(id="body"):
            with Vertical(id="sidebar"):
                yield Label("sessions", classes="heading")
                yield SessionList(id="sessions")
            with Vertical(id="main"):
                yield ContentSwitcher(id="conversations")
                yield PromptInput(id="input")
            yield StatsPanel(id="stats")
        yield Footer()

    async def on_mount(self) -> None:
        await self.open(self.first_system_prompt)
        self.set_interval(1.0, self.refresh_stats)

    # -- sessions -----------------------------------------------------------------------------------

    def conversations(self) -> list[Conversation]:
        return list(self.query_one("#conversations").query_children(Conversation))

    async def open(self, system_prompt: str | None) -> None:
        try:
            session = self.rt.open_session(system_prompt=system_prompt or None)
        except ChatrtError as e:
            self.notify(str(e), title="could not open a session", severity="error")
            return
        self._opened += 1
        conversation = Conversation(session, title="New chat", id=f"conversation-{self._opened}")
        await self.query_one("#conversations").mount(conversation)
        await self.query_one(SessionList).append(SessionItem(conversation))
        self.show(conversation)

    def show(self, conversation: Conversation) -> None:
        self.current = conversation
        self.query_one(ContentSwitcher).current = conversation.id
        sessions = self.query_one(SessionList)
        index = next(i for i, item in enumerate(sessions.items()) if item.conversation is conversation)
        if sessions.index != index:
            sessions.index = index
        prompt = self.query_one(PromptInput)
        if prompt.editing:
            prompt.reset()
        prompt.focus()
        self.refresh_stats()

    def on_list_view_selected(self, event: ListView.Selected) -> None:
        if isinstance(event.item, SessionItem) and event.item.conversation is not self.current:
            self.show(event.item.conversation)

    async def close(self, conversation: Conversation) -> None:
        conversation.stop()
        await conversation.wait()
        try:
            conversation.session.close()
        except ChatrtError as e:  # the session is gone from this process either way
            self.notify(str(e), severity="warning")
        item = next(i for i in self.query_one(SessionList).items() if i.conversation is conversation)
        await item.remove()
        await conversation.remove()
        self.notify(f"closed {conversation.title!r}; its cache is freed")
        rest = self.conversations()
        if rest:
            self.show(rest[-1])
        else:
            await self.open(None)

    # -- turns --------------------------------------------------------------------------------------

    def on_prompt_input_submitted(self, event: PromptInput.Submitted) -> None:
        conversation = self.current
        if conversation is None:
            return
        if conversation.responding:
            self.notify("a reply is still streaming; Esc stops it", severity="warning")
            return
        if event.editing:
            conversation.edit(event.text)
        else:
            conversation.send(event.text)
        self.query_one(PromptInput).reset()

    def on_conversation_turn_ended(self, event: Conversation.TurnEnded) -> None:
        conversation = event.conversation
        if event.error is not None:
            self.notify(str(event.error), title="the message was not answered", severity="error", timeout=8)
            prompt = self.query_one(PromptInput)
            if event.text and conversation is self.current and not prompt.text:
                prompt.text = event.text  # give the user their message back to fix and resend
        if conversation.title == "New chat":
            first = next((m.content for m in conversation.session.messages if m.role == "user"), None)
            if first:
                line = " ".join(first.split())
                conversation.title = line if len(line) <= TITLE_CHARS else line[: TITLE_CHARS - 1] + "…"
        self.refresh_stats()

    def refresh_stats(self) -> None:
        stats = self.rt.stats()
        self.query_one(SessionList).sync()
        if self.show_stats and self.current is not None:
            self.query_one(StatsPanel).show(self.current, stats)
        errors = stats.tier_counters.redis_errors
        if errors > self._redis_errors:
            self.notify(
                "Redis is unreachable: caches and transcripts stay in this process until it is back",
                title="Redis",
                severity="warning",
            )
        self._redis_errors = errors

    # -- actions ------------------------------------------------------------------------------------

    def action_new_session(self) -> None:
        async def opened(system_prompt: str | None) -> None:
            if system_prompt is not None:
                await self.open(system_prompt)

        self.app.push_screen(NewSessionScreen(self.presets), opened)

    def action_switch(self, step: int) -> None:
        conversations = self.conversations()
        if self.current is not None and len(conversations) > 1:
            index = conversations.index(self.current)
            self.show(conversations[(index + step) % len(conversations)])

    def action_close_session(self) -> None:
        conversation = self.current
        if conversation is None:
            return

        async def answered(yes: bool | None) -> None:
            if yes:
                await self.close(conversation)

        question = f"Close {conversation.title!r}? Its transcript is gone and its cache freed on every tier."
        self.app.push_screen(ConfirmScreen(question), answered)

    def action_stop(self) -> None:
        prompt = self.query_one(PromptInput)
        if self.current is not None and self.current.responding:
            self.current.stop()
        elif prompt.editing:
            prompt.reset()

    def action_regenerate(self) -> None:
        if self.current is None or self.current.responding:
            return
        if self.current.last("assistant") is None:
            self.notify("there is no reply to regenerate yet", severity="warning")
            return
        self.current.regenerate()

    def action_edit_last(self) -> None:
        if self.current is None or self.current.responding:
            return
        text = self.current.last("user")
        if text is None:
            self.notify("there is no message to edit yet", severity="warning")
            return
        self.query_one(PromptInput).start_edit(text)

    def action_copy_reply(self) -> None:
        text = self.current.last("assistant") if self.current is not None else None
        if text is None:
            self.notify("there is no reply to copy yet", severity="warning")
            return
        self.app.copy_to_clipboard(text)
        self.notify("copied the last reply")

    def action_toggle_stats(self) -> None:
        self.show_stats = not self.show_stats

    def watch_show_stats(self, show: bool) -> None:
        self.query_one(StatsPanel).display = show
        if show:
            self.refresh_stats()
