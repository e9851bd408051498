"""AsyncChatRuntime and AsyncSession: the session API for event loops.

A turn's two blocking phases (taking the session and its cache, maybe from Redis; recording the reply) run on a
worker thread; between them the event loop reads the request's pieces straight from the engine, so a stream
holds no thread while it waits for the model (`chatrt.turn.AsyncTurn`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Self

from typing_extensions import Unpack

from chatrt.config import Config, TurnOptions
from chatrt.model import Progress
from chatrt.runtime import ChatRuntime
from chatrt.session import Session
from chatrt.stats import RuntimeStats, SessionStats, TurnStats
from chatrt.template import Message
from chatrt.turn import AsyncTurn, Reply


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
        return await self.stream(text, **options).result()

    async def send_results(self, results: Mapping[str, str], **options: Unpack[TurnOptions]) -> Reply:
        """`Session.send_results`: answer the last reply's tool calls with their results, {call id: text}."""
        return await self.stream_results(results, **options).result()

    async def fork(self, session_id: str | None = None) -> AsyncSession:
        """`Session.fork`: a new session that goes on from this one as it is now, sharing its KV."""
        return AsyncSession(await asyncio.to_thread(self.sync.fork, session_id))

    async def regenerate(self, **options: Unpack[TurnOptions]) -> Reply:
        return await self.stream_regenerate(**options).result()

    async def edit(self, text: str, **options: Unpack[TurnOptions]) -> Reply:
        return await self.stream_edit(text, **options).result()

    def stream(self, text: str, **options: Unpack[TurnOptions]) -> AsyncTurn:
        """Pieces of the reply as they are generated (`async for`); the recorded reply is `turn.reply` once the
        loop ends. Leaving early (break and `aclose()`, or the task cancelled) stops generation: the text so far
        is the reply, as with `Session.stream`."""
        return AsyncTurn(self.sync.stream(text, **options))

    def stream_results(self, results: Mapping[str, str], **options: Unpack[TurnOptions]) -> AsyncTurn:
        return AsyncTurn(self.sync.stream_results(results, **options))

    def stream_regenerate(self, **options: Unpack[TurnOptions]) -> AsyncTurn:
        return AsyncTurn(self.sync.stream_regenerate(**options))

    def stream_edit(self, text: str, **options: Unpack[TurnOptions]) -> AsyncTurn:
        return AsyncTurn(self.sync.stream_edit(text, **options))

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
