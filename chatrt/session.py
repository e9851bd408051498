"""Session: one conversation's transcript, its KV and the turn flow (reuse, a request to the engine, record).

The transcript is the source of truth; the KV is a cache of it that any turn may crop, replace or drop.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from chatrt.config import GenerationConfig
from chatrt.engine import Generation, compute_kv
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
from chatrt.kv import KV, KVMeta, common_prefix_len
from chatrt.prefix import PrefixEntry
from chatrt.stats import SessionStats, TokenTotals, TurnStats
from chatrt.store import SessionRecord
from chatrt.template import Message, check_text
from chatrt.tiers import Checkout

if TYPE_CHECKING:
    from chatrt.runtime import ChatRuntime

# A turn's plan: from the current history, the history to keep and the user message to answer.
Plan = Callable[[list[Message]], tuple[list[Message], Message]]


class StreamStopped(Exception):
    """Thrown into a session's stream by a consumer that stopped reading it (the async API): only the first
    `delivered` characters reached the user, so only they are recorded as the reply."""

    def __init__(self, delivered: int) -> None:
        super().__init__(delivered)
        self.delivered = delivered


class Reply(BaseModel):
    text: str
    token_ids: tuple[int, ...]
    """The ids the model generated for this reply (the end-of-turn token excluded)."""
    stats: TurnStats


class Session:
    def __init__(
        self,
        rt: ChatRuntime,
        session_id: str,
        system_prompt: str | None,
        *,
        messages: list[Message] | None = None,
        turns: int = 0,
        rev: str = "",
    ) -> None:
        self.rt = rt
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
        self._revs = {rev}  # revs of the stored record that are this process's own writes (see _save)
        self._prefix: PrefixEntry | None = None
        self._last_ids: tuple[int, ...] = ()
        if rt.config.prefix.enabled:
            self._prefix = rt.prefixes.acquire(rt.template.prefix_ids(system_prompt))

    # -- public API -------------------------------------------------------------------------------

    @property
    def transcript(self) -> list[Message]:
        return self._head() + self.messages

    @property
    def kv(self) -> KV | None:
        """The session's cache when it is in this process's memory (device or host tier)."""
        return self.rt.tiers.peek(self.id)

    @property
    def tier(self) -> str:
        """Where the session's cache is now: device, host, redis or none."""
        return self.rt.tiers.where(self.id)

    def record(self, kv: KVMeta | None = None) -> SessionRecord:
        """The session as Redis keeps it, with `kv` (default: what the tiers know of its chunks in Redis)."""
        return SessionRecord(
            session_id=self.id,
            system_prompt=self.system_prompt,
            messages=self.messages,
            turns=self.turns,
            fingerprint=self.rt.lm.info.fingerprint,
            kv=kv or self.rt.tiers.kv_meta(self.id),
        )

    def send(self, text: str, **options: Any) -> Reply:
        """Send a user message and return the whole reply."""
        return self._complete(self.stream(text, **options))

    def stream(self, text: str, **options: Any) -> Generator[str, None, None]:
        """Send a user message and yield the reply's text as it is generated. The turn is recorded when the
        iteration ends; stopping early keeps the text streamed so far as the reply (finish_reason 'cancelled')."""
        user = self._user_message(text)
        return self._turn(lambda history: (history, user), self._params(options))

    def regenerate(self, **options: Any) -> Reply:
        """Replace the last reply with a new one for the same user message."""
        return self._complete(self.stream_regenerate(**options))

    def stream_regenerate(self, **options: Any) -> Generator[str, None, None]:
        self._before_last_turn(self.messages)
        return self._turn(lambda history: (self._before_last_turn(history), history[-2]), self._params(options))

    def edit(self, text: str, **options: Any) -> Reply:
        """Replace the last user message (and its reply) and answer the new one."""
        return self._complete(self.stream_edit(text, **options))

    def stream_edit(self, text: str, **options: Any) -> Generator[str, None, None]:
        user = self._user_message(text)
        self._before_last_turn(self.messages)
        return self._turn(lambda history: (self._before_last_turn(history), user), self._params(options))

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
            store = self.rt.store
            if store is not None:
                try:
                    store.delete_session(self.id)  # and a tombstone: rt.session(id) refuses it everywhere
                except SessionLeased:
                    pass
                except StoreUnavailable as e:
                    self.rt.tiers.count(redis_errors=1)
                    self.rt.leases.delete_later(self.id)  # type: ignore[union-attr]
                    failed = e
        self.rt._forget(self)
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
            store = self.rt.store
            if store is not None:
                meta, chunks = self.rt.tiers.take_stored(self.id)
                with contextlib.suppress(SessionConflict):  # another process holds it now: it is that one's
                    self._save(self.record(kv=meta), chunks)
                self._store_call(store.release_lease, self.id)
            self._release()
        self.rt._forget(self, closed=False)

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
            with self._busy(stream), self._leased():
                started = time.perf_counter()
                history, user = plan(list(self.messages))
                history, prompt, dropped = self._fit(history, user, params)
                taken = self.rt.tiers.checkout(self.id)  # pinned until checked in
                gen: Generation | None = None
                try:
                    kv, reused_session, reused_prefix, prefix_s = self._reuse(prompt, taken.kv)
                    gen = Generation(self.rt.lm, kv, prompt[len(kv or ()) :], params, started=started)
                    request = self.rt.engine.submit(gen)  # the engine loop runs it, batched with other turns
                    delivered = None
                    with contextlib.suppress(GeneratorExit):  # the consumer closed the stream: what it got is the reply
                        delivered = yield from self._pieces(request.stream())
                    if delivered is not None:
                        gen.cut(delivered)
                    self._record(gen, history, user, prompt, taken, reused_session, reused_prefix, prefix_s, dropped)
                finally:
                    keep = gen is not None and self.rt.config.session.reuse and not self.closed
                    self.rt.tiers.checkin(self.id, gen.kv if keep else None)  # type: ignore[union-attr]

        stream = run()
        return stream

    def _pieces(self, pieces: Generator[str, None, None]) -> Generator[str, None, int | None]:
        """Yield the reply's pieces until it ends or the session is being closed from another thread. Returns
        the characters delivered when a consumer said how many it received (StreamStopped thrown in), else None:
        everything yielded was received."""
        try:
            for piece in pieces:
                yield piece
                if self._closing.is_set():
                    break
        except StreamStopped as stop:
            return stop.delivered
        finally:
            pieces.close()  # a request not ended yet is cancelled, and ends with what was handed out
        return None

    def _reuse(self, prompt: list[int], own_kv: KV | None) -> tuple[KV | None, int, int, float]:
        """The longest cached start of `prompt`: the session's own KV, else the shared prefix.

        Returns (kv, reused session tokens, reused prefix tokens, seconds spent computing a missing prefix).
        At least one prompt token is always left to prefill: its logits give the first reply token.
        """
        limit = len(prompt) - 1
        kv, own = None, 0
        if own_kv is not None:
            own = min(common_prefix_len(own_kv.ids, prompt), limit)
            kv = own_kv.crop(own) if own else None
        entry = self._prefix
        if entry is None or not own < len(entry.ids) <= limit or tuple(prompt[: len(entry.ids)]) != entry.ids:
            return kv, own, 0, 0.0
        t0 = time.perf_counter()
        loaded = False

        def fill(ids: tuple[int, ...]) -> KV:
            nonlocal loaded
            stored = self.rt.tiers.load_prefix(entry.key, ids)
            loaded = stored is not None
            return stored if stored is not None else compute_kv(self.rt.lm, ids)

        prefix_kv, hit = self.rt.prefixes.kv(entry, fill)
        prefix_kv = prefix_kv.to(self.rt.lm.device)
        if hit or loaded:
            return prefix_kv, 0, len(entry.ids), 0.0
        return prefix_kv, 0, 0, time.perf_counter() - t0

    def _record(
        self,
        gen: Generation,
        history: list[Message],
        user: Message,
        prompt: list[int],
        taken: Checkout,
        reused_session: int,
        reused_prefix: int,
        prefix_s: float,
        dropped: int,
    ) -> None:
        ids = tuple(gen.token_ids)
        # Keep the generated ids only when they spell the reply exactly (not after a stop string or a cancel).
        exact = self.rt.template.decode(ids) == gen.text
        reply = Message(role="assistant", content=gen.text, token_ids=ids if exact else None)
        self.messages = [*history, user, reply]
        self.turns += 1
        self._last_ids = ids
        prefilled = len(prompt) - reused_session - reused_prefix
        self.rt.tiers.cost.observe("prefill", prefilled, gen.prefill_s + prefix_s)
        stats = TurnStats(
            prompt_tokens=len(prompt),
            reused_session_tokens=reused_session,
            reused_prefix_tokens=reused_prefix,
            prefilled_tokens=prefilled,
            generated_tokens=len(ids),
            ttft_s=gen.ttft_s,
            prefill_s=gen.prefill_s + prefix_s,
            decode_s=gen.decode_s,
            decode_tokens_per_s=gen.decode_tokens_per_s,
            finish_reason=gen.finish_reason,
            kv_source=taken.source,
            restore_s=taken.restore_s,
            kv_decision=taken.rejected or (taken.choice.reason if taken.choice else ""),
            dropped_turns=dropped,
        )
        self.last_turn = stats
        self.totals.add(stats)
        self.rt.recorder.record(stats)
        if self.rt.store is None:
            return
        try:  # the transcript is written through: it survives this process
            self._save(self.record())
        except SessionConflict as e:  # not written over the other process's turn: back to what it stored
            conflict = SessionConflict(str(e), reply=gen.text)
            with contextlib.suppress(SessionClosed):  # closed there: closed here too, the conflict says why
                self._resync()
            raise conflict from None

    # -- checks and helpers -------------------------------------------------------------------------

    def _complete(self, pieces: Iterator[str]) -> Reply:
        for _ in pieces:
            pass
        assert self.last_turn is not None
        reply = self.messages[-1]
        return Reply(text=reply.content, token_ids=self._last_ids, stats=self.last_turn)

    def _params(self, options: dict[str, Any]) -> GenerationConfig:
        defaults = self.rt.config.generation.model_dump()
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
        cfg = self.rt.config.session
        model_limit = self.rt.lm.info.max_context
        limit = min(cfg.max_tokens, model_limit) if cfg.max_tokens else model_limit
        dropped = 0
        while True:
            prompt = self.rt.template.render([*self._head(), *history, user])
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
    def _busy(self, stream: Generator[str, None, None]) -> Iterator[None]:
        """Hold the session for one turn. A turn asked for by the thread whose own stream of this session is
        suspended can never start (that stream would wait for it): SessionBusy, whatever `on_busy` says."""
        me = threading.get_ident()
        if self._turn_thread == me:
            raise SessionBusy(
                f"this thread is still streaming a reply of session {self.id}; read it to the end or close it "
                "(stream.close()) before sending another message"
            )
        wait = self.rt.config.session.on_busy == "wait"
        if not self._lock.acquire(blocking=wait):
            raise SessionBusy(
                f"session {self.id} is answering another message; wait for it to finish "
                "(or set session.on_busy = 'wait' to queue turns)"
            )
        self._turn_thread, self._stream = me, stream
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
        """Hold the session's lease for a turn, renewed in the background while the turn runs (a slow consumer
        must not lose the session to another process). A process that gets the lease back after another
        advanced the session adopts the newer transcript (the KV's ids sort out reuse). Caller holds _lock."""
        store, keeper = self.rt.store, self.rt.leases
        if store is None or keeper is None:
            yield
            return
        try:
            if not store.take_lease(self.id):  # taken anew: another process may have written meanwhile
                self._resync()
        except StoreUnavailable:
            self.rt.tiers.count(redis_errors=1)  # Redis down: the turn goes on in this process alone
        keeper.hold(self.id)
        try:
            yield
        finally:
            keeper.release(self.id)

    def _resync(self) -> None:
        """Adopt the stored transcript when another process wrote it. A session another process closed is
        closed here too (SessionClosed). Caller holds _lock."""
        try:
            record = self.rt.store.get_session(self.id)  # type: ignore[union-attr]
        except SessionClosed:
            self._release()
            self.rt._forget(self)
            raise SessionClosed(f"session {self.id} was closed by another process; open a new session") from None
        except StoreUnavailable:
            self.rt.tiers.count(redis_errors=1)
            return
        if record is not None and record.rev not in self._revs:
            self.messages, self.turns, self._revs = self.rt.adopt_messages(record), record.turns, {record.rev}

    def _save(self, record: SessionRecord, chunks: list[memoryview] | None = None) -> None:
        """Write the session to Redis, fenced: over a record this process wrote, never over another's
        (SessionConflict). With Redis down the write is counted and the turn goes on here; the rev it tried is
        remembered as this process's own, since the write may have landed before the connection broke."""
        rev = uuid.uuid4().hex
        try:
            self.rt.store.put_session(record.model_copy(update={"rev": rev}), replaces=self._revs, chunks=chunks)  # type: ignore[union-attr]
        except StoreUnavailable:
            self.rt.tiers.count(redis_errors=1)
            self._revs.add(rev)
            return
        self._revs = {rev}

    def _create_stored(self) -> None:
        """Store a new session and take its lease (InvalidMessage when the id exists in Redis, SessionLeased when
        another process holds it). With Redis down the session lives here; its first turn stores it."""
        rev = uuid.uuid4().hex
        try:
            self.rt.store.create_session(self.record().model_copy(update={"rev": rev}))  # type: ignore[union-attr]
        except StoreUnavailable:
            self.rt.tiers.count(redis_errors=1)
            self._revs.add(rev)  # as in _save: it may have landed
            return
        self._revs = {rev}

    def _store_call(self, fn: Callable[..., Any], *args: Any) -> None:
        """A call to Redis that must not cost a message: on failure it is counted and the turn goes on."""
        try:
            fn(*args)
        except StoreUnavailable:
            self.rt.tiers.count(redis_errors=1)

    def _release(self) -> None:
        """Drop the KV on every tier of this process and the prefix hold. Caller holds self._lock."""
        self.closed = True
        self.rt.tiers.drop(self.id)
        if self._prefix is not None:
            self.rt.prefixes.release(self._prefix)
            self._prefix = None
