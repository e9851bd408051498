"""LeaseKeeper: this process's upkeep of its Redis leases, on one background thread.

It renews the lease of every session whose turn is running, so a turn that outlives `lease_s` (a slow stream
consumer) keeps its session; and it retries deleting sessions that were closed while Redis could not be reached,
renewing their leases meanwhile so that no other process resumes a closed session.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import Counter

from chatrt.cache.store import RedisStore
from chatrt.errors import SessionLeased, StoreUnavailable

log = logging.getLogger("chatrt")


class LeaseKeeper:
    def __init__(self, store: RedisStore, period_s: float) -> None:
        self.store, self.period_s = store, period_s
        self._turns: Counter[str] = Counter()  # sessions with a running turn (a session runs one at a time)
        self._deleting: set[str] = set()  # closed sessions whose Redis keys are still to be deleted
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def hold(self, session_id: str) -> None:
        """A turn of the session started: keep its lease until `release`."""
        with self._lock:
            self._turns[session_id] += 1
            self._start()

    def release(self, session_id: str) -> None:
        with self._lock:
            self._turns[session_id] -= 1
            if self._turns[session_id] <= 0:
                del self._turns[session_id]

    def delete_later(self, session_id: str) -> None:
        """The session was closed here but its keys could not be deleted: retry until Redis takes it."""
        with self._lock:
            self._deleting.add(session_id)
            self._start()

    @property
    def pending_deletes(self) -> set[str]:
        with self._lock:
            return set(self._deleting)

    def close(self) -> None:
        """Stop the thread; one last try at the pending deletes, and a warning for each that still failed."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._delete_pending()
        for session_id in self.pending_deletes:
            log.warning("session %s was closed but Redis could not delete it; it can be resumed by another process "
                        "once its lease expires (%g s)", session_id, self.store.lease_s)  # fmt: skip

    def _start(self) -> None:
        """Start the thread on first use (caller holds _lock): a runtime that never leases needs no thread."""
        if self._thread is None and not self._stop.is_set():
            self._thread = threading.Thread(target=self._run, name="chatrt-leases", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            with self._lock:  # a snapshot: no Redis call is made while the lock is held
                held = [*self._turns, *self._deleting]
            for session_id in held:
                # A lease already lost is for the turn's fenced write to find; Redis down is for the turn to count.
                with contextlib.suppress(StoreUnavailable):
                    self.store.renew_lease(session_id)
            self._delete_pending()

    def _delete_pending(self) -> None:
        for session_id in self.pending_deletes:
            try:
                self.store.delete_session(session_id)
            except SessionLeased:
                pass  # another process resumed it while this one's lease was out: it is that process's now
            except StoreUnavailable:
                continue
            with self._lock:
                self._deleting.discard(session_id)
