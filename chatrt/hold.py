"""Who holds a session: one turn at a time. A turn takes the hold for its whole life (begin to finish); close()
and detach() take it once no turn does. A turn asked for by a thread whose own turn of the session is
suspended between pieces could never start (it would wait for itself): that is SessionBusy, at once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from chatrt.errors import SessionBusy

if TYPE_CHECKING:
    from chatrt.turn import Turn


class Hold:
    def __init__(self, session_id: str, wait: Callable[[], bool]) -> None:
        """`wait()`: whether a turn waits for the hold (`session.on_busy = "wait"`) or is refused."""
        self.session_id, self.wait = session_id, wait
        self.lock = threading.Lock()
        """Held by a turn, or by close()/detach()."""
        self.closing = threading.Event()
        """close() was called: a running turn stops at its next piece."""
        self._turn: Turn | None = None
        self._thread: int | None = None  # the thread that reads that turn (None: an event loop)

    @contextmanager
    def take(self, turn: Turn, thread: int | None) -> Iterator[None]:
        """Hold the session for `turn`, read by `thread` (None: an event loop)."""
        if thread is not None and self._thread == thread:
            raise SessionBusy(
                f"this thread is still streaming a reply of session {self.session_id}; read it to the end or close "
                "it (turn.close()) before sending another message"
            )
        if not self.lock.acquire(blocking=self.wait()):
            raise SessionBusy(
                f"session {self.session_id} is answering another message; wait for it to finish "
                "(or set session.on_busy = 'wait' to queue turns)"
            )
        self._turn, self._thread = turn, thread
        try:
            yield
        finally:
            self._turn = self._thread = None
            self.lock.release()

    def stop_turn(self) -> None:
        """Before closing: a turn read on another thread stops at its next piece; a turn of this thread,
        suspended between pieces, is closed now (its text so far recorded), since waiting for it would be
        waiting for ourselves."""
        self.closing.set()
        turn = self._turn
        if turn is not None and self._thread == threading.get_ident():
            turn.close()
