"""Session: one conversation's transcript, who holds it, and its life (open, turns, close, detach).

Each turn is a `chatrt.turn.Turn`: begun under the session's hold, finished once, its result recorded here by
`commit`. The transcript is the source of truth; the KV is a cache of it that any turn may crop, replace or drop.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from typing_extensions import Unpack

from chatrt.cache.kv import KV, KVMeta, common_prefix_len
from chatrt.cache.prefix import PrefixEntry
from chatrt.cache.record import SessionRecord
from chatrt.cache.reuse import shared_prefix
from chatrt.config import TurnOptions
from chatrt.errors import CloseIncomplete, SessionClosed, SessionConflict
from chatrt.hold import Hold
from chatrt.model import LoadedModel
from chatrt.parts import Parts
from chatrt.stats import SessionStats, TokenTotals, TurnStats
from chatrt.template import ChatTemplate, Message
from chatrt.turn import Plan, Reply, Turn, edit_plan, regenerate_plan, results_plan, send_plan, turn_inputs

__all__ = ["Reply", "Session", "Turn"]


class Session:
    def __init__(
        self,
        parts: Parts,
        session_id: str,
        system_prompt: str | None,
        *,
        messages: list[Message] | None = None,
        turns: int = 0,
        cache_scope: str = "",
        prefix: PrefixEntry | None = None,
    ) -> None:
        """`prefix`: the shared prefix this session starts from, acquired for it (a fork point); by default its
        system prompt's, acquired here."""
        self.parts = parts
        self.id = session_id
        self.system_prompt = system_prompt
        self.messages: list[Message] = messages or []  # the turns; the system prompt is kept apart
        self.turns = turns
        self.cache_scope = cache_scope
        """Whose cached prefixes this session's turns may start from: idle sessions of the same scope."""
        self.last_turn: TurnStats | None = None
        self.totals = TokenTotals()
        self.closed = False
        self.used_at = time.monotonic()
        """When a turn last began or ended (time.monotonic()): what idle expiry goes by."""
        self._hold = Hold(session_id, wait=lambda: parts.config.session.on_busy == "wait")
        self._prefix = prefix
        if prefix is None and parts.config.prefix.enabled:
            self._prefix = parts.prefixes.acquire(parts.template.prefix_ids(system_prompt))

    # -- public API -------------------------------------------------------------------------------

    @property
    def transcript(self) -> list[Message]:
        return self.head + self.messages

    @property
    def model(self) -> LoadedModel:
        """The loaded model that answers this session."""
        return self.parts.engine.lm

    @property
    def template(self) -> ChatTemplate:
        """How this session's transcript becomes token ids (`template.render(session.transcript)`)."""
        return self.parts.template

    @property
    def kv(self) -> KV | None:
        """The session's cache when it is in this process's memory (device or host tier)."""
        return self.parts.tiers.peek(self.id)

    @property
    def tier(self) -> str:
        """Where the session's cache is now: device, host, redis or none."""
        return self.parts.tiers.where(self.id)

    def record(self, kv: KVMeta | None = None) -> SessionRecord:
        """The session as Redis keeps it, with `kv` (default: what the tiers know of its chunks in Redis)."""
        return SessionRecord(
            session_id=self.id,
            system_prompt=self.system_prompt,
            messages=self.messages,
            turns=self.turns,
            fingerprint=self.parts.info.fingerprint,
            cache_scope=self.cache_scope,
            kv=kv or self.parts.tiers.kv_meta(self.id),
        )

    def send(self, text: str, **options: Unpack[TurnOptions]) -> Reply:
        """Send a user message and return the whole reply."""
        return self.stream(text, **options).result()

    def stream(self, text: str, **options: Unpack[TurnOptions]) -> Turn:
        """Send a user message: iterate the returned turn for the reply's text as it is generated. The turn is
        recorded when the iteration ends (`turn.reply`); stopping early (`turn.close()`) keeps the text streamed
        so far as the reply (finish_reason 'cancelled')."""
        return self._turn(send_plan(text), options)

    def send_results(self, results: Mapping[str, str], **options: Unpack[TurnOptions]) -> Reply:
        """Answer the calls the last reply made (`reply.tool_calls`) with their results, {call id: text}, and
        return the model's reply to them (which may call tools again). Pass the same `tools` again: they are
        part of the prompt, and a prompt offered other tools reuses less of the cache."""
        return self.stream_results(results, **options).result()

    def stream_results(self, results: Mapping[str, str], **options: Unpack[TurnOptions]) -> Turn:
        return self._turn(results_plan(results), options)

    def regenerate(self, **options: Unpack[TurnOptions]) -> Reply:
        """Replace the last reply with a new one to what it answered (the user message, or the tool results)."""
        return self.stream_regenerate(**options).result()

    def stream_regenerate(self, **options: Unpack[TurnOptions]) -> Turn:
        return self._turn(regenerate_plan(self.messages), options)

    def edit(self, text: str, **options: Unpack[TurnOptions]) -> Reply:
        """Replace the last user message (and all that answered it) and answer the new one."""
        return self.stream_edit(text, **options).result()

    def stream_edit(self, text: str, **options: Unpack[TurnOptions]) -> Turn:
        return self._turn(edit_plan(self.messages, text), options)

    def fork(self, session_id: str | None = None) -> Session:
        """A new session that goes on from this conversation as it is now: its transcript, and its KV shared by
        reference (neither session copies it; it is kept once, as a shared prefix both start from). The two go
        on independently. Waits for a turn of this session that is running to finish."""
        with self._hold.lock:
            self._check_open()
            point = self._share()
            messages = list(self.messages)
        return self.parts.fork(self, messages, point, session_id)  # the fork's own reference to the point goes along

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
        self._hold.stop_turn()
        with self._hold.lock:  # once no turn holds it; Redis is asked after, the session closed to every turn
            if self.closed:
                return
            self._release()
        journal = self.parts.journal
        failed = journal.close_session(self.id) if journal is not None else None  # and a tombstone: refused everywhere
        self.parts.forget(self, True)
        if failed is not None:
            raise CloseIncomplete(
                f"session {self.id} is closed in this process, but Redis could not delete it ({failed}); chatrt "
                "retries until Redis answers and holds the session meanwhile, so no other process resumes it"
            )

    def detach(self) -> None:
        """Leave this process (runtime shutdown): with Redis the session and its KV stay there for another
        process to resume; the lease is given up. Memory here is freed either way. A running turn is stopped
        and recorded first, as by `close`."""
        self._hold.stop_turn()
        journal = self.parts.journal
        with self._hold.lock:
            if self.closed:
                return
            meta, kv = self.parts.tiers.take(self.id)
            record = self.record()
            self._release()
        if journal is not None:  # serialized and written once no turn can start
            chunks = None
            if kv is not None:
                meta, chunks = self.parts.tiers.chunks(kv)
            journal.hand_over(record.model_copy(update={"kv": meta}), chunks)
        self.parts.forget(self, False)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Session(id={self.id!r}, turns={self.turns}, kv_tokens={len(self.kv) if self.kv else 0})"

    # -- what a turn asks of its session (chatrt.turn) ------------------------------------------------

    @property
    def head(self) -> list[Message]:
        """The system message the transcript starts with, if any."""
        return [Message(role="system", content=self.system_prompt)] if self.system_prompt is not None else []

    @property
    def prefix(self) -> PrefixEntry | None:
        """The shared prefix (the system prompt's KV) this session holds a reference to."""
        return self._prefix

    def link(self, ids: tuple[int, ...]) -> tuple[KV, ...] | None:
        """The shared segments that hold exactly these leading ids (those of the prefix this session references,
        loaded or computed when not in memory): what its KV stored without them is joined to again."""
        entry, p = self._prefix, self.parts
        if entry is None or entry.ids != ids:  # stored on another prefix (a fork point): that one is referenced now
            if not p.config.prefix.enabled:
                return None
            entry = p.prefixes.acquire(ids)
            if self._prefix is not None:
                p.prefixes.release(self._prefix)
            self._prefix = entry
        return shared_prefix(entry, p.prefixes, p.spill, p.engine.compute_kv)[0].segments()

    def borrow(self, prompt: list[int], least: int) -> KV | None:
        """The cache of another idle session of this one's scope that begins like `prompt` for more than `least`
        tokens, cropped to where they part (views; its own tensors are copied by the turn that grows from it)."""
        p = self.parts
        if not p.config.prefix.enabled:
            return None
        owners, blocks = p.index.find(self.cache_scope, prompt, skip=self.id)
        best, longest = None, least
        for owner in owners if blocks > least else ():
            kv = p.tiers.peek(owner)  # None when it moved to Redis, or a turn has it now
            n = common_prefix_len(kv.ids, prompt) if kv is not None else 0
            if n > longest:
                best, longest = kv, n
        return best.crop(longest).to(p.engine.lm.device) if best is not None else None

    @property
    def busy(self) -> bool:
        """A turn holds the session now."""
        return self._hold.lock.locked()

    @property
    def closing(self) -> bool:
        """close() was called: a running turn stops at its next piece."""
        return self._hold.closing.is_set()

    @contextmanager
    def hold(self, turn: Turn, thread: int | None) -> Iterator[None]:
        """Hold the session for one turn: its lock (`session.on_busy` says whether to wait for it), then its
        lease. `thread`: the thread that reads the turn (None: an event loop); a turn asked for by a thread
        whose own turn of this session is suspended can never start (it would wait for itself): SessionBusy."""
        with self._hold.take(turn, thread):
            self._check_open()
            self.used_at = time.monotonic()
            with self._leased():
                yield

    def commit(self, messages: list[Message], stats: TurnStats, kv: KV | None) -> None:
        """A turn's result becomes the session's: its transcript, counts, and (with Redis) the stored record,
        with `kv` when configured to write it through. Caller holds the session (`hold`).
        Raises SessionConflict, after adopting the stored transcript, when another process wrote it meanwhile."""
        self.messages, self.used_at = messages, time.monotonic()
        self.turns += 1
        self.last_turn = stats
        self.totals.add(stats)
        p = self.parts
        if p.journal is None:
            return
        through = p.config.tiers.redis_write_through and kv is not None and p.config.session.reuse
        meta, chunks = p.tiers.chunks(kv) if through else (None, None)  # type: ignore[arg-type]
        try:  # the transcript is written through: it survives this process (and with it the KV, if configured)
            p.journal.save(self.record(kv=meta), chunks)
        except SessionConflict as e:  # not written over the other process's turn: back to what it stored
            conflict = SessionConflict(str(e), reply=messages[-1].content)
            with contextlib.suppress(SessionClosed):  # closed there: closed here too, the conflict says why
                self._resync()
            raise conflict from None

    def discard(self) -> None:
        """Forget this process's copy without a word to Redis (a session whose creation failed there)."""
        with self._hold.lock:
            self._release()

    # -- holding it ---------------------------------------------------------------------------------

    def _turn(self, plan: Plan, options: TurnOptions) -> Turn:
        self._check_open()
        params, tools = turn_inputs(self.parts.config, self.template, options, self.parts.info.vocab_size)
        return Turn(self, plan, params, tools)

    def _check_open(self) -> None:
        if self.closed:
            raise SessionClosed(f"session {self.id} is closed; open a new session")

    @contextmanager
    def _leased(self) -> Iterator[None]:
        """Hold the session's lease while the turn runs; a process that gets it back after another advanced the
        session adopts the newer transcript (the KV's ids sort out reuse). Caller holds _lock."""
        if self.parts.journal is None:
            yield
            return
        keep = not self.parts.config.tiers.redis_write_through
        with self.parts.journal.lease(self.id, on_retaken=self._resync, keep=keep):
            yield

    def _resync(self) -> None:
        """Adopt the stored transcript when another process wrote it. A session another process closed is
        closed here too (SessionClosed). Caller holds _lock."""
        assert self.parts.journal is not None
        try:
            record = self.parts.journal.newer(self.id)
        except SessionClosed:
            self._release()
            self.parts.forget(self, True)
            raise SessionClosed(f"session {self.id} was closed by another process; open a new session") from None
        if record is not None:
            self.messages, self.turns = record.messages, record.turns
            if record.kv is not None:  # the newer cache is the one that process stored; this one's is stale
                self.parts.tiers.drop(self.id)
                self.parts.tiers.adopt(record)

    def _share(self) -> PrefixEntry | None:
        """This session's KV as a shared prefix (no copy): this session references it from now on, and the
        returned entry is acquired once more, for a fork. None when its KV is not in memory (the fork's first
        turn then computes it, as a resumed session's does). Caller holds self._lock."""
        p = self.parts
        kv = p.tiers.peek(self.id)
        if kv is None or not len(kv) or not p.config.prefix.enabled:
            return None
        parent = self._prefix if kv.shared else None  # whose tensors kv references
        point = p.prefixes.adopt(kv.to(p.engine.lm.device), parent)
        p.prefixes.acquire(point.ids)  # the fork's reference
        if self._prefix is not None:
            p.prefixes.release(self._prefix)
        self._prefix = point
        assert point.kv is not None
        p.tiers.rebase(self.id, point.kv.referencing())
        return point

    def _release(self) -> None:
        """Drop the KV on every tier of this process and the prefix hold. Caller holds self._lock."""
        self.closed = True
        self.parts.tiers.drop(self.id)
        self.parts.index.remove(self.id)
        if self._prefix is not None:
            self.parts.prefixes.release(self._prefix)
            self._prefix = None
