"""A turn is one object that always ends once: however its reader stops (to the end, a stop string before any
text, closed early or before it began, failed, a cancelled task, a cancel scope), it finishes exactly once,
records what the reader received, and only then lets the session go."""

from __future__ import annotations

import asyncio

import anyio
import pytest

from chatrt import AsyncChatRuntime, ConfigError, ContextLengthError
from chatrt.engine import runner
from chatrt.turn import Turn
from tests.conftest import tiered
from tests.test_session import assert_exact, assert_kv_agrees


def finishes(turn: Turn) -> list[tuple[str, int]]:
    """Each call of the turn's done-callback: the state it saw and how many messages the session held then."""
    seen: list[tuple[str, int]] = []
    turn.add_done_callback(lambda t: seen.append((t.state, len(t.session.messages))))
    return seen


def first_piece(session, text: str) -> str:
    """The first piece of text the model answers `text` with (greedy), from a throwaway session."""
    with tiered(session.model) as rt:
        other = rt.open_session(session.system_prompt)
        return next(iter(other.stream(text)))


@pytest.fixture
def once(tiny_lm):
    """A runtime whose sessions refuse a second turn instead of waiting: a session not let go fails loudly."""
    rt = tiered(tiny_lm)
    rt.config = rt.config.with_values(session={"on_busy": "raise"})
    yield rt
    rt.close()


def test_a_stop_string_in_the_first_piece_ends_the_reply_empty_and_the_next_turn_is_exact(once):
    s = once.open_session()
    stop = first_piece(s, "Hi!")
    assert stop
    turn = s.stream("Hi!", stop=[stop])
    seen = finishes(turn)
    assert list(turn) == []
    reply = turn.reply
    assert reply is not None and reply.text == "" and reply.token_ids == ()
    assert reply.stats.finish_reason == "stop_string" and reply.stats.generated_tokens == 0
    assert [m.content for m in s.messages] == ["Hi!", ""] and seen == [("finished", 2)]
    assert_kv_agrees(s)
    assert_exact(s, s.send("And then?"), 12)


async def test_a_stop_string_before_any_text_through_the_async_api(tiny_lm):
    with tiered(tiny_lm) as rt:
        s = AsyncChatRuntime(rt)
        session = await s.open_session()
        stop = first_piece(session.sync, "Hi!")
        turn = session.stream("Hi!", stop=[stop])
        assert [p async for p in turn] == []
        reply = await turn.result()
        assert reply.text == "" and reply.stats.finish_reason == "stop_string" and reply.stats.generated_tokens == 0
        assert_exact(session.sync, await session.send("And then?"), 12)


def test_every_way_a_turn_ends_finishes_it_once_and_lets_the_session_go(once, monkeypatch):
    s = once.open_session()
    ended = []

    def run(turn: Turn, read) -> None:
        seen = finishes(turn)
        try:
            read(turn)
        except Exception as e:
            ended.append(type(e).__name__)
        assert [state for state, _ in seen] == ["finished"] and turn.finished
        turn.close()  # a second finish is nothing
        assert len(seen) == 1

    run(s.stream("to the end"), lambda t: t.result())
    run(s.stream("closed early", max_new_tokens=50), lambda t: (next(t), t.close()))
    run(s.stream("never read"), lambda t: t.close())
    run(s.stream("x " * 3000), lambda t: next(t))  # the prompt does not fit: it fails to begin
    monkeypatch.setattr(runner, "run", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    run(s.stream("a failed step"), lambda t: t.result())
    monkeypatch.undo()
    assert ended == ["ContextLengthError", "RuntimeError"]
    # Recorded: the whole reply, and the one closed early as far as it was read; nothing of the others.
    assert [m.content for m in s.messages][::2] == ["to the end", "closed early"]
    assert s.messages[3].content and s.turns == 2
    assert_exact(s, s.send("still free"), 12)  # on_busy = raise: a session not let go would refuse this


def test_a_turn_that_cannot_begin_raises_its_error_and_leaves_the_transcript(once):
    s = once.open_session()
    with pytest.raises(ContextLengthError):
        s.send("x " * 3000)
    assert s.messages == [] and s.turns == 0


async def test_a_cancel_scope_around_the_reader_still_records_the_turn_before_the_session_is_free(tiny_lm):
    """anyio's cancellation is level-triggered: every await inside the cancelled scope is cancelled, the ones in
    `finally` blocks too (what sse-starlette does to a stream whose client left). The turn finishes anyway, on
    a task of its own, and the session is free only once its reply is recorded."""
    with tiered(tiny_lm, max_new_tokens=500) as rt:
        rt.config = rt.config.with_values(session={"on_busy": "raise"})
        s = await AsyncChatRuntime(rt).open_session()
        turn = s.stream("tell me a long story")
        seen = finishes(turn.sync)
        received = ""
        with anyio.CancelScope() as scope:
            try:
                async for piece in turn:
                    received += piece
                    if len(received) > 5:
                        scope.cancel()
            finally:
                await turn.aclose()  # cancelled at once, like everything else in this scope
        assert scope.cancelled_caught
        reply = await turn.result()
        assert reply.text == received and reply.stats.finish_reason == "cancelled"
        assert seen == [("finished", 2)]  # recorded before the session was let go
        assert_exact(s.sync, await s.send("go on", max_new_tokens=12), 12)


async def test_a_task_cancelled_while_its_turn_begins_ends_it_unrecorded(tiny_lm):
    with tiered(tiny_lm) as rt:
        rt.config = rt.config.with_values(session={"on_busy": "raise"})
        s = await AsyncChatRuntime(rt).open_session()
        turn = s.stream("hello")
        seen = finishes(turn.sync)
        task = asyncio.ensure_future(anext(turn))
        await asyncio.sleep(0)  # its begin is on a worker thread now
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await turn.aclose()
        assert seen == [("finished", 0)] and turn.reply is None
        assert_exact(s.sync, await s.send("hello"), 12)



def test_a_logit_bias_on_a_token_the_model_does_not_have_is_refused_before_the_turn(runtime):
    s = runtime.open_session()
    with pytest.raises(ConfigError, match="logit_bias names token ids"):
        s.stream("hi", logit_bias={10**9: 1.0})
    assert s.send("hi", logit_bias={30: 100.0}).token_ids == (30,) * 12
