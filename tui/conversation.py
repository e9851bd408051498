"""The conversation of one session: its messages as Markdown, and the worker that streams a reply into it.

The session's transcript is the truth; after a failed turn the view is rebuilt from it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from textual import work
from textual.containers import VerticalScroll
from textual.message import Message
from textual.reactive import reactive
from textual.widgets import Markdown, Static
from textual.widgets.markdown import MarkdownStream
from textual.worker import Worker, WorkerCancelled, WorkerFailed

from chatrt.stats import TurnStats
from tui.chats import StoredChat

if TYPE_CHECKING:
    from chatrt import AsyncTurn, Session

Start = Callable[[], "AsyncTurn"]


class Bubble(Markdown):
    """One message. The role is a CSS class (`-user`, `-assistant`); `-streaming` while a reply arrives."""

    def __init__(self, role: str, text: str = "") -> None:
        super().__init__(text, classes=f"-{role}")
        self.border_title = "you" if role == "user" else "assistant"


class Conversation(VerticalScroll):
    @dataclass
    class TurnEnded(Message):
        """A turn finished, was stopped, or failed (`error`; the transcript is then unchanged)."""

        conversation: Conversation
        stats: TurnStats | None
        error: Exception | None
        text: str | None
        """The user text of a failed send or edit, so the input can get it back."""

    responding: reactive[bool] = reactive(False)

    def __init__(self, session: Session, title: str, settings: dict | None = None, kept: StoredChat | None = None,
                 **kwargs) -> None:  # type: ignore[no-untyped-def]  # fmt: skip
        super().__init__(**kwargs)
        from chatrt.async_runtime import AsyncSession  # imported once the runtime is loaded

        self.session = session
        self.chat = AsyncSession(session)  # a turn runs on a thread; its pieces arrive on the app's loop
        self.title = title
        self.settings: dict = dict(settings or {})
        """This chat's turn options (temperature, top_p, ...): they override the runtime's defaults."""
        self.kept = kept
        """The chat as the store last had it (None: never saved): where and over which version it is saved."""
        self.turns: list[TurnStats] = []
        """Stats of every turn this view ran, oldest first (the stats panel's table)."""
        self._worker: Worker[None] | None = None

    def compose(self):  # type: ignore[no-untyped-def]
        yield from self._bubbles()

    def on_mount(self) -> None:
        self.anchor()  # stay at the bottom while a reply streams in, unless the user scrolls up

    def watch_responding(self, responding: bool) -> None:
        self.set_class(responding, "-responding")

    # -- what the screen asks of it ---------------------------------------------------------------

    def send(self, text: str) -> None:
        self._begin(lambda: self.chat.stream(text, **self.settings), user=text, drop=0)

    def regenerate(self, **options: Any) -> None:
        self._begin(lambda: self.chat.stream_regenerate(**{**self.settings, **options}), user=None, drop=1)

    def edit(self, text: str) -> None:
        self._begin(lambda: self.chat.stream_edit(text, **self.settings), user=text, drop=2)

    def stop(self) -> None:
        """Stop the reply being generated; what was streamed so far stays as the reply."""
        if self._worker is not None:
            self._worker.cancel()

    async def wait(self) -> None:
        """Until no reply is being generated and the last one is recorded."""
        if self._worker is not None:
            with suppress(WorkerCancelled, WorkerFailed):
                await self._worker.wait()

    def stored(self) -> StoredChat:
        """The chat as the chat store keeps it (`kept`: as it was last saved or read)."""
        s, kept = self.session, self.kept
        return StoredChat(id=kept.id if kept else s.id, title=self.title, system_prompt=s.system_prompt,
                          settings=self.settings, messages=s.messages, version=kept.version if kept else 0,
                          **({"created": kept.created} if kept else {}))  # fmt: skip

    def last(self, role: str) -> str | None:
        return next((m.content for m in reversed(self.session.messages) if m.role == role), None)

    async def rebuild(self) -> None:
        """Show the session's transcript as it is now."""
        await self.remove_children()
        await self.mount_all(self._bubbles())

    # -- the turn -----------------------------------------------------------------------------------

    def _bubbles(self) -> Iterator[Static | Bubble]:
        if self.session.system_prompt:
            yield Static(f"system: {self.session.system_prompt}", classes="system")
        for m in self.session.messages:
            yield Bubble(m.role, m.content)

    def _begin(self, start: Start, *, user: str | None, drop: int) -> None:
        if self.responding:
            return
        bubbles = list(self.query(Bubble))
        for bubble in bubbles[len(bubbles) - drop :] if drop else ():
            bubble.remove()
        if user is not None:
            self.mount(Bubble("user", user))
        reply = Bubble("assistant")
        reply.add_class("-streaming")
        self.mount(reply)
        self.responding = True
        self._worker = self._generate(start, reply, user)

    @work(exit_on_error=False)
    async def _generate(self, start: Start, reply: Bubble, user: str | None) -> None:
        stream = Markdown.get_stream(reply)
        error: Exception | None = None
        turn: AsyncTurn | None = None
        try:
            turn = start()
            async with turn:  # leaving it stops the turn and waits until it is recorded
                async for piece in turn:
                    await stream.write(piece)
        except asyncio.CancelledError:
            pass  # stopped (Esc, close, quit): the text so far is the reply
        except Exception as e:  # shown as a notification: whatever fails, the app and the session go on
            error = e
        recorded = turn.reply if turn is not None and error is None else None
        await self._finish(reply, stream, recorded.stats if recorded else None, error, user)

    async def _finish(
        self,
        reply: Bubble,
        stream: MarkdownStream,
        stats: TurnStats | None,
        error: Exception | None,
        user: str | None,
    ) -> None:
        await stream.stop()
        reply.remove_class("-streaming")
        if stats is None:
            await self.rebuild()
        else:
            self.turns.append(stats)
            # The recorded reply is the text streamed, cut at a stop string if one was held back.
            await reply.update(self.session.messages[-1].content)
            if stats.finish_reason == "cancelled":  # stopped (Esc, close, quit): not what the model would finish
                reply.add_class("-stopped")
                reply.border_subtitle = "stopped"
            elif stats.finish_reason == "length":
                reply.border_subtitle = "cut at max new tokens"
        self.responding = False
        self.post_message(self.TurnEnded(self, stats, error, user if error else None))
