"""A turn: one user message (or one round of tool results) answered, as one object that always ends, exactly once.

    begin   hold the session (its lock, its lease), render the prompt, check its cache out of the tiers, pick
            the longest cached start, submit the request to the engine        (blocking: a thread runs it)
    pieces  read the request's channel: `for piece in turn` (a thread) or `async for piece in AsyncTurn`
    finish  end the request, cut the reply to what the reader received, record it, check the cache in, let
            the session go; then the done-callbacks, the stats, and the ladder settling (other sessions' moves)

However it ends (read to the end, a stop string, closed early, cancelled, failed, a client gone, a cancel scope
around the reader), `finish` runs once and only then can anyone else have the session. Its result stays on the
turn: `turn.reply` (text, ids, TurnStats), `turn.error`, and `turn.transcript`, the session's messages as this
turn left them.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncGenerator, Callable, Generator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ValidationError

from chatrt.cache.reuse import Reuse, reuse
from chatrt.cache.tiers import Checkout
from chatrt.config import OTHER_NAMES, Config, GenerationConfig, TurnOptions
from chatrt.engine import Generation, Request, TokenLogprob
from chatrt.engine.grammar import compile_schema, schema_of
from chatrt.errors import ConfigError, ContextLengthError, InvalidMessage, SchemaError
from chatrt.stats import TurnStats
from chatrt.template import ChatTemplate, Message, ToolCall, check_text, order_problem, turn_starts
from chatrt.tools import ToolError, ToolUse, tool_use

if TYPE_CHECKING:
    from chatrt.session import Session

Plan = Callable[[list[Message]], tuple[list[Message], list[Message]]]
"""From the session's history when the turn starts: the history to keep and the messages to answer (a user
message, or the results of the calls the last reply made)."""


class Reply(BaseModel):
    text: str
    """The reply's text (when it calls tools: its text before the calls)."""
    token_ids: tuple[int, ...]
    """The ids the model generated for this reply (the end-of-turn token and a stop string's tokens excluded)."""
    tool_calls: tuple[ToolCall, ...] = ()
    """The calls of the turn's tools the reply makes: answer each with `session.send_results`."""
    stats: TurnStats
    logprobs: tuple[TokenLogprob, ...] | None = None
    """Each of `token_ids` with its log-probability and the most likely alternatives (when the turn asked for
    `logprobs`)."""


# -- the three kinds of turn: checked when asked for, planned when the turn starts -------------------------


def send_plan(text: str) -> Plan:
    user = user_message(text)
    return lambda history: (history, answerable(history, [user]))


def results_plan(results: Mapping[str, str]) -> Plan:
    """The results of the calls the last reply made, by call id (every call answered)."""
    if not results:
        raise InvalidMessage("no tool results were given; pass {call id: result text} for each call")
    for call_id, text in results.items():
        check_text(call_id, "a tool call id")
        check_text(text, f"the result of call {call_id!r}")

    def plan(history: list[Message]) -> tuple[list[Message], list[Message]]:
        calls = [c.id for c in history[-1].tool_calls] if history else []
        if set(calls) != set(results):
            raise InvalidMessage(f"the last reply made the calls {calls} and results were given for {list(results)}; "
                                 "give one result for each call")  # fmt: skip
        return history, [Message(role="tool", content=results[c], tool_call_id=c) for c in calls]

    return plan


def regenerate_plan(messages: list[Message]) -> Plan:
    asked_from(messages)
    return lambda history: (history[: asked_from(history)], history[asked_from(history) : -1])


def edit_plan(messages: list[Message], text: str) -> Plan:
    user = user_message(text)
    last_user(messages)
    return lambda history: (history[: last_user(history)], [user])


def user_message(text: str) -> Message:
    if not check_text(text, "a message").strip():
        raise InvalidMessage("the message is empty; type something to send")
    return Message(role="user", content=text)


def answerable(history: list[Message], asked: list[Message]) -> list[Message]:
    """`asked` when the history goes on with them in order (a user message cannot skip the results of calls)."""
    if problem := order_problem([*history, *asked]):
        raise InvalidMessage(f"this message cannot come next: {problem}; send the results of the last reply's calls "
                             "first (send_results)")  # fmt: skip
    return asked


def asked_from(history: list[Message]) -> int:
    """Where the messages the last reply answered begin (its user message, or the tool results before it)."""
    if not history or history[-1].role != "assistant":
        raise InvalidMessage("there is no reply to regenerate or edit yet; send a message first")
    start = len(history) - 1
    while start > 0 and history[start - 1].role == "tool":
        start -= 1
    return start if start < len(history) - 1 else last_user(history)


def last_user(history: list[Message]) -> int:
    """The index of the last user message, when a reply to it was recorded."""
    starts = turn_starts(history)
    if not starts or history[-1].role != "assistant":
        raise InvalidMessage("there is no reply to regenerate or edit yet; send a message first")
    return starts[-1]


def turn_inputs(config: Config, template: ChatTemplate, options: TurnOptions | dict[str, Any],
                vocab_size: int) -> tuple[GenerationConfig, ToolUse | None]:  # fmt: skip
    """A turn's generation parameters and tools, from its options (see `generation_params`). A forced call is
    a JSON schema the reply follows."""
    options = dict(options)
    tools = tool_use(options.pop("tools", None), options.pop("tool_choice", None), takes_tools=template.takes_tools)
    if tools is not None and tools.forced is not None:
        if options.get("response_format") is not None or options.get("json_schema") is not None:
            raise ToolError("tool_choice", "a forced tool call and response_format both constrain the reply; ask "
                            "for one of them")  # fmt: skip
        if tools.calls is None:  # bare JSON (else a call block, by the tools' grammar)
            try:
                compile_schema(tools.forced.schema, "tools: a function's parameters schema")
            except SchemaError as e:
                raise ToolError("tools", str(e)) from None
            options["json_schema"] = tools.forced.schema
    return generation_params(config, options, vocab_size), tools


def generation_params(config: Config, options: TurnOptions | dict[str, Any], vocab_size: int) -> GenerationConfig:
    """The runtime's generation defaults with this turn's options over them, checked (against the model's
    vocabulary too)."""
    for name in options:
        if name in OTHER_NAMES:
            raise ConfigError(f"unknown generation option {name!r}: chatrt calls it {OTHER_NAMES[name]!r}")
    options = dict(options)
    if "response_format" in options:
        options["json_schema"] = schema_of(options.pop("response_format"))
    try:
        params = GenerationConfig.model_validate({**config.generation.model_dump(), **options})
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"invalid generation option: {problems}") from None
    if outside := [t for t in params.logit_bias if not 0 <= t < vocab_size]:
        raise ConfigError(f"invalid generation option: logit_bias names token ids {outside[:3]} that the model does "
                          f"not have (its ids are 0 to {vocab_size - 1})")  # fmt: skip
    if params.json_schema is not None:
        compile_schema(params.json_schema)  # a schema no grammar can follow is refused here, not at the first step
    return params


# -- the turn ------------------------------------------------------------------------------------------------


@dataclass
class Running:
    """What a begun turn holds until it finishes."""

    request: Request
    history: list[Message]
    asked: list[Message]
    prompt: list[int]
    taken: Checkout
    start: Reuse
    dropped: int
    hold: contextlib.ExitStack
    """The session's lock and lease: let go in `finish`, after the reply is recorded and the cache checked in."""


State = Literal["new", "running", "finished"]


class Turn:
    """One turn of `session`, read by a thread: iterate it for the reply's pieces (the first `next` begins it);
    stopping early (`close()`, or leaving a `with` block) keeps the text received so far as the reply, finish
    reason 'cancelled'. `result()` reads it to the end and returns the Reply."""

    def __init__(self, session: Session, plan: Plan, params: GenerationConfig, tools: ToolUse | None = None) -> None:
        self.session, self.plan, self.params, self.tools = session, plan, params, tools
        self.state: State = "new"
        self.reply: Reply | None = None
        """The recorded reply, once finished (None when the turn failed or never began)."""
        self.error: BaseException | None = None
        """Why the turn failed, once finished (the reply was then not recorded)."""
        self.transcript: list[Message] | None = None
        """The session's messages as this turn left them (recorded or not), once finished."""
        self._running: Running | None = None
        self._pieces: Generator[str, None, None] | None = None
        self._lock = threading.Lock()  # one finish; a second caller waits for the first
        self._callbacks: list[Callable[[Turn], None]] = []

    @property
    def finished(self) -> bool:
        return self.state == "finished"

    @property
    def request(self) -> Request:
        """The engine request of a begun turn."""
        assert self._running is not None, "the turn has not begun"
        return self._running.request

    def add_done_callback(self, fn: Callable[[Turn], None]) -> None:
        """Call `fn(turn)` once the turn has finished and let the session go (at once if it already has), on
        the thread that finished it."""
        with self._lock:
            if not self.finished:
                self._callbacks.append(fn)
                return
        fn(self)

    # -- reading it from a thread ------------------------------------------------------------------

    def __iter__(self) -> Turn:
        return self

    def __next__(self) -> str:
        if self.finished:
            raise StopIteration
        if self._pieces is None:
            self.begin(thread=threading.get_ident())
            self._pieces = self.request.stream()
        if self.session.closing:  # close() on another thread: stop at this piece
            self.finish()
            raise StopIteration
        try:
            return next(self._pieces)
        except StopIteration:
            self.finish()
        except BaseException as e:
            self.finish(failed=e)
            raise
        if self.error is not None:
            raise self.error
        raise StopIteration

    def close(self) -> None:
        """Stop here: the text received so far is the reply (a turn never begun is finished unrecorded)."""
        self.finish()

    def __enter__(self) -> Turn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def result(self) -> Reply:
        """Read the reply to its end; raises what the turn failed with."""
        for _ in self:
            pass
        if self.error is not None:
            raise self.error
        assert self.reply is not None
        return self.reply

    # -- its phases ------------------------------------------------------------------------------

    def begin(self, thread: int | None) -> None:
        """Hold the session, take its cache, submit the request (blocks: the lock, the lease, maybe Redis).
        `thread`: the thread that reads it (None: an event loop). A turn that cannot begin is finished with
        the error, which is raised."""
        assert self.state == "new", "a turn begins once"
        session, p = self.session, self.session.parts
        hold = contextlib.ExitStack()
        try:
            hold.enter_context(session.hold(self, thread))
            started = time.perf_counter()
            history, asked = self.plan(list(session.messages))
            history, prompt, dropped = fit(session, history, asked, self.params, self.tools)
            taken = p.tiers.checkout(session.id, session.link)  # pinned until checked in
            try:
                start = reuse(prompt, taken.kv, session.prefix, p.prefixes, p.spill, p.engine.compute_kv,
                              session.borrow)  # fmt: skip
                calls = self.tools.calls if self.tools is not None else None
                gen = Generation(p.engine.lm, start.kv, prompt[len(start.kv or ()) :], self.params, started=started,
                                 calls=calls)  # fmt: skip
                request = p.engine.submit(gen)  # the engine loop runs it, batched with other turns
            except BaseException:
                p.tiers.checkin(session.id, None)
                raise
        except BaseException as e:
            hold.close()
            self.error = e
            self.finish()  # as a turn never begun: unrecorded, its callbacks told
            raise
        self._running = Running(request, history, asked, prompt, taken, start, dropped, hold)
        self.state = "running"

    def finish(self, *, failed: BaseException | None = None, record: bool = True) -> None:
        """End the turn, once (a second call waits for the first): the request ends, the reply is cut to what
        the reader received and recorded (not when `failed`, or not `record`), the cache checked in, the
        session let go; then the done-callbacks, the turn's stats, and the ladder settles. Blocks."""
        with self._lock:
            if self.state == "finished":
                return
            if self.state == "running":
                self._end(failed, record)
            else:  # never begun: nothing to end, the session was never held
                self.transcript = list(self.session.messages)
            callbacks = self._mark_finished()
        for fn in callbacks:
            fn(self)
        p = self.session.parts
        if self._running is not None:  # hashed with no lock held: other sessions of its scope may start from it
            kv = None if self.session.closed else self.session.kv
            if kv is not None:
                p.index.add(self.session.id, self.session.cache_scope, kv.ids)
            else:
                p.index.remove(self.session.id)
        if self.reply is not None:  # metrics, the turn's log line, stats published to Redis: the session is free
            p.recorder.record(self.reply.stats, self._running.asked[-1].content, self.reply.text)  # type: ignore[union-attr]
        p.tiers.settle()  # other sessions' caches move down here, holding no session and no lock

    def _end(self, failed: BaseException | None, record: bool) -> None:
        running = self._running
        assert running is not None
        session, p = self.session, self.session.parts
        request, gen = running.request, running.request.gen
        if not request.ended.is_set():  # its reader stopped first
            request.cancel()
            request.ended.wait()
        try:
            if failed is None and record:
                gen.cut(request.delivered)
                self._record(gen, running)
        except BaseException as e:  # a conflict with another process's write: the turn's error
            self.error = e
        finally:
            keep = p.config.session.reuse and not session.closed
            p.tiers.checkin(session.id, gen.kv if keep else None)
            self.transcript = list(session.messages)
            running.hold.close()
        if failed is not None:
            self.error = failed

    def _mark_finished(self) -> list[Callable[[Turn], None]]:
        """Caller holds self._lock. Returns the callbacks to run once it is released."""
        self.state = "finished"
        callbacks, self._callbacks = self._callbacks, []
        return callbacks

    def _record(self, gen: Generation, r: Running) -> None:
        ids = tuple(gen.token_ids)
        # Keep the generated ids only when they spell the reply exactly (not after a stop string or a cancel).
        exact = self.session.template.decode(ids) == gen.text
        text, calls = self.tools.read(gen.text, gen.finish_reason == "stop") if self.tools else (gen.text, ())
        reply = Message(role="assistant", content=text, token_ids=ids if exact else None, tool_calls=calls)
        prefilled = len(r.prompt) - r.start.session_tokens - r.start.prefix_tokens
        self.session.parts.tiers.cost.observe("prefill", prefilled, gen.prefill_s + r.start.prefix_s)
        stats = TurnStats(
            session_id=self.session.id,
            prompt_tokens=len(r.prompt),
            reused_session_tokens=r.start.session_tokens,
            reused_prefix_tokens=r.start.prefix_tokens,
            prefilled_tokens=prefilled,
            generated_tokens=len(ids),
            ttft_s=gen.ttft_s,
            prefill_s=gen.prefill_s + r.start.prefix_s,
            decode_s=gen.decode_s,
            decode_tokens_per_s=gen.decode_tokens_per_s,
            e2e_s=gen.ended_at - gen.started if gen.ended_at else 0.0,
            finish_reason=gen.finish_reason,
            kv_source=r.taken.source,
            restore_s=r.taken.restore_s,
            kv_decision=r.taken.rejected or (r.taken.choice.reason if r.taken.choice else ""),
            dropped_turns=r.dropped,
        )
        logprobs = tuple(gen.logprobs) if gen.params.logprobs is not None else None
        self.reply = Reply(text=text, token_ids=ids, tool_calls=calls, stats=stats, logprobs=logprobs)
        self.session.commit([*r.history, *r.asked, reply], stats, gen.kv)


class AsyncTurn:
    """A Turn read by an event loop: `async for piece in turn`, `await turn.result()`, `await turn.aclose()`.
    Its blocking phases run on worker threads as tasks of their own: a reader cancelled at any await (a task
    cancel, a framework's cancel scope) leaves, and the turn still finishes, once, before the session is free."""

    def __init__(self, turn: Turn) -> None:
        self.sync = turn
        self._beginning: asyncio.Future[None] | None = None
        self._ending: asyncio.Future[None] | None = None
        self._pieces: AsyncGenerator[str, None] | None = None

    @property
    def reply(self) -> Reply | None:
        return self.sync.reply

    def __aiter__(self) -> AsyncTurn:
        return self

    async def __anext__(self) -> str:
        turn = self.sync
        if turn.finished or self._ending is not None:
            raise StopAsyncIteration
        if self._pieces is None:
            self._beginning = asyncio.ensure_future(asyncio.to_thread(turn.begin, None))
            try:
                await asyncio.shield(self._beginning)
            except asyncio.CancelledError:  # it may begin anyway: then it ends unrecorded
                await self._finish(record=False)
                raise
            self._pieces = turn.request.astream()
        if turn.session.closing:  # closed meanwhile: stop at this piece
            await self._finish()
            raise StopAsyncIteration
        try:
            return await anext(self._pieces)
        except StopAsyncIteration:
            await self._finish()
        except (asyncio.CancelledError, GeneratorExit):  # the reader stopped: what it received is the reply
            await self._finish()
            raise
        except BaseException as e:
            await self._finish(failed=e)
            raise
        if turn.error is not None:
            raise turn.error
        raise StopAsyncIteration

    async def aclose(self) -> None:
        """Stop here: the text received so far is the reply."""
        await self._finish()

    async def __aenter__(self) -> AsyncTurn:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def result(self) -> Reply:
        async for _ in self:
            pass
        await self._finish()
        if self.sync.error is not None:
            raise self.sync.error
        assert self.sync.reply is not None
        return self.sync.reply

    async def _finish(self, *, failed: BaseException | None = None, record: bool = True) -> None:
        """Start the finish as a task of its own (before anything is awaited, so a cancelled caller still
        starts it) and wait for it; a caller cancelled meanwhile leaves, and the finish goes on."""
        if self._ending is None:
            self._ending = asyncio.ensure_future(self._end(failed, record))
        await asyncio.shield(self._ending)

    async def _end(self, failed: BaseException | None, record: bool) -> None:
        if self._beginning is not None:
            with contextlib.suppress(Exception):  # a turn that failed to begin is already finished
                await self._beginning
        if self._pieces is not None:
            with contextlib.suppress(RuntimeError):  # still running in a reader that was cancelled: it ends there
                await self._pieces.aclose()  # no await in its cleanup: the request is only told to cancel
        await asyncio.to_thread(self.sync.finish, failed=failed, record=record)


def fit(session: Session, history: list[Message], asked: list[Message], params: GenerationConfig,
        tools: ToolUse | None = None) -> tuple[list[Message], list[int], int]:  # fmt: skip
    """The history to keep and the prompt, within the session's token limit. With `overflow = "drop_oldest"`
    the oldest turns (a user message and all that answered it) go first, never the turn whose calls `asked`
    answers; returns how many turns were dropped."""
    p = session.parts
    cfg, model_limit = p.config.session, p.info.max_context
    limit = min(cfg.max_tokens, model_limit) if cfg.max_tokens else model_limit
    definitions = tools.definitions if tools is not None else ()
    dropped = 0
    while True:
        prompt = p.template.render([*session.head, *history, *asked], tools=definitions)
        if len(prompt) + params.max_new_tokens <= limit:
            return history, prompt, dropped
        starts = turn_starts(history)
        cut = next((i for i in starts if i > 0), len(history))
        kept = starts[-1] if asked[0].role == "tool" else len(history)  # the turn whose calls are answered stays
        if cfg.overflow != "drop_oldest" or not history or cut > kept:
            what = "the session's max_tokens" if limit < model_limit else "the model's context"
            raise ContextLengthError(
                f"the prompt has {len(prompt)} tokens and max_new_tokens is {params.max_new_tokens}, more than "
                f"{what} of {limit}; send a shorter message, ask for fewer new tokens, start a new session, "
                "or set session.overflow = 'drop_oldest'"
            )
        history, dropped = history[cut:], dropped + 1
