"""The main screen: sessions on the left, the conversation and its input in the middle, stats on the right.

Every action (new, switch, delete, rename, export, stop, regenerate, edit, copy, stats) is a binding here and a
palette command. Chats are kept in the chat store after every turn and come back at the next start.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.reactive import reactive
from textual.screen import Screen
from textual.widgets import ContentSwitcher, Footer, Header, Label, ListView

from chatrt.config import GREEDY_BELOW
from chatrt.errors import ChatrtError, InvalidMessage
from chatrt.model import chat_sampling
from tui.chats import ChatStore, ChatStoreError, StoredChat, export_name, markdown
from tui.confirm import ConfirmScreen
from tui.conversation import Conversation
from tui.new_session import NewSessionScreen, Preset
from tui.prompt_input import PromptInput
from tui.rename import RenameScreen
from tui.settings import SettingsScreen
from tui.sidebar import SessionItem, SessionList
from tui.stats_panel import StatsPanel

if TYPE_CHECKING:  # the model stack is imported by the loader, behind the loading screen
    from chatrt import ChatRuntime
    from chatrt.model import ModelInfo


def model_title(info: ModelInfo) -> str:
    """The model as a person should read it: a GGUF file's weights are dequantized, so its dtype is not the
    quantization in its name."""
    origin = f" ({info.origin})" if info.origin else ""
    return f"{info.name}{origin} · {info.dtype} on {info.device}"


TITLE_CHARS = 26
REGENERATE_TEMPERATURE = 0.8



Sampling = Literal["chat", "exact"]

class ChatScreen(Screen[None]):
    # Priority bindings win over the input's own keys (Ctrl+E end of line, Ctrl+W delete word, Ctrl+Y redo).
    BINDINGS = [
        Binding("ctrl+n", "new_session", "New"),
        Binding("ctrl+up", "switch(-1)", "Prev", show=False),
        Binding("ctrl+down", "switch(1)", "Next", show=False),
        Binding("ctrl+w", "close_session", "Delete", priority=True),
        Binding("escape", "stop", "Stop"),
        Binding("ctrl+r", "regenerate", "Regenerate"),
        Binding("ctrl+e", "edit_last", "Edit last", priority=True),
        Binding("ctrl+y", "copy_reply", "Copy reply", priority=True),
        Binding("ctrl+t", "toggle_stats", "Stats"),
        Binding("f2", "rename", "Rename", show=False),
        Binding("ctrl+g", "settings", "Settings", priority=True),
        Binding("ctrl+s", "export", "Export", show=False, priority=True),
    ]
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (180, "-wide")]  # narrower side panels below 180 columns
    show_stats: reactive[bool] = reactive(True, init=False)

    def __init__(
        self, rt: ChatRuntime, presets: list[Preset], system_prompt: str | None = None, chats: ChatStore | None = None,
        sampling: Sampling = "chat",
    ) -> None:
        """`sampling`: what a new chat's settings start from: "chat" (the model's recommended sampling), or "exact"
        (the runtime's defaults: greedy)."""
        super().__init__()
        self.rt, self.sampling = rt, sampling
        self.presets = presets
        self.chats = chats
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
        stored = self.chats.chats() if self.chats is not None else []
        for problem in self.chats.take_problems() if self.chats is not None else ():
            self.notify(problem, title="chats", severity="warning", timeout=20)
        for chat in stored:
            await self.reopen(chat)
        if not self.conversations() or self.first_system_prompt is not None:
            await self.open(self.first_system_prompt)
        elif self.current is None:
            self.show(self.conversations()[-1])  # the chat used last
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
        settings = chat_sampling(self.rt.lm) if self.sampling == "chat" else {}  # Ctrl+G's presets switch
        self.show(await self._add(Conversation(session, title="New chat", settings=settings, id=self._next_id())))

    async def reopen(self, chat: StoredChat) -> None:
        """A chat kept from an earlier run: its session again, seeded with the transcript (its KV is computed by
        its next turn, or restored from Redis when a runtime there still holds it)."""
        try:
            session = self.rt.open_session(chat.system_prompt, session_id=chat.id, messages=chat.messages)
        except InvalidMessage:  # with Redis: the session is stored there; resume it from there
            try:
                session = self.rt.session(chat.id)
            except ChatrtError as e:
                self.notify(f"{chat.title!r} could not be reopened: {e}", severity="warning")
                return
        except ChatrtError as e:
            self.notify(f"{chat.title!r} could not be reopened: {e}", severity="warning")
            return
        await self._add(Conversation(session, title=chat.title, settings=chat.settings, kept=chat,
                                     id=self._next_id()))  # fmt: skip

    async def _add(self, conversation: Conversation) -> Conversation:
        await self.query_one("#conversations").mount(conversation)
        await self.query_one(SessionList).append(SessionItem(conversation))
        return conversation

    def _next_id(self) -> str:
        self._opened += 1
        return f"conversation-{self._opened}"

    def save(self, conversation: Conversation) -> None:
        """Keep the chat as it is now (after each turn, a rename, a change of settings)."""
        if self.chats is None or not conversation.session.messages:
            return
        try:
            kept = self.chats.save(conversation.stored())
        except ChatStoreError as e:  # the chat goes on in this window; the store says what is wrong
            self.notify(str(e), title="chats", severity="warning")
            return
        if conversation.kept is not None and kept.id != conversation.kept.id:
            self.notify(f"another window saved {conversation.title!r} meanwhile: both are kept, this one as "
                        f"{kept.title!r}", title="chats", severity="warning")  # fmt: skip
            conversation.title = kept.title
            self.refresh_stats()
        conversation.kept = kept

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
        if self.chats is not None and conversation.kept is not None:
            try:
                self.chats.delete(conversation.kept.id)
            except ChatStoreError as e:
                self.notify(str(e), title="chats", severity="warning")
        item = next(i for i in self.query_one(SessionList).items() if i.conversation is conversation)
        await item.remove()
        await conversation.remove()
        self.notify(f"deleted {conversation.title!r}; its cache is freed everywhere")
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
        self.save(conversation)
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

        question = f"Delete {conversation.title!r}? Its transcript is gone and its cache freed on every tier."
        self.app.push_screen(ConfirmScreen(question), answered)

    def action_stop(self) -> None:
        prompt = self.query_one(PromptInput)
        if self.current is not None and self.current.responding:
            self.current.stop()
        elif prompt.editing:
            prompt.reset()

    def action_regenerate(self) -> None:
        conversation = self.current
        if conversation is None or conversation.responding:
            return
        if conversation.last("assistant") is None:
            self.notify("there is no reply to regenerate yet", severity="warning")
            return
        temperature = conversation.settings.get("temperature", self.rt.config.generation.temperature)
        if temperature < GREEDY_BELOW:  # greedy decoding would give the very same reply again
            self.notify(f"greedy decoding gives the same reply again, so this one is sampled at temperature "
                        f"{REGENERATE_TEMPERATURE} (Ctrl+G sets the chat's own)")  # fmt: skip
            conversation.regenerate(temperature=REGENERATE_TEMPERATURE, seed=None)
        else:
            conversation.regenerate()

    def action_settings(self) -> None:
        conversation = self.current
        if conversation is None:
            return

        def saved(settings: dict | None) -> None:
            if settings is not None:
                conversation.settings = settings
                self.save(conversation)
                self.notify("settings saved; they apply from this chat's next turn")

        defaults = self.rt.config.generation
        title = model_title(self.rt.lm.info)
        screen = SettingsScreen(defaults, conversation.settings, title, chat_sampling(self.rt.lm))
        self.app.push_screen(screen, saved)

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

    def action_rename(self) -> None:
        conversation = self.current
        if conversation is None:
            return

        def renamed(title: str | None) -> None:
            if title:
                conversation.title = title
                self.save(conversation)
                self.refresh_stats()

        self.app.push_screen(RenameScreen(conversation.title), renamed)

    def action_export(self) -> None:
        """Write the chat as Markdown into the current folder."""
        conversation = self.current
        if conversation is None or not conversation.session.messages:
            self.notify("there is nothing to export yet", severity="warning")
            return
        chat = conversation.stored()
        path = Path.cwd() / export_name(chat.title)
        try:
            path.write_text(markdown(chat))
        except OSError as e:
            self.notify(f"could not write {path}: {e}", severity="error")
            return
        self.notify(f"exported to {path}")

    def action_toggle_stats(self) -> None:
        self.show_stats = not self.show_stats

    def watch_show_stats(self, show: bool) -> None:
        self.query_one(StatsPanel).display = show
        if show:
            self.refresh_stats()
