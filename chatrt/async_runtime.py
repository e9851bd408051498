"""AsyncChatRuntime and AsyncSession: the session API for event loops, run on worker threads.

The model runs in a thread, so the loop stays free; streamed pieces cross over through an asyncio queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Generator
from pathlib import Path
from typing import Any, Self

from chatrt.config import Config
from chatrt.model import Progress
from chatrt.runtime import ChatRuntime
from chatrt.session import Reply, Session, StreamStopped
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


async def _stream(start: Callable[[], Generator[str, None, None]]) -> AsyncIterator[str]:
    """Run a session's stream on a thread and yield its pieces here, one piece per piece asked for: the thread
    never runs ahead of the consumer, so the reply it records is exactly what the consumer received. On the way
    out (finished, break, cancel, error) the thread is told how much was received and awaited, so the turn is
    recorded before control returns."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[object] = asyncio.Queue()
    asked = threading.Semaphore(0)  # released once per piece the consumer asks for, and once to stop
    delivered: int | None = None  # set when the consumer stops early: the characters it received

    def put(item: object) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, item)

    def produce() -> None:
        try:
            pieces = start()
        except BaseException as e:  # handed to the consumer, raised there
            put(e)
            return
        try:
            while asked.acquire() and delivered is None:
                try:
                    item: object = next(pieces, _END)
                except BaseException as e:
                    put(e)
                    return
                put(item)
                if item is _END:
                    return
            # The consumer stopped: only what it received is the reply (a piece in flight is not).
            with contextlib.suppress(StopIteration, StreamStopped):
                pieces.throw(StreamStopped(delivered))
        finally:
            pieces.close()

    done = loop.run_in_executor(None, produce)
    received, ended = 0, False
    try:
        while True:
            asked.release()
            item = await queue.get()
            if item is _END or isinstance(item, BaseException):
                ended = True
                if item is _END:
                    return
                raise item
            received += len(item)  # type: ignore[arg-type]
            yield item  # type: ignore[misc]
    finally:
        if not ended:
            delivered = received
            asked.release()
        await asyncio.shield(done)  # an error recording the turn (SessionConflict) is raised here
