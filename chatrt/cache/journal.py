"""Journal: each session's transcript written through to Redis, fenced, and read back only when it can be trusted.

It knows which revs of a stored record are this process's own writes (a write may replace only those: another
process's turn is never written over), holds a session's lease while its turn runs, and checks a stored
transcript as a turn checks its input before any of it is used. A Redis that cannot be reached is counted and
never costs a message: the session goes on in this process.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from chatrt.cache.leases import LeaseKeeper
from chatrt.cache.record import SessionRecord
from chatrt.cache.store import RedisStore
from chatrt.errors import InvalidMessage, SessionConflict, SessionLeased, SessionNotFound, StoreUnavailable
from chatrt.template import ChatTemplate, Message, check_text, check_turns

Count = Callable[..., None]


class Journal:
    def __init__(self, store: RedisStore, template: ChatTemplate, fingerprint: str, count: Count) -> None:
        """`count(redis_errors=1)` / `count(rejected=1)`: where failures are counted for operators."""
        self.store, self.template, self.fingerprint, self.count = store, template, fingerprint, count
        self.leases = LeaseKeeper(store, period_s=store.lease_s / 3)
        self._revs: dict[str, set[str]] = {}  # session → revs of its stored record that this process wrote
        self._lock = threading.Lock()

    # -- writes ------------------------------------------------------------------------------------

    def create(self, record: SessionRecord) -> None:
        """Store a new session and take its lease (InvalidMessage when the id exists in Redis, SessionLeased when
        another process holds it). With Redis down the session lives here; its first turn stores it."""
        rev = uuid.uuid4().hex
        try:
            self.store.create_session(record.model_copy(update={"rev": rev}))
        except StoreUnavailable:
            self.count(redis_errors=1)
            self._own(record.session_id, rev, landed=False)  # it may have landed before the connection broke
            return
        self._own(record.session_id, rev)

    def save(self, record: SessionRecord, chunks: list[memoryview] | None = None) -> None:
        """Write the session, fenced: over a record this process wrote, never over another's (SessionConflict).
        With Redis down the write is counted and the turn goes on here; the rev it tried is remembered as this
        process's own, since the write may have landed before the connection broke."""
        rev = uuid.uuid4().hex
        try:
            self.store.put_session(record.model_copy(update={"rev": rev}), replaces=self.revs(record.session_id),
                                   chunks=chunks)  # fmt: skip
        except StoreUnavailable:
            self.count(redis_errors=1)
            self._own(record.session_id, rev, landed=False)
            return
        self._own(record.session_id, rev)

    def drop_kv(self, session_id: str) -> None:
        """The stored KV of a resumed session cannot be used: only its transcript is kept."""
        self.call(self.store.put_kv, session_id, None)

    def delete(self, session_id: str) -> None:
        """Delete the session's keys and leave a tombstone (StoreUnavailable when Redis is away)."""
        try:
            self.store.delete_session(session_id)
        finally:
            self.forget(session_id)

    def close_session(self, session_id: str) -> StoreUnavailable | None:
        """Delete the session everywhere (its tombstone refuses it to every process); a session another process
        holds now is that one's and is left alone. Returns the failure when Redis is away: the delete is retried
        until it answers, the lease held meanwhile, so no other process resumes it."""
        try:
            self.delete(session_id)
        except SessionLeased:
            pass
        except StoreUnavailable as e:
            self.delete_later(session_id)
            return e
        return None

    def hand_over(self, record: SessionRecord, chunks: list[memoryview] | None) -> None:
        """This process lets the session go for another to resume: its record (and KV chunks) written, the lease
        given up. One that another process holds now is that one's: nothing is written over it."""
        with contextlib.suppress(SessionConflict):
            self.save(record, chunks)
        self.leave(record.session_id)

    def delete_later(self, session_id: str) -> None:
        self.count(redis_errors=1)
        self.leases.delete_later(session_id)

    def deleting(self, session_id: str) -> bool:
        """Closed here while Redis was away, the delete still pending."""
        return session_id in self.leases.pending_deletes

    def leave(self, session_id: str) -> None:
        """This process lets the session go (its record stays for another to resume)."""
        self.call(self.store.release_lease, session_id)
        self.forget(session_id)

    def forget(self, session_id: str) -> None:
        with self._lock:
            self._revs.pop(session_id, None)

    # -- reads -------------------------------------------------------------------------------------

    def resume(self, session_id: str) -> SessionRecord:
        """A stored session, its lease taken first (no other process writes it while it is read). Raises
        SessionLeased, SessionClosed, or SessionNotFound when there is none or its transcript cannot be used."""
        self.store.take_lease(session_id)
        try:
            record = self.store.read_session(session_id)
            record = record.model_copy(update={"messages": self.transcript(record)})
        except BaseException:
            self.call(self.store.release_lease, session_id)
            raise
        self._own(session_id, record.rev)
        return record

    def newer(self, session_id: str) -> SessionRecord | None:
        """The stored record when another process wrote it after this one's last write (None otherwise, or with
        Redis down). Raises SessionClosed when another process closed it."""
        try:
            record = self.store.get_session(session_id)
        except StoreUnavailable:
            self.count(redis_errors=1)
            return None
        if record is None or record.rev in self.revs(session_id):
            return None
        record = record.model_copy(update={"messages": self.adopt(record)})
        with self._lock:
            self._revs[session_id] = {record.rev}
        return record

    def transcript(self, record: SessionRecord) -> list[Message]:
        """The stored transcript, checked as a turn checks its input (a record written by hand or by another
        version must not break every later turn): text that is text, user and assistant turns in order."""
        try:
            if record.system_prompt is not None:
                check_text(record.system_prompt, "its system prompt")
            check_turns(record.messages, "its messages")
        except InvalidMessage as e:
            self.count(rejected=1)
            raise SessionNotFound(f"session {record.session_id}'s stored transcript cannot be used: {e}") from None
        return self.adopt(record)

    def adopt(self, record: SessionRecord) -> list[Message]:
        """A stored transcript for this model. A message keeps its token ids only where they can be trusted: a
        reply this model wrote (same fingerprint) whose ids spell its text; every other message is tokenized
        from its text, so stored ids can never put control tokens into a prompt."""
        same = record.fingerprint == self.fingerprint

        def trusted(m: Message) -> bool:  # a reply's ids begin with its text (all of it, unless it calls tools)
            ids = m.token_ids
            return ids is None or (
                same and m.role == "assistant" and self.template.spells(ids, m.content, start=bool(m.tool_calls))
            )

        return [m if trusted(m) else m.model_copy(update={"token_ids": None}) for m in record.messages]

    # -- leases ------------------------------------------------------------------------------------

    @contextmanager
    def lease(self, session_id: str, on_retaken: Callable[[], None], *, keep: bool = True) -> Iterator[None]:
        """Hold the session's lease for a turn, renewed in the background while the turn runs (a slow consumer
        must not lose the session to another process). `on_retaken` runs when the lease had to be taken anew:
        another process may have advanced the session meanwhile. `keep`: hold it for `lease_s` after the turn
        (the session stays with this process), else let it go when the turn ends."""
        try:
            if not self.store.take_lease(session_id):
                on_retaken()
        except StoreUnavailable:
            self.count(redis_errors=1)  # Redis down: the turn goes on in this process alone
        self.leases.hold(session_id)
        try:
            yield
        finally:
            self.leases.release(session_id)
            if not keep:
                self.call(self.store.release_lease, session_id)

    def revs(self, session_id: str) -> set[str]:
        with self._lock:
            return set(self._revs.get(session_id, ()))

    def call(self, fn: Callable[..., object], *args: object) -> None:
        """A call to Redis that must not cost a message: on failure it is counted and the turn goes on."""
        try:
            fn(*args)
        except StoreUnavailable:
            self.count(redis_errors=1)

    def close(self) -> None:
        self.leases.close()

    def _own(self, session_id: str, rev: str, *, landed: bool = True) -> None:
        """`rev` is this process's write: the only one a next write may replace, or (not known to have landed)
        one more it may."""
        with self._lock:
            if landed:
                self._revs[session_id] = {rev}
            else:
                self._revs.setdefault(session_id, set()).add(rev)
