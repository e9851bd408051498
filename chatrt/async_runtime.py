"""AsyncChatRuntime and AsyncSession: the session API for event loops, run on worker threads.

The model runs in a thread, so the loop stays free; streamed pieces cross over through an asyncio queue.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, Self

from chatrt.config import Config
from chatrt.model import Progress
from chatrt.runtime import ChatRuntime
from chatrt.session import Reply, Session
from chatrt.stats import RuntimeStats, SessionStats, TurnStats

_END = object()


class _Closing:
    """`await x.close()` and `async with x:` for a wrapper of a sync object with a blocking close()."""

    sync: Session | ChatRuntime

    async def close(self) -> None:
        await asyncio.to_thread(self.sync.close)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncSession(_Closing):
    """A Session for asyncio: `await s.send(...)`, `async for piece in s.stream(...)`."""

    def __init__(self, session: Session) -> None:
        self.sync = session

    @property
    def id(self) -> str:
        return self.sync.id

    @property
    def last_turn(self) -> TurnStats | None:
        return self.sync.last_turn

    @property
    def tier(self) -> str:
        return self.sync.tier

    async def send(self, text: str, **options: Any) -> Reply:
        return await asyncio.to_thread(self.sync.send, text, **options)

    async def regenerate(self, **options: Any) -> Reply:
        return await asyncio.to_thread(self.sync.regenerate, **options)

    async def edit(self, text: str, **options: Any) -> Reply:
        return await asyncio.to_thread(self.sync.edit, text, **options)

    def stream(self, text: str, **options: Any) -> AsyncIterator[str]:
        """Pieces of the reply as they are generated. Leaving the loop early (break, or the task cancelled)
        stops generation: the text so far is the reply, as with `Session.stream`."""
        return _stream(lambda: self.sync.stream(text, **options))

    def stream_regenerate(self, **options: Any) -> AsyncIterator[str]:
        return _stream(lambda: self.sync.stream_regenerate(**options))

    def stream_edit(self, text: str, **options: Any) -> AsyncIterator[str]:
        return _stream(lambda: self.sync.stream_edit(text, **options))

    def stats(self) -> SessionStats:
        return self.sync.stats()


class AsyncChatRuntime(_Closing):
    """ChatRuntime for asyncio; `rt.sync` is the ChatRuntime underneath (the two can be used side by side)."""

    def __init__(self, rt: ChatRuntime) -> None:
        self.sync = rt

    @classmethod
    async def from_config(
        cls, config: Config | str | Path | None = None, progress: Progress = lambda _: None
    ) -> AsyncChatRuntime:
        return cls(await asyncio.to_thread(ChatRuntime.from_config, config, progress))

    async def open_session(self, system_prompt: str | None = None, *, session_id: str | None = None) -> AsyncSession:
        return AsyncSession(await asyncio.to_thread(self.sync.open_session, system_prompt, session_id=session_id))

    async def session(self, session_id: str) -> AsyncSession:
        return AsyncSession(await asyncio.to_thread(self.sync.session, session_id))

    def stats(self) -> RuntimeStats:
        return self.sync.stats()


async def _stream(start: Callable[[], Iterator[str]]) -> AsyncIterator[str]:
    """Run a session's stream on a thread and yield its pieces here. On the way out (finished, break, cancel,
    error) the thread is told to stop and awaited, so the turn is recorded before control returns."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[object] = asyncio.Queue()
    stop = threading.Event()

    def produce() -> None:
        try:
            pieces = start()
            try:
                for piece in pieces:
                    if stop.is_set():
                        break
                    loop.call_soon_threadsafe(queue.put_nowait, piece)
            finally:
                pieces.close()  # records the turn, also when stopped early
        except BaseException as e:  # handed to the consumer, raised there
            loop.call_soon_threadsafe(queue.put_nowait, e)
        else:
            loop.call_soon_threadsafe(queue.put_nowait, _END)

    done = loop.run_in_executor(None, produce)
    try:
        while (item := await queue.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        await asyncio.shield(done)
