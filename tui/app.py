"""ChatApp: loads the runtime in a worker behind a progress screen, then hands it to the chat screen.

`run()` is what `chatrt chat` calls; tests build ChatApp around a runtime they made.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from typing import TYPE_CHECKING

from textual import work
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.screen import Screen

from tui.chat_screen import ChatScreen, Sampling, model_title
from tui.chats import ChatStore
from tui.loading import LoadingScreen
from tui.new_session import Preset, load_presets

if TYPE_CHECKING:
    from chatrt import ChatRuntime

Loader = Callable[[Callable[[str], None]], "ChatRuntime"]
"""Builds the runtime, reporting progress through the callable it is given."""


# The chat screen's actions as the command palette lists them, with a line of help each.
PALETTE = {
    "new_session": "Open a session with a preset or a typed system prompt",
    "close_session": "Delete this chat and free its cache on every tier",
    "rename": "Rename this chat",
    "settings": "This chat's temperature, top-p, top-k, repetition penalty, max new tokens and seed",
    "export": "Write this chat as Markdown into the current folder",
    "stop": "Stop the reply being generated",
    "regenerate": "Replace the last reply with a new one",
    "edit_last": "Edit your last message and answer it again",
    "copy_reply": "Copy the last reply to the clipboard",
    "toggle_stats": "Show or hide the cache stats panel",
    "switch(1)": "Show the next session",
}


class ChatApp(App[None]):
    CSS_PATH = "chatrt.tcss"
    TITLE = "chatrt"
    # Textual's own ctrl+q binding is hidden from the footer; quitting should be as easy to find as the rest.
    BINDINGS = [Binding("ctrl+q", "quit", "Quit", priority=True)]

    def __init__(
        self,
        load: Loader,
        *,
        system_prompt: str | None = None,
        presets: list[Preset] | None = None,
        chats: ChatStore | None = None,
        sampling: Sampling = "chat",
    ) -> None:
        """`chats`: where chats are kept between runs (default: chats.db in the user's data folder); `sampling`:
        new chats start from the model's recommended sampling ("chat") or greedy ("exact")."""
        super().__init__()
        self.load, self.sampling = load, sampling
        self.system_prompt = system_prompt
        self.presets = load_presets() if presets is None else presets
        self.chats = chats if chats is not None else ChatStore()
        self.rt: ChatRuntime | None = None

    def on_mount(self) -> None:
        self.push_screen(LoadingScreen())
        self.load_runtime()

    @work(thread=True, exit_on_error=False)
    def load_runtime(self) -> None:
        screen = self.screen
        assert isinstance(screen, LoadingScreen)
        try:
            rt = self.load(lambda message: self.call_from_thread(screen.progress, message))
        except Exception as e:  # whatever stops the model loading is shown; the app stays up to say so
            self.call_from_thread(self.runtime_failed, screen, f"{type(e).__name__}: {e}")
            return
        self.call_from_thread(self.runtime_ready, rt)

    async def runtime_ready(self, rt: ChatRuntime) -> None:
        self.rt = rt
        self.sub_title = model_title(rt.lm.info)
        await self.switch_screen(ChatScreen(rt, self.presets, self.system_prompt, self.chats, self.sampling))

    def runtime_failed(self, screen: LoadingScreen, message: str) -> None:
        screen.failed(message)
        self.notify(message, title="the model failed to load", severity="error", timeout=30)

    async def action_quit(self) -> None:
        """Stop any reply being generated (it is kept as far as it got) before leaving."""
        if isinstance(self.screen, ChatScreen):
            for conversation in self.screen.conversations():
                conversation.stop()
                await conversation.wait()
        self.exit()

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        if not isinstance(screen, ChatScreen):
            return
        for binding in screen.BINDINGS:
            assert isinstance(binding, Binding)
            if binding.action in PALETTE:
                help = f"{PALETTE[binding.action]} ({binding.key})"
                yield SystemCommand(binding.description, help, partial(screen.run_action, binding.action))
        for conversation in screen.conversations():
            if conversation is not screen.current:
                yield SystemCommand(
                    f"Switch to {conversation.title}",
                    f"{conversation.session.stats().turns} turns · {conversation.session.tier}",
                    lambda c=conversation: screen.show(c),
                )


def run(load: Loader, *, system_prompt: str | None = None, sampling: Sampling = "chat") -> None:
    """Run the app until the user quits, then free the runtime (with Redis, sessions stay there to resume)."""
    app = ChatApp(load, system_prompt=system_prompt, sampling=sampling)
    try:
        app.run()
    finally:
        if app.rt is not None:
            app.rt.close()
