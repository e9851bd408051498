"""AsyncChatRuntime: the same exact replies from an event loop, and a stream left early (break, cancel)
leaves the session consistent."""

from __future__ import annotations

import asyncio
from contextlib import aclosing

import pytest

from chatrt import AsyncChatRuntime, InvalidMessage
from tests.test_session import assert_exact, assert_kv_agrees


@pytest.fixture
def art(runtime):
    return AsyncChatRuntime(runtime)


async def test_send_and_stream_are_exact(art):
    s = await art.open_session(system_prompt="You are terse.")
    assert_exact(s.sync, await s.send("hello there"), 12)
    pieces = [p async for p in s.stream("and then?")]
    assert "".join(pieces) == s.sync.messages[-1].content
    assert s.last_turn.reused_session_tokens > 0 and s.tier == "device"
    assert_exact(s.sync, await s.regenerate(), 12)
    assert_exact(s.sync, await s.edit("and after that?"), 12)


async def test_breaking_out_of_a_stream_keeps_the_session_exact(art):
    s = await art.open_session()
    async with aclosing(s.stream("tell me a story", max_new_tokens=200)) as pieces:
        async for n, _ in aenumerate(pieces):
            if n == 2:
                break
    assert s.last_turn.finish_reason == "cancelled" and s.last_turn.generated_tokens < 200
    assert_exact(s.sync, await s.send("go on"), 12)


async def test_cancelling_the_task_stops_the_reply_and_records_it(art):
    s = await art.open_session()
    seen = asyncio.Event()

    async def consume() -> None:
        async for _ in s.stream("a very long answer", max_new_tokens=2000):
            seen.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(seen.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert s.last_turn.finish_reason == "cancelled" and s.last_turn.generated_tokens < 2000
    assert_exact(s.sync, await s.send("shorter please"), 12)


async def test_sessions_answer_concurrently_on_one_loop(art):
    sessions = [await art.open_session() for _ in range(4)]
    replies = await asyncio.gather(*(s.send(f"question {i}") for i, s in enumerate(sessions)))
    for s, reply in zip(sessions, replies, strict=True):
        assert_exact(s.sync, reply, 12)


async def test_errors_come_through_the_stream(art):
    s = await art.open_session()
    with pytest.raises(InvalidMessage):
        async for _ in s.stream("   "):
            pass
    await s.close()
    assert s.sync.closed


async def aenumerate(pieces):
    n = 0
    async for piece in pieces:
        yield n, piece
        n += 1


async def test_a_stopped_stream_records_exactly_what_its_consumer_received(art):
    """The worker thread must not run ahead of a slow consumer: the recorded reply is what the user saw."""
    s = await art.open_session()

    async def consume(text: str, received: list[str], stop_after: int) -> None:
        async with aclosing(s.stream(text, max_new_tokens=200)) as pieces:
            async for piece in pieces:
                received.append(piece)
                await asyncio.sleep(0.005)  # a slow consumer (a network, a screen)
                if len(received) == stop_after:
                    break

    for n in range(20):
        received: list[str] = []
        if n % 2:  # stopped by break
            await consume(f"story number {n}", received, n % 5 + 1)
        else:  # stopped by cancelling the task while it waits for the next piece
            task = asyncio.create_task(consume(f"story number {n}", received, 10**6))
            while len(received) < n % 5 + 1:
                await asyncio.sleep(0.001)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        assert s.sync.messages[-1].content == "".join(received), n
        assert s.last_turn.finish_reason == "cancelled"
        assert_kv_agrees(s.sync)  # the cache keeps the tokens of what was received, nothing after
    assert_exact(s.sync, await s.send("and now a whole reply"), 12)


async def test_streams_hold_no_thread_while_they_wait_for_the_model(art):
    """With one worker thread for the whole loop, four streams still decode together in the engine's batches:
    only a turn's start and its recording take a thread, not the wait for its pieces."""
    from concurrent.futures import ThreadPoolExecutor

    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=1))
    sessions = [await art.open_session() for _ in range(4)]
    engine = art.sync.engine
    steps, rows = engine.steps, engine.rows

    async def consume(s) -> str:
        return "".join([p async for p in s.stream("tell me about the sea", max_new_tokens=40)])

    texts = await asyncio.gather(*(consume(s) for s in sessions))
    assert (engine.rows - rows) / (engine.steps - steps) > 1.5  # one at a time would be 1 row per step
    for s, text in zip(sessions, texts, strict=True):
        assert text == s.sync.messages[-1].content
