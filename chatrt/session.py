"""Session: one conversation's transcript, its KV and the turn flow (reuse, a request to the engine, record).

The transcript is the source of truth; the KV is a cache of it that any turn may crop, replace or drop.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError
from typing_extensions import Unpack

from chatrt.cache.kv import KV, KVMeta
from chatrt.cache.prefix import PrefixEntry, PrefixStore
from chatrt.cache.record import SessionRecord
from chatrt.cache.reuse import Reuse, reuse
from chatrt.cache.tiers import Checkout, Tiers
from chatrt.config import OTHER_NAMES, Config, GenerationConfig, TurnOptions
from chatrt.engine import Engine, Generation, Request
from chatrt.errors import (
    CloseIncomplete,
    ConfigError,
    ContextLengthError,
    InvalidMessage,
    SessionBusy,
    SessionClosed,
    SessionConflict,
    SessionLeased,
    StoreUnavailable,
)
from chatrt.model import LoadedModel, ModelInfo
from chatrt.stats import Recorder, SessionStats, TokenTotals, TurnStats
from chatrt.template import ChatTemplate, Message, check_text

if TYPE_CHECKING:
    from chatrt.cache.journal import Journal

# A turn's plan: from the current history, the history to keep and the user message to answer.
Plan = Callable[[list[Message]], tuple[list[Message], Message]]


class Reply(BaseModel):
    text: str
    token_ids: tuple[int, ...]
    """The ids the model generated for this reply (the end-of-turn token excluded)."""
    stats: TurnStats


@dataclass
class Parts:
    """What a session works with, handed down by the runtime that owns them (a session never reaches back up).
    One object shared by the runtime's sessions: a config the runtime is given later applies to their next turns."""

    config: Config
    info: ModelInfo
    template: ChatTemplate
    engine: Engine
    tiers: Tiers
    prefixes: PrefixStore
    journal: Journal | None  # None without Redis
    recorder: Recorder
    forget: Callable[[Session, bool], None]
    """The runtime lets go of a session that ended (closed: True, or only left this process: False)."""


@dataclass
class Turn:
    """A turn between its two phases: its request running in the engine, and what recording it needs."""

    request: Request
    history: list[Message]
    user: Message
    prompt: list[int]
    taken: Checkout
    start: Reuse
    dropped: int
    hold: contextlib.ExitStack
    """The session hold, its lease: let go at the end of the turn."""


class Session:
    def __init__(
        self,
        parts: Parts,
        session_id: str,
        system_prompt: str | None,
        *,
        messages: list[Message] | None = None,
        turns: int = 0,
    ) -> None:
        self._p = parts
        self.id = session_id
        self.system_prompt = system_prompt
        self.messages: list[Message] = messages or []  # user/assistant turns; the system prompt is kept apart
        self.turns = turns
        self.last_turn: TurnStats | None = None
        self.totals = TokenTotals()
        self.closed = False
        self._lock = threading.Lock()
        self._turn_thread: int | None = None  # the thread whose turn holds _lock
        self._stream: Generator[str, None, None] | None = None  # that turn
        self._closing = threading.Event()
        self._prefix: PrefixEntry | None = None
        self._last_ids: tuple[int, ...] = ()
        if parts.config.prefix.enabled:
            self._prefix = parts.prefixes.acquire(parts.template.prefix_ids(system_prompt))

    # -- public API -------------------------------------------------------------------------------

    @property
    def transcript(self) -> list[Message]:
        return self._head() + self.messages

    @property
    def model(self) -> LoadedModel:
        """The loaded model that answers this session."""
        return self._p.engine.lm

    @property
    def template(self) -> ChatTemplate:
        """How this session's transcript becomes token ids (`template.render(session.transcript)`)."""
        return self._p.template

    @property
    def kv(self) -> KV | None:
        """The session's cache when it is in this process's memory (device or host tier)."""
        return self._p.tiers.peek(self.id)

    @property
    def tier(self) -> str:
        """Where the session's cache is now: device, host, redis or none."""
        return self._p.tiers.where(self.id)

    def record(self, kv: KVMeta | None = None) -> SessionRecord:
        """The session as Redis keeps it, with `kv` (default: what the tiers know of its chunks in Redis)."""
        return SessionRecord(
            session_id=self.id,
            system_prompt=self.system_prompt,
            messages=self.messages,
            turns=self.turns,
            fingerprint=self._p.info.fingerprint,
            kv=kv or self._p.tiers.kv_meta(self.id),
        )

    def send(self, text: str, **options: Unpack[TurnOptions]) -> Reply:
        """Send a user message and return the whole reply."""
        return self._complete(self.stream(text, **options))

    def stream(self, text: str, **options: Unpack[TurnOptions]) -> Generator[str, None, None]:
        """Send a user message and yield the reply's text as it is generated. The turn is recorded when the
        iteration ends; stopping early keeps the text streamed so far as the reply (finish_reason 'cancelled')."""
        return self._turn(*self._send_plan(text, options))

    def regenerate(self, **options: Unpack[TurnOptions]) -> Reply:
        """Replace the last reply with a new one for the same user message."""
        return self._complete(self.stream_regenerate(**options))

    def stream_regenerate(self, **options: Unpack[TurnOptions]) -> Generator[str, None, None]:
        return self._turn(*self._regenerate_plan(options))

    def edit(self, text: str, **options: Unpack[TurnOptions]) -> Reply:
        """Replace the last user message (and its reply) and answer the new one."""
        return self._complete(self.stream_edit(text, **options))

    def stream_edit(self, text: str, **options: Unpack[TurnOptions]) -> Generator[str, None, None]:
        return self._turn(*self._edit_plan(text, options))

    def stats(self) -> SessionStats:
        kv = self.kv
        return SessionStats(
            session_id=self.id,
            tier=self.tier,
            kv_tokens=len(kv) if kv else 0,
            kv_bytes=kv.nbytes if kv else 0,
            **self.totals.model_dump(exclude={"reused_tokens", "hit_rate"}),
        )

    def close(self) -> None:
        """End the conversation: its KV is freed on every tier, its Redis keys deleted, its prefix hold released.
        A reply streaming on another thread is stopped at its next piece and recorded; a stream of the calling
        thread is closed first. When another process has taken the session over meanwhile (this one's lease ran
        out), only this process's memory is freed: the session is the other process's now.

        Raises CloseIncomplete when Redis cannot be reached: the session is closed here, and the runtime retries
        the delete until Redis answers, holding the session's lease meanwhile so no other process resumes it."""
        self._stop_turn()
        failed: StoreUnavailable | None = None
        with self._lock:
            if self.closed:
                return
            self._release()
            journal = self._p.journal
            if journal is not None:
                try:
                    journal.delete(self.id)  # and a tombstone: rt.session(id) refuses it everywhere
                except SessionLeased:
                    pass
                except StoreUnavailable as e:
                    journal.delete_later(self.id)
                    failed = e
        self._p.forget(self, True)
        if failed is not None:
            raise CloseIncomplete(
                f"session {self.id} is closed in this process, but Redis could not delete it ({failed}); chatrt "
                "retries until Redis answers and holds the session meanwhile, so no other process resumes it"
            )

    def detach(self) -> None:
        """Leave this process (runtime shutdown): with Redis the session and its KV stay there for another
        process to resume; the lease is given up. Memory here is freed either way. A running turn is stopped
        and recorded first, as by `close`."""
        self._stop_turn()
        with self._lock:
            if self.closed:
                return
            journal = self._p.journal
            if journal is not None:
                meta, chunks = self._p.tiers.take_stored(self.id)
                with contextlib.suppress(SessionConflict):  # another process holds it now: it is that one's
                    journal.save(self.record(kv=meta), chunks)
                journal.leave(self.id)
            self._release()
        self._p.forget(self, False)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Session(id={self.id!r}, turns={len(self.messages) // 2}, kv_tokens={len(self.kv) if self.kv else 0})"

    # -- the turn ---------------------------------------------------------------------------------

    def _turn(self, plan: Plan, params: GenerationConfig) -> Generator[str, None, None]:
        self._check_open()

        def run() -> Generator[str, None, None]:
            turn = self._begin(plan, params, owner=stream)
            recorded = False
            try:
                # A consumer that closes the stream keeps what it got as the reply; the request is cancelled.
                with contextlib.closing(turn.request.stream()) as pieces, contextlib.suppress(GeneratorExit):
                    for piece in pieces:
                        yield piece
                        if self._closing.is_set():  # close() on another thread: stop at this piece
                            break
                recorded = True
            finally:
                self._end(turn, record=recorded)

        stream = run()
        return stream

    def _begin(self, plan: Plan, params: GenerationConfig, owner: Generator[str, None, None] | None) -> Turn:
        """A turn's first phase (it may block: the session held, its lease and its cache taken, maybe from
        Redis): render the prompt, decide reuse, submit the request. `owner`: the calling thread's stream of
        it (None when an event loop reads it)."""
        hold = contextlib.ExitStack()
        hold.enter_context(self._busy(owner))
        try:
            hold.enter_context(self._leased())
            started = time.perf_counter()
            history, user = plan(list(self.messages))
            history, prompt, dropped = self._fit(history, user, params)
            p = self._p
            taken = p.tiers.checkout(self.id)  # pinned until checked in
            try:
                start = reuse(prompt, taken.kv, self._prefix, p.prefixes, p.tiers, p.engine.compute_kv)
                gen = Generation(p.engine.lm, start.kv, prompt[len(start.kv or ()) :], params, started=started)
                request = p.engine.submit(gen)  # the engine loop runs it, batched with other turns
            except BaseException:
                p.tiers.checkin(self.id, None)
                raise
        except BaseException:
            hold.close()
            raise
        return Turn(request, history, user, prompt, taken, start, dropped, hold)

    def _end(self, turn: Turn, *, record: bool) -> None:
        """A turn's last phase, once its request has ended (it may block: the transcript written to Redis, the
        cache moved down the ladder): keep the reply as far as it was delivered, record it unless the turn
        failed, check the KV in, let the session go."""
        gen, request = turn.request.gen, turn.request
        if not request.ended.is_set():  # its reader was interrupted before the request ended: end it now
            request.cancel()
            request.ended.wait()
        try:
            if record:
                gen.cut(turn.request.delivered)
                self._record(gen, turn)
        finally:
            keep = self._p.config.session.reuse and not self.closed
            self._p.tiers.checkin(self.id, gen.kv if keep else None)
            turn.hold.close()

    def _record(self, gen: Generation, turn: Turn) -> None:
        start, taken = turn.start, turn.taken
        ids = tuple(gen.token_ids)
        # Keep the generated ids only when they spell the reply exactly (not after a stop string or a cancel).
        exact = self._p.template.decode(ids) == gen.text
        reply = Message(role="assistant", content=gen.text, token_ids=ids if exact else None)
        self.messages = [*turn.history, turn.user, reply]
        self.turns += 1
        self._last_ids = ids
        prefilled = len(turn.prompt) - start.session_tokens - start.prefix_tokens
        self._p.tiers.cost.observe("prefill", prefilled, gen.prefill_s + start.prefix_s)
        stats = TurnStats(
            session_id=self.id,
            prompt_tokens=len(turn.prompt),
            reused_session_tokens=start.session_tokens,
            reused_prefix_tokens=start.prefix_tokens,
            prefilled_tokens=prefilled,
            generated_tokens=len(ids),
            ttft_s=gen.ttft_s,
            prefill_s=gen.prefill_s + start.prefix_s,
            decode_s=gen.decode_s,
            decode_tokens_per_s=gen.decode_tokens_per_s,
            e2e_s=gen.ended_at - gen.started if gen.ended_at else 0.0,
            finish_reason=gen.finish_reason,
            kv_source=taken.source,
            restore_s=taken.restore_s,
            kv_decision=taken.rejected or (taken.choice.reason if taken.choice else ""),
            dropped_turns=turn.dropped,
        )
        self.last_turn = stats
        self.totals.add(stats)
        self._p.recorder.record(stats, turn.user.content, reply.content)
        if self._p.journal is None:
            return
        try:  # the transcript is written through: it survives this process (and with it the KV, if configured)
            if self._p.config.tiers.redis_write_through and gen.kv is not None and self._p.config.session.reuse:
                meta, chunks = self._p.tiers.chunks(gen.kv)
                self._p.journal.save(self.record(kv=meta), chunks)
            else:
                self._p.journal.save(self.record())
        except SessionConflict as e:  # not written over the other process's turn: back to what it stored
            conflict = SessionConflict(str(e), reply=gen.text)
            with contextlib.suppress(SessionClosed):  # closed there: closed here too, the conflict says why
                self._resync()
            raise conflict from None

    # -- checks and helpers -------------------------------------------------------------------------

    # -- the three kinds of turn, as (plan, options): checked when asked for, planned when the turn starts ------

    def _send_plan(self, text: str, options: TurnOptions) -> tuple[Plan, GenerationConfig]:
        user = self._user_message(text)
        return (lambda history: (history, user)), self._params(options)

    def _regenerate_plan(self, options: TurnOptions) -> tuple[Plan, GenerationConfig]:
        self._before_last_turn(self.messages)
        return (lambda history: (self._before_last_turn(history), history[-2])), self._params(options)

    def _edit_plan(self, text: str, options: TurnOptions) -> tuple[Plan, GenerationConfig]:
        user = self._user_message(text)
        self._before_last_turn(self.messages)
        return (lambda history: (self._before_last_turn(history), user)), self._params(options)

    def _complete(self, pieces: Iterator[str]) -> Reply:
        for _ in pieces:
            pass
        return self._reply()

    def _reply(self) -> Reply:
        """The last turn's reply."""
        assert self.last_turn is not None
        reply = self.messages[-1]
        return Reply(text=reply.content, token_ids=self._last_ids, stats=self.last_turn)

    def _params(self, options: TurnOptions | dict[str, Any]) -> GenerationConfig:
        for name in options:
            if name in OTHER_NAMES:
                raise ConfigError(f"unknown generation option {name!r}: chatrt calls it {OTHER_NAMES[name]!r}")
        defaults = self._p.config.generation.model_dump()
        try:
            return GenerationConfig.model_validate({**defaults, **options})
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
            raise ConfigError(f"invalid generation option: {problems}") from None

    def _user_message(self, text: str) -> Message:
        if not check_text(text, "a message").strip():
            raise InvalidMessage("the message is empty; type something to send")
        return Message(role="user", content=text)

    def _head(self) -> list[Message]:
        return [Message(role="system", content=self.system_prompt)] if self.system_prompt is not None else []

    @staticmethod
    def _before_last_turn(history: list[Message]) -> list[Message]:
        if len(history) < 2 or history[-1].role != "assistant":
            raise InvalidMessage("there is no reply to regenerate or edit yet; send a message first")
        return history[:-2]

    def _fit(
        self, history: list[Message], user: Message, params: GenerationConfig
    ) -> tuple[list[Message], list[int], int]:
        """The history to keep and the prompt, within the session's token limit. With `overflow = "drop_oldest"`
        the oldest turns (user message and reply) go first; returns how many turns were dropped."""
        cfg = self._p.config.session
        model_limit = self._p.info.max_context
        limit = min(cfg.max_tokens, model_limit) if cfg.max_tokens else model_limit
        dropped = 0
        while True:
            prompt = self._p.template.render([*self._head(), *history, user])
            if len(prompt) + params.max_new_tokens <= limit:
                return history, prompt, dropped
            if cfg.overflow != "drop_oldest" or len(history) < 2:
                what = "the session's max_tokens" if limit < model_limit else "the model's context"
                raise ContextLengthError(
                    f"the prompt has {len(prompt)} tokens and max_new_tokens is {params.max_new_tokens}, more than "
                    f"{what} of {limit}; send a shorter message, ask for fewer new tokens, start a new session, "
                    "or set session.overflow = 'drop_oldest'"
                )
            history, dropped = history[2:], dropped + 1

    def _check_open(self) -> None:
        if self.closed:
            raise SessionClosed(f"session {self.id} is closed; open a new session")

    @contextmanager
    def _busy(self, stream: Generator[str, None, None] | None) -> Iterator[None]:
        """Hold the session for one turn. A turn asked for by the thread whose own stream of this session is
        suspended can never start (that stream would wait for it): SessionBusy, whatever `on_busy` says. A turn
        read by an event loop (`stream` None) belongs to no thread."""
        me = threading.get_ident()
        if self._turn_thread == me:
            raise SessionBusy(
                f"this thread is still streaming a reply of session {self.id}; read it to the end or close it "
                "(stream.close()) before sending another message"
            )
        wait = self._p.config.session.on_busy == "wait"
        if not self._lock.acquire(blocking=wait):
            raise SessionBusy(
                f"session {self.id} is answering another message; wait for it to finish "
                "(or set session.on_busy = 'wait' to queue turns)"
            )
        self._turn_thread, self._stream = (me if stream is not None else None), stream
        try:
            self._check_open()
            yield
        finally:
            self._turn_thread = self._stream = None
            self._lock.release()

    def _stop_turn(self) -> None:
        """Before closing: a turn streaming on another thread stops at its next piece; a stream of this thread,
        suspended between pieces, is closed now (its text so far recorded), since waiting for it would be
        waiting for ourselves."""
        self._closing.set()
        stream = self._stream
        if stream is not None and self._turn_thread == threading.get_ident():
            stream.close()

    @contextmanager
    def _leased(self) -> Iterator[None]:
        """Hold the session's lease while the turn runs; a process that gets it back after another advanced the
        session adopts the newer transcript (the KV's ids sort out reuse). Caller holds _lock."""
        if self._p.journal is None:
            yield
            return
        keep = not self._p.config.tiers.redis_write_through
        with self._p.journal.lease(self.id, on_retaken=self._resync, keep=keep):
            yield

    def _resync(self) -> None:
        """Adopt the stored transcript when another process wrote it. A session another process closed is
        closed here too (SessionClosed). Caller holds _lock."""
        assert self._p.journal is not None
        try:
            record = self._p.journal.newer(self.id)
        except SessionClosed:
            self._release()
            self._p.forget(self, True)
            raise SessionClosed(f"session {self.id} was closed by another process; open a new session") from None
        if record is not None:
            self.messages, self.turns = record.messages, record.turns
            if record.kv is not None:  # the newer cache is the one that process stored; this one's is stale
                self._p.tiers.drop(self.id)
                self._p.tiers.adopt(record)

    def _release(self) -> None:
        """Drop the KV on every tier of this process and the prefix hold. Caller holds self._lock."""
        self.closed = True
        self._p.tiers.drop(self.id)
        if self._prefix is not None:
            self._p.prefixes.release(self._prefix)
            self._prefix = None
