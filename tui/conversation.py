"""The conversation of one session: its messages as Markdown, and the worker that streams a reply into it.

The session's transcript is the truth; after a failed turn the view is rebuilt from it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass

from textual import work
from textual.containers import VerticalScroll
from textual.message import Message
from textual.reactive import reactive
from textual.widgets import Markdown, Static
from textual.widgets.markdown import MarkdownStream

from chatrt import Session, TurnStats

Start = Callable[[], Iterator[str]]


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

    def __init__(self, session: Session, title: str, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(**kwargs)
        self.session = session
        self.title = title
        self.turns: list[TurnStats] = []
        """Stats of every turn this view ran, oldest first (the stats panel's table)."""
        self._stop = threading.Event()
        self._idle = threading.Event()  # set when no worker runs: a stopped reply is then recorded
        self._idle.set()

    def compose(self):  # type: ignore[no-untyped-def]
        yield from self._bubbles()

    def on_mount(self) -> None:
        self.anchor()  # stay at the bottom while a reply streams in, unless the user scrolls up

    def watch_responding(self, responding: bool) -> None:
        self.set_class(responding, "-responding")

    # -- what the screen asks of it ---------------------------------------------------------------

    def send(self, text: str) -> None:
        self._begin(lambda: self.session.stream(text), user=text, drop=0)

    def regenerate(self) -> None:
        self._begin(self.session.stream_regenerate, user=None, drop=1)

    def edit(self, text: str) -> None:
        self._begin(lambda: self.session.stream_edit(text), user=text, drop=2)

    def stop(self) -> None:
        """Stop the reply being generated; what was streamed so far stays as the reply."""
        self._stop.set()

    async def wait(self) -> None:
        """Until no reply is being generated (the worker's own end, not Textual's cancel, which does not wait)."""
        while not self._idle.is_set():
            await asyncio.sleep(0.01)

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
        self._stop.clear()
        self._idle.clear()
        self._generate(start, reply, Markdown.get_stream(reply), user)

    @work(thread=True, exit_on_error=False)
    def _generate(self, start: Start, reply: Bubble, stream: MarkdownStream, user: str | None) -> None:
        before = self.session.last_turn
        error: Exception | None = None
        try:
            try:
                pieces = start()
                try:
                    for piece in pieces:
                        if self._stop.is_set():
                            break
                        self.app.call_from_thread(stream.write, piece)
                finally:
                    pieces.close()  # records the turn in this thread, also after a stop
            except Exception as e:  # shown as a notification: whatever fails, the app and the session go on
                error = e
            turn = self.session.last_turn
            stats = turn if turn is not before and error is None else None
            with suppress(RuntimeError):  # the app has quit: the turn is recorded, there is no view to update
                self.app.call_from_thread(self._finish, reply, stream, stats, error, user)
        finally:
            self._idle.set()

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
        self.responding = False
        self.post_message(self.TurnEnded(self, stats, error, user if error else None))
