"""Helpers for the UI tests: the app around a runtime on the tiny model, and waiting for its background work."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Callable

from rich.console import Console
from textual.pilot import Pilot

from chatrt import ChatRuntime
from tui import ChatApp
from tui.chat_screen import ChatScreen
from tui.conversation import Bubble, Conversation
from tui.new_session import NewSessionScreen
from tui.prompt_input import PromptInput


def chat_app(rt: ChatRuntime, **kwargs) -> ChatApp:  # type: ignore[no-untyped-def]
    """The app on `rt`; new chats greedy ("exact") unless `sampling` says otherwise, so replies can be checked
    against plain transformers."""
    return ChatApp(lambda progress: rt, **{"sampling": "exact", **kwargs})


async def wait_until(pilot: Pilot, predicate: Callable[[], object], timeout: float = 30.0) -> None:
    """Let the app run until `predicate()` holds (model load, a streamed reply); fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {predicate}")
        await pilot.pause(0.02)
        await asyncio.sleep(0)


async def ready(pilot: Pilot) -> ChatScreen:
    await wait_until(pilot, lambda: isinstance(pilot.app.screen, ChatScreen) and pilot.app.screen.current)
    return pilot.app.screen  # type: ignore[return-value]


async def say(pilot: Pilot, text: str) -> Conversation:
    """Type a message, press Enter, and wait for the whole reply."""
    screen = await ready(pilot)
    conversation = screen.current
    assert conversation is not None
    turns = len(conversation.turns)
    prompt = screen.query_one(PromptInput)
    prompt.text = text
    prompt.focus()
    await pilot.press("enter")
    await wait_until(pilot, lambda: len(conversation.turns) > turns and not conversation.responding)
    return conversation


def notifications(app: ChatApp) -> list[str]:
    """Title and message of every notification still shown (Textual keeps them on the app)."""
    return [f"{n.title}: {n.message}" for n in app._notifications]


def bubbles(conversation: Conversation) -> list[tuple[str, str]]:
    """The conversation as shown: (role, Markdown source) per message."""
    return [(b.border_title or "", b.source) for b in conversation.query(Bubble)]


def transcript(conversation: Conversation) -> list[tuple[str, str]]:
    """The conversation as the session holds it, in the same shape as `bubbles`."""
    role = {"user": "you", "assistant": "assistant"}
    return [(role[m.role], m.content) for m in conversation.session.messages]


def text_of(renderable: object) -> str:
    """What a label, a Static or a Rich renderable shows, as plain text."""
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(renderable)
    return "\n".join(line.rstrip() for line in console.export_text().splitlines()).strip()


async def new_session(pilot: Pilot, *keys: str) -> Conversation:
    """Ctrl+N, then `keys` in the dialog (e.g. "down", "enter" for the second preset); the session it opens."""
    screen = await ready(pilot)
    count = len(screen.conversations())
    await pilot.press("ctrl+n")
    await wait_until(pilot, lambda: isinstance(pilot.app.screen, NewSessionScreen))
    await pilot.press(*keys)
    await wait_until(pilot, lambda: len(screen.conversations()) == count + 1)
    assert screen.current is not None
    return screen.current


async def start_reply(pilot: Pilot, text: str) -> Conversation:
    """Send `text` and return once the reply has started streaming (some text shown, still responding)."""
    screen = await ready(pilot)
    conversation = screen.current
    assert conversation is not None
    screen.query_one(PromptInput).text = text
    await pilot.press("enter")
    await wait_until(pilot, lambda: len(conversation.query(Bubble).last().source) > 10)
    return conversation
