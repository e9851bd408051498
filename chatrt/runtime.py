"""ChatRuntime: the loaded model, the shared prefix store, the tier ladder, the open sessions and their stats.

This is what bots import; `from_config` loads everything a config names.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

if TYPE_CHECKING:
    from chatrt.board import Board
    from chatrt.cache.journal import Journal
    from chatrt.cache.store import RedisStore

from chatrt.cache.index import PrefixIndex
from chatrt.cache.kv import storage_bytes
from chatrt.cache.prefix import PrefixEntry, PrefixStore
from chatrt.cache.spill import PrefixSpill
from chatrt.cache.tiers import Tiers
from chatrt.config import Config
from chatrt.engine import Engine
from chatrt.errors import (
    ChatrtError,
    ConfigError,
    InvalidMessage,
    SessionClosed,
    SessionNotFound,
    StoreUnavailable,
    TooManySessions,
)
from chatrt.metrics import Metrics
from chatrt.model import LoadedModel, Progress, cache_root, load
from chatrt.parts import Parts
from chatrt.session import Session
from chatrt.stats import Recorder, RuntimeStats, TurnStats
from chatrt.template import ChatTemplate, Message, ToolCall, check_text, check_turns

log = logging.getLogger("chatrt")
turn_log = logging.getLogger("chatrt.turns")
REDIS_UNSIGNED = (
    "Redis is configured without tiers.redis_secret: whoever can write to that Redis can rewrite a stored "
    "session's transcript or KV (and recompute its sha256 digest), and this process will trust it on resume. "
    "Set tiers.redis_secret (CHATRT_TIERS__REDIS_SECRET) to the same secret on every process of the deployment: "
    "records and caches are then signed (HMAC-SHA256) and a forged one is refused."
)
_SESSION_ID = re.compile(r"[A-Za-z0-9_.-]{1,128}")


class ChatRuntime:
    def __init__(self, lm: LoadedModel, config: Config | None = None) -> None:
        self.lm = lm
        self._config = config or Config()
        self.template = ChatTemplate(lm.tokenizer)
        tiers = self.config.tiers
        self.store: RedisStore | None = None
        self.board: Board | None = None
        """Where this process publishes its stats for operators (with Redis)."""
        if tiers.redis_url:
            try:
                from chatrt.board import Board  # the Redis client is an optional install
                from chatrt.cache.store import RedisStore
            except ImportError:
                raise ConfigError("tiers.redis_url is set, but the Redis client is not installed: "
                                  "pip install 'chatrt[redis]'") from None  # fmt: skip

            self.store = RedisStore(
                tiers.redis_url,
                ttl_s=tiers.redis_ttl_s,
                lease_s=tiers.lease_s,
                timeout_s=tiers.redis_timeout_s,
                secret=tiers.redis_secret.get_secret_value(),
                cluster=tiers.redis_cluster,
            )
            self.board = Board(self.store)
            if not tiers.redis_secret.get_secret_value():
                log.warning(REDIS_UNSIGNED)
        compiled_dir = cache_root(self.config.model) / "compiled"  # beside the dequantized GGUF weights
        self.engine = Engine(lm, self.config.engine, device_bytes=tiers.device_bytes, compiled_dir=compiled_dir)
        self.tiers = Tiers(tiers, lm, self.store, compute=self.engine.compute_kv)
        self.spill = PrefixSpill(self.tiers)
        self.journal: Journal | None = None
        if self.store is not None:
            from chatrt.cache.journal import Journal

            self.journal = Journal(self.store, self.template, lm.info.fingerprint, self.tiers.count)
        self.prefixes = PrefixStore(
            lm.info.fingerprint,
            max_entries=self.config.prefix.max_entries,
            max_bytes=self.config.prefix.max_bytes,
            wait_s=self.config.prefix.wait_s,
            on_evict=self.spill.spill,
        )
        self.metrics = Metrics(self.stats, {"model": lm.info.name, "dtype": lm.info.dtype, "device": lm.info.device})
        self.recorder = Recorder(on_turn=self._turn_done)
        self._parts = Parts(
            self.config, lm.info, self.template, self.engine, self.tiers, self.prefixes, self.spill, self.journal,
            PrefixIndex(), self.recorder, forget=self._forget, fork=self._fork,
        )  # fmt: skip
        self.instance = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        """This process's name in the stats it publishes to Redis."""
        self._published = 0.0
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        if self.config.metrics.enabled:
            self.metrics.serve(self.config.metrics.host, self.config.metrics.port)

    @property
    def config(self) -> Config:
        return self._config

    @config.setter
    def config(self, config: Config) -> None:
        """A new config: its session and generation settings apply from the next turn (tiers, engine and
        metrics keep the ones they started with)."""
        self._config = self._parts.config = config

    @classmethod
    def from_config(cls, config: Config | str | Path | None = None, progress: Progress = lambda _: None) -> ChatRuntime:
        """Load the model a config names (a Config, a TOML path, or None for defaults + CHATRT_* overrides)."""
        if not isinstance(config, Config):
            config = Config.load(config)
        return cls(load(config.model, progress), config)

    def open_session(
        self,
        system_prompt: str | None = None,
        *,
        session_id: str | None = None,
        messages: Sequence[Message | dict[str, str]] = (),
        cache_scope: str = "",
    ) -> Session:
        """A new conversation. Without a system prompt the model's template default (if any) applies.
        With Redis, the id of a closed session may be used again; that of a stored one may not.

        `messages` seeds it with a history the caller kept (whole turns: user, assistant, ...; as Message or
        {"role", "content"} dicts): its KV is computed by the first turn, which then reuses it.

        A turn starts from the longest cached start of its prompt: this session's cache, its system prompt's, or
        another idle session's of the same `cache_scope` (a server gives each tenant and user its own scope)."""
        if system_prompt is not None:
            check_text(system_prompt, "the system prompt")
        history = check_turns([_message(m) for m in messages])
        return self._open(session_id, system_prompt, history, sum(m.role == "assistant" for m in history), cache_scope)

    def _open(self, session_id: str | None, system_prompt: str | None, history: list[Message], turns: int,
              cache_scope: str, prefix: PrefixEntry | None = None) -> Session:  # fmt: skip
        """Open and register a session. `prefix` (acquired for it) is the session's from here: released with it,
        or here when it cannot be opened."""
        try:
            session_id = uuid.uuid4().hex if session_id is None else check_session_id(session_id)
            with self._lock:
                if session_id in self._sessions:
                    raise InvalidMessage(f"session {session_id} is already open; use rt.session(id) to attach to it")
                self._check_room()
                session = Session(self._parts, session_id, system_prompt, messages=history, turns=turns,
                                  cache_scope=cache_scope, prefix=prefix)  # fmt: skip
                self._sessions[session_id] = session  # the id is taken before Redis is asked (outside the lock)
        except ChatrtError:
            if prefix is not None:  # released outside the lock: it may write an evicted prefix to Redis
                self.prefixes.release(prefix)
            raise
        if self.journal is not None:
            try:
                self.journal.create(session.record())
            except ChatrtError:
                session.discard()
                self._forget(session, closed=False)
                raise
        return session

    def _fork(self, parent: Session, history: list[Message], point: PrefixEntry | None, session_id: str | None) -> (
        Session
    ):  # fmt: skip
        """A session of `parent`'s system prompt and `history` that starts from `point` (its KV, shared)."""
        session = self._open(session_id, parent.system_prompt, history, parent.turns, parent.cache_scope, point)
        if point is not None and point.kv is not None:
            self.tiers.checkin(session.id, point.kv.referencing())  # its cache: the point, by reference
        return session

    def session(self, session_id: str) -> Session:
        """The session with this id: open here, or resumed from Redis with its transcript and KV (a bot's user
        coming back, maybe to another process). Raises SessionLeased while another process holds it,
        SessionClosed when it was closed, SessionNotFound when there is none (or its record cannot be trusted)."""
        check_session_id(session_id)
        with self._lock:
            session = self._sessions.get(session_id)
        if session is not None:
            return session
        journal = self.journal
        if journal is None:
            raise SessionNotFound(f"no open session has id {session_id!r}; open a new one")
        if journal.deleting(session_id):  # closed here while Redis was away
            raise SessionClosed(f"session {session_id} was closed; open a new session")
        record = journal.resume(session_id)  # leased: no other process writes it meanwhile
        with self._lock:
            if session_id in self._sessions:  # another thread resumed it meanwhile
                return self._sessions[session_id]
            try:
                self._check_room()
            except TooManySessions:
                journal.leave(session_id)
                raise
            session = Session(self._parts, session_id, record.system_prompt, messages=record.messages,
                              turns=record.turns, cache_scope=record.cache_scope)  # fmt: skip
            self._sessions[session_id] = session
        if self.tiers.adopt(record):  # its KV cannot be used: the transcript is all that is kept
            journal.drop_kv(session_id)
        return session

    def sessions(self) -> list[Session]:
        with self._lock:
            return list(self._sessions.values())

    def stats(self) -> RuntimeStats:
        totals, closed = self.recorder.snapshot()
        sessions = self.sessions()
        counters = self.prefixes.counters
        running, waiting = self.engine.load
        return RuntimeStats(
            instance=self.instance,
            **totals.model_dump(exclude={"reused_tokens", "hit_rate"}),
            sessions_open=len(sessions),
            sessions_closed=closed,
            kv_bytes=storage_bytes(t for s in sessions if (kv := s.kv) is not None for t in kv.tensors()),
            prefix_entries=len(self.prefixes),
            prefix_bytes=self.prefixes.nbytes,
            prefix_hits=counters.hits,
            prefix_misses=counters.misses,
            prefix_evictions=counters.evictions,
            tiers=self.tiers.usage(),
            tier_counters=self.tiers.counters.model_copy(),
            redis="off" if self.store is None else "ok" if self.store.up else "down",
            requests_running=running,
            requests_waiting=waiting,
            preemptions=self.engine.preemptions,
            decode_step=self.engine.decode_step(),
        )

    def publish_stats(self) -> None:
        """Write this process's stats to Redis for `chatrt stats --redis`; they expire after three periods."""
        if self.board is None:
            return
        self._published = time.monotonic()
        try:
            self.board.publish(self.instance, self.stats(), ttl_s=max(3 * self.config.metrics.publish_s, 30))
        except StoreUnavailable:
            self.tiers.count(redis_errors=1)

    def close(self) -> None:
        """Free all of this process's memory. Sessions are not closed for good: with Redis configured they stay
        there with their KV (until their TTL) for another process to resume; without Redis they are gone."""
        for session in self.sessions():
            session.detach()
        if self.journal is not None:
            self.journal.close()
        self.engine.close()
        self.tiers.clear()
        self.prefixes.clear()
        self.metrics.close()
        if self.store is not None and self.board is not None:
            with contextlib.suppress(StoreUnavailable):
                self.board.remove(self.instance)
            self.store.close()

    def __enter__(self) -> ChatRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _turn_done(self, turn: TurnStats, user: str, reply: str) -> None:
        self.metrics.observe(turn)
        if self.config.log.turns:
            log_turn(turn, user, reply, text=self.config.log.text)
        period = self.config.metrics.publish_s
        if period and time.monotonic() - self._published >= period:
            self.publish_stats()

    def _forget(self, session: Session, closed: bool) -> None:
        with self._lock:
            if self._sessions.get(session.id) is session:
                del self._sessions[session.id]
                if closed:
                    self.recorder.closed()

    def _check_room(self) -> None:
        if len(self._sessions) >= self.config.session.max_sessions:
            raise TooManySessions(
                f"{len(self._sessions)} sessions are open, the configured session.max_sessions; close some first"
            )


def log_turn(turn: TurnStats, user: str, reply: str, *, text: bool) -> None:
    """One JSON line for the turn on the `chatrt.turns` logger; stderr when the application set up none."""
    if not turn_log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        turn_log.addHandler(handler)
    turn_log.setLevel(logging.INFO)
    line = {"event": "turn", **turn.model_dump()}
    if text:
        line |= {"user": user, "reply": reply}
    turn_log.info(json.dumps(line, ensure_ascii=False))


def _message(m: object) -> Message:
    """A history entry as given (a Message, or a dict with role and content, and a reply's tool_calls or a tool
    result's tool_call_id as OpenAI's messages carry them); its text only, never token ids."""
    if isinstance(m, Message):
        return Message(role=m.role, content=m.content, tool_calls=m.tool_calls, tool_call_id=m.tool_call_id)
    if isinstance(m, dict) and set(m) <= {"role", "content", "tool_calls", "tool_call_id"}:
        try:
            calls = tuple(ToolCall.of(c) for c in m.get("tool_calls") or ())
            content = "" if m.get("content") is None and calls else m.get("content")  # a call's may be null
            return Message(role=m.get("role"), content=content, tool_calls=calls,  # type: ignore[arg-type]
                           tool_call_id=m.get("tool_call_id"))  # fmt: skip
        except ValidationError as e:
            raise InvalidMessage(f"a history message is not valid: {e.errors()[0]['msg']}") from None
        except ValueError as e:
            raise InvalidMessage(f"a history message is not valid: {e}") from None
    raise InvalidMessage(f"a history message is a Message or a dict with 'role' and 'content', not {m!r:.60}")


def check_session_id(session_id: object) -> str:
    if not isinstance(session_id, str) or not _SESSION_ID.fullmatch(session_id):
        raise InvalidMessage(
            f"a session id is a string of 1 to 128 letters, digits, '.', '_' or '-', not {session_id!r:.60}"
        )
    return session_id

