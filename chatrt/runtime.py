"""ChatRuntime: the loaded model, the shared prefix store, the open sessions and the runtime's stats.

This is what bots import; `from_config` loads everything a config names.
"""

from __future__ import annotations

import re
import threading
import uuid
from pathlib import Path

from chatrt.config import Config
from chatrt.errors import InvalidMessage, SessionNotFound, TooManySessions
from chatrt.model import LoadedModel, Progress, load
from chatrt.prefix import PrefixStore
from chatrt.session import Session
from chatrt.stats import Recorder, RuntimeStats
from chatrt.template import ChatTemplate

_SESSION_ID = re.compile(r"[A-Za-z0-9_.-]{1,128}")


class ChatRuntime:
    def __init__(self, lm: LoadedModel, config: Config | None = None) -> None:
        self.lm = lm
        self.config = config or Config()
        self.template = ChatTemplate(lm.tokenizer)
        self.prefixes = PrefixStore(
            lm.info.fingerprint, max_entries=self.config.prefix.max_entries, max_bytes=self.config.prefix.max_bytes
        )
        self.recorder = Recorder()
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, config: Config | str | Path | None = None, progress: Progress = lambda _: None) -> ChatRuntime:
        """Load the model a config names (a Config, a TOML path, or None for defaults + CHATRT_* overrides)."""
        if not isinstance(config, Config):
            config = Config.load(config)
        return cls(load(config.model, progress), config)

    def open_session(self, system_prompt: str | None = None, *, session_id: str | None = None) -> Session:
        """A new conversation. Without a system prompt the model's template default (if any) applies."""
        if session_id is not None and not _SESSION_ID.fullmatch(session_id):
            raise InvalidMessage("a session id is 1 to 128 letters, digits, '.', '_' or '-'")
        session_id = session_id or uuid.uuid4().hex
        with self._lock:
            if session_id in self._sessions:
                raise InvalidMessage(f"session {session_id} is already open; use rt.session(id) to attach to it")
            if len(self._sessions) >= self.config.session.max_sessions:
                raise TooManySessions(
                    f"{len(self._sessions)} sessions are open, the configured session.max_sessions; close some first"
                )
            session = Session(self, session_id, system_prompt)
            self._sessions[session_id] = session
        return session

    def session(self, session_id: str) -> Session:
        """The open session with this id (a bot's user coming back)."""
        with self._lock:
            session = self._sessions.get(session_id)
        if session is None:
            raise SessionNotFound(f"no open session has id {session_id!r}; open a new one")
        return session

    def sessions(self) -> list[Session]:
        with self._lock:
            return list(self._sessions.values())

    def stats(self) -> RuntimeStats:
        totals, closed = self.recorder.snapshot()
        sessions = self.sessions()
        counters = self.prefixes.counters
        return RuntimeStats(
            **totals.model_dump(exclude={"reused_tokens", "hit_rate"}),
            sessions_open=len(sessions),
            sessions_closed=closed,
            kv_bytes=_storage_bytes(s.kv for s in sessions),
            prefix_entries=len(self.prefixes),
            prefix_bytes=self.prefixes.nbytes,
            prefix_hits=counters.hits,
            prefix_misses=counters.misses,
            prefix_evictions=counters.evictions,
        )

    def close(self) -> None:
        """Free every session's KV and the prefix store. Sessions are not closed for good: with Redis configured
        they stay there (until their TTL) for another process to resume."""
        for session in self.sessions():
            session.close()
        self.prefixes.clear()

    def __enter__(self) -> ChatRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _forget(self, session: Session) -> None:
        with self._lock:
            if self._sessions.get(session.id) is session:
                del self._sessions[session.id]
                self.recorder.closed()


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
