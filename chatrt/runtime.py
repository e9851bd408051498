"""ChatRuntime: the loaded model, the shared prefix store, the tier ladder, the open sessions and their stats.

This is what bots import; `from_config` loads everything a config names.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import threading
import time
import uuid
from pathlib import Path

from chatrt.config import Config
from chatrt.engine import Engine
from chatrt.errors import (
    ChatrtError,
    InvalidMessage,
    SessionClosed,
    SessionNotFound,
    StoreUnavailable,
    TooManySessions,
)
from chatrt.leases import LeaseKeeper
from chatrt.metrics import Metrics
from chatrt.model import LoadedModel, Progress, load
from chatrt.prefix import PrefixStore
from chatrt.session import Session
from chatrt.stats import Recorder, RuntimeStats, TurnStats
from chatrt.store import RedisStore, SessionRecord
from chatrt.template import ChatTemplate, Message, check_text
from chatrt.tiers import Tiers

_SESSION_ID = re.compile(r"[A-Za-z0-9_.-]{1,128}")


class ChatRuntime:
    def __init__(self, lm: LoadedModel, config: Config | None = None) -> None:
        self.lm = lm
        self.config = config or Config()
        self.template = ChatTemplate(lm.tokenizer)
        tiers = self.config.tiers
        self.store: RedisStore | None = None
        self.leases: LeaseKeeper | None = None
        if tiers.redis_url:
            self.store = RedisStore(
                tiers.redis_url,
                ttl_s=tiers.redis_ttl_s,
                lease_s=tiers.lease_s,
                timeout_s=tiers.redis_timeout_s,
                secret=tiers.redis_secret.get_secret_value(),
            )
            self.leases = LeaseKeeper(self.store, period_s=tiers.lease_s / 3)
        self.tiers = Tiers(tiers, lm, self.store)
        self.engine = Engine(lm, self.config.engine)
        self.prefixes = PrefixStore(
            lm.info.fingerprint,
            max_entries=self.config.prefix.max_entries,
            max_bytes=self.config.prefix.max_bytes,
            on_evict=self.tiers.spill_prefix,
        )
        self.metrics = Metrics(self.stats)
        self.recorder = Recorder(on_turn=self._turn_done)
        self.instance = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        """This process's name in the stats it publishes to Redis."""
        self._published = 0.0
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        if self.config.metrics.enabled:
            self.metrics.serve(self.config.metrics.host, self.config.metrics.port)

    @classmethod
    def from_config(cls, config: Config | str | Path | None = None, progress: Progress = lambda _: None) -> ChatRuntime:
        """Load the model a config names (a Config, a TOML path, or None for defaults + CHATRT_* overrides)."""
        if not isinstance(config, Config):
            config = Config.load(config)
        return cls(load(config.model, progress), config)

    def open_session(self, system_prompt: str | None = None, *, session_id: str | None = None) -> Session:
        """A new conversation. Without a system prompt the model's template default (if any) applies.
        With Redis, the id of a closed session may be used again; that of a stored one may not."""
        session_id = uuid.uuid4().hex if session_id is None else check_session_id(session_id)
        if system_prompt is not None:
            check_text(system_prompt, "the system prompt")
        with self._lock:
            if session_id in self._sessions:
                raise InvalidMessage(f"session {session_id} is already open; use rt.session(id) to attach to it")
            self._check_room()
            session = Session(self, session_id, system_prompt)
            self._sessions[session_id] = session  # the id is taken here before Redis is asked (outside the lock)
        if self.store is not None:
            try:
                session._create_stored()
            except ChatrtError:
                session._release()
                self._forget(session, closed=False)
                raise
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
        if self.store is None:
            raise SessionNotFound(f"no open session has id {session_id!r}; open a new one")
        if self.leases is not None and session_id in self.leases.pending_deletes:  # closed here, Redis was away
            raise SessionClosed(f"session {session_id} was closed; open a new session")
        self.store.take_lease(session_id)  # first: no other process writes it while it is read
        try:
            record = self.store.get_session(session_id)
            if record is None:
                raise SessionNotFound(f"no session has id {session_id!r} here or in Redis; open a new one")
            messages = self._transcript(record)
            with self._lock:
                if session_id in self._sessions:  # another thread resumed it meanwhile
                    return self._sessions[session_id]
                self._check_room()
                session = Session(
                    self, session_id, record.system_prompt, messages=messages, turns=record.turns, rev=record.rev
                )
                self._sessions[session_id] = session
        except ChatrtError:
            with contextlib.suppress(StoreUnavailable):
                self.store.release_lease(session_id)
            raise
        if self.tiers.adopt(record):  # its KV cannot be used: the transcript is all that is kept
            session._store_call(self.store.put_kv, session_id, None)
        return session

    def adopt_messages(self, record: SessionRecord) -> list[Message]:
        """A stored transcript for this model. A message keeps its token ids only where they can be trusted: a
        reply this model wrote (same fingerprint) whose ids spell its text; every other message is tokenized
        from its text, so stored ids can never put control tokens into a prompt."""
        same = record.fingerprint == self.lm.info.fingerprint
        return [
            m
            if m.token_ids is None or (same and m.role == "assistant" and self.template.spells(m.token_ids, m.content))
            else m.model_copy(update={"token_ids": None})
            for m in record.messages
        ]

    def _transcript(self, record: SessionRecord) -> list[Message]:
        """The stored transcript, checked as a turn checks its input (a record written by hand or by another
        version must not break every later turn): text that is text, user and assistant turns in order."""
        problem = ""
        try:
            if record.system_prompt is not None:
                check_text(record.system_prompt, "its system prompt")
            for m in record.messages:
                check_text(m.content, "a message")
        except InvalidMessage as e:
            problem = str(e)
        roles = [m.role for m in record.messages]
        if not problem and roles != ["user", "assistant"] * (len(roles) // 2):
            problem = "its messages are not user and assistant turns in order"
        if problem:
            self.tiers.count(rejected=1)
            raise SessionNotFound(f"session {record.session_id}'s stored transcript cannot be used: {problem}")
        return self.adopt_messages(record)

    def sessions(self) -> list[Session]:
        with self._lock:
            return list(self._sessions.values())

    def stats(self) -> RuntimeStats:
        totals, closed = self.recorder.snapshot()
        sessions = self.sessions()
        counters = self.prefixes.counters
        return RuntimeStats(
            instance=self.instance,
            **totals.model_dump(exclude={"reused_tokens", "hit_rate"}),
            sessions_open=len(sessions),
            sessions_closed=closed,
            kv_bytes=_storage_bytes(s.kv for s in sessions),
            prefix_entries=len(self.prefixes),
            prefix_bytes=self.prefixes.nbytes,
            prefix_hits=counters.hits,
            prefix_misses=counters.misses,
            prefix_evictions=counters.evictions,
            tiers=self.tiers.usage(),
            tier_counters=self.tiers.counters.model_copy(),
            redis="off" if self.store is None else "ok" if self.store.up else "down",
        )

    def publish_stats(self) -> None:
        """Write this process's stats to Redis for `chatrt stats --redis`; they expire after three periods."""
        if self.store is None:
            return
        self._published = time.monotonic()
        try:
            self.store.put_runtime_stats(self.instance, self.stats(), ttl_s=max(3 * self.config.metrics.publish_s, 30))
        except StoreUnavailable:
            self.tiers.count(redis_errors=1)

    def close(self) -> None:
        """Free all of this process's memory. Sessions are not closed for good: with Redis configured they stay
        there with their KV (until their TTL) for another process to resume; without Redis they are gone."""
        for session in self.sessions():
            session.detach()
        if self.leases is not None:
            self.leases.close()
        self.engine.close()
        self.tiers.clear()
        self.prefixes.clear()
        self.metrics.close()
        if self.store is not None:
            with contextlib.suppress(StoreUnavailable):
                self.store.delete_runtime_stats(self.instance)
            self.store.close()

    def __enter__(self) -> ChatRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _turn_done(self, turn: TurnStats) -> None:
        self.metrics.observe(turn)
        period = self.config.metrics.publish_s
        if period and time.monotonic() - self._published >= period:
            self.publish_stats()

    def _forget(self, session: Session, *, closed: bool = True) -> None:
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


def check_session_id(session_id: object) -> str:
    if not isinstance(session_id, str) or not _SESSION_ID.fullmatch(session_id):
        raise InvalidMessage(
            f"a session id is a string of 1 to 128 letters, digits, '.', '_' or '-', not {session_id!r:.60}"
        )
    return session_id


def _storage_bytes(kvs) -> int:  # type: ignore[no-untyped-def]
    """Bytes of the distinct storages behind these caches (a shared tensor counted once)."""
    seen: dict[int, int] = {}
    for kv in kvs:
        if kv is None:
            continue
        for t in (*kv.keys, *kv.values):
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())
