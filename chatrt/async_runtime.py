"""AsyncChatRuntime and AsyncSession: the session API for event loops.

A turn's two blocking phases (taking the session and its cache, maybe from Redis; recording the reply) run on a
worker thread; between them the event loop reads the request's pieces straight from the engine, so a stream
holds no thread while it waits for the model.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Self

from typing_extensions import Unpack

from chatrt.config import Config, GenerationConfig, TurnOptions
from chatrt.model import Progress
from chatrt.runtime import ChatRuntime
from chatrt.session import Plan, Reply, Session
from chatrt.stats import RuntimeStats, SessionStats, TurnStats
from chatrt.template import Message


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

    async def send(self, text: str, **options: Unpack[TurnOptions]) -> Reply:
        return await self._complete(self.stream(text, **options))

    async def regenerate(self, **options: Unpack[TurnOptions]) -> Reply:
        return await self._complete(self.stream_regenerate(**options))

    async def edit(self, text: str, **options: Unpack[TurnOptions]) -> Reply:
        return await self._complete(self.stream_edit(text, **options))

    def stream(self, text: str, **options: Unpack[TurnOptions]) -> AsyncIterator[str]:
        """Pieces of the reply as they are generated. Leaving the loop early (break, or the task cancelled)
        stops generation: the text so far is the reply, as with `Session.stream`."""
        return _stream(self.sync, lambda: self.sync._send_plan(text, options))

    def stream_regenerate(self, **options: Unpack[TurnOptions]) -> AsyncIterator[str]:
        return _stream(self.sync, lambda: self.sync._regenerate_plan(options))

    def stream_edit(self, text: str, **options: Unpack[TurnOptions]) -> AsyncIterator[str]:
        return _stream(self.sync, lambda: self.sync._edit_plan(text, options))

    async def _complete(self, pieces: AsyncIterator[str]) -> Reply:
        async for _ in pieces:
            pass
        return self.sync._reply()

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

    async def open_session(
        self,
        system_prompt: str | None = None,
        *,
        session_id: str | None = None,
        messages: Sequence[Message | dict[str, str]] = (),
    ) -> AsyncSession:
        session = await asyncio.to_thread(
            self.sync.open_session, system_prompt, session_id=session_id, messages=messages
        )
        return AsyncSession(session)

    async def session(self, session_id: str) -> AsyncSession:
        return AsyncSession(await asyncio.to_thread(self.sync.session, session_id))

    def stats(self) -> RuntimeStats:
        return self.sync.stats()


async def _stream(session: Session, plan: Callable[[], tuple[Plan, GenerationConfig]]) -> AsyncIterator[str]:
    """A turn of `session`, its pieces read on this event loop. On the way out (finished, break, cancel, error)
    the request is ended and the turn recorded before control returns; a consumer that stopped early keeps
    exactly the characters it received as the reply."""
    session._check_open()
    begin = asyncio.ensure_future(asyncio.to_thread(session._begin, *plan(), None))
    try:
        turn = await asyncio.shield(begin)
    except asyncio.CancelledError:  # the turn may start anyway: it is ended unrecorded, the session let go
        with contextlib.suppress(Exception):
            turn = await begin
            turn.request.cancel()
            await asyncio.to_thread(turn.request.ended.wait)
            await asyncio.to_thread(session._end, turn, record=False)
        raise
    recorded = False
    try:
        async with contextlib.aclosing(turn.request.astream()) as pieces:  # closed here: the request ends now
            async for piece in pieces:
                yield piece
                if session._closing.is_set():  # closed meanwhile: stop at this piece
                    break
        recorded = True
    except (GeneratorExit, asyncio.CancelledError):
        recorded = True  # the consumer stopped: what it received is the reply
        raise
    finally:
        # Shielded: a cancelled consumer still waits for its turn to be recorded (SessionConflict is raised here).
        await asyncio.shield(asyncio.to_thread(session._end, turn, record=recorded))
