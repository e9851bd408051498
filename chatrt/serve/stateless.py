"""Session reuse for clients that know nothing of sessions: a plain OpenAI client resends the whole conversation
each turn. Its history (system prompt, then whole turns, tool calls and results included) is matched to the idle
open session whose transcript is exactly that history, so the session's cached ids are a prefix of the new prompt
and only the new message is prefilled. vLLM and SGLang get there block by block through their prefix caches; here
it is the session's own KV, exact to the token.

Sessions are indexed by a sha256 of their transcript's roles, texts and calls while idle; a request claims one (so
two requests never share it), and gives it back, under the transcript its turn recorded, once that turn has
finished. Beyond `capacity` idle sessions, the least recently used are handed back to be closed, and so is a
session whose transcript another one given back later holds too: every open stateless session is either
running a turn or in the index.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Callable

from chatrt.message import Message


def digest(scope: str, system_prompt: str | None, messages: list[Message]) -> str:
    """What identifies a conversation's text (token ids aside: a reply's text is what a client sends back), within
    a scope: a client's conversation is matched only to sessions of its own scope (its tenant, narrowed by the
    request's `user` or `cache_salt`)."""
    body = json.dumps([scope, system_prompt, [m.digest_form() for m in messages]], ensure_ascii=False)
    return hashlib.sha256(body.encode()).hexdigest()


class Conversations:
    def __init__(self, capacity: int) -> None:
        assert capacity >= 1
        self.capacity = capacity
        self._idle: OrderedDict[str, str] = OrderedDict()  # transcript digest → session id, oldest first
        self._lock = threading.Lock()

    def claim(self, scope: str, system_prompt: str | None, history: list[Message]) -> str | None:
        """The id of an idle session of `scope` holding exactly this history, taken out of the index (None: none
        does)."""
        with self._lock:
            return self._idle.pop(digest(scope, system_prompt, history), None)

    def give_back(self, scope: str, session_id: str, system_prompt: str | None, messages: list[Message]) -> list[str]:
        """The session is idle again with this transcript. Returns the ids of sessions pushed out of the index,
        for the caller to close."""
        key = digest(scope, system_prompt, messages)
        with self._lock:
            evicted = []
            held = self._idle.pop(key, None)
            if held is not None and held != session_id:  # an identical conversation in another session: the
                evicted.append(held)  # newer one is kept, the other closed (never indexed, it could never be claimed)
            self._idle[key] = session_id
            while len(self._idle) > self.capacity:
                evicted.append(self._idle.popitem(last=False)[1])
            return evicted

    def reclaim(self, owned: Callable[[str], bool]) -> str | None:
        """The least recently used idle session whose id `owned` accepts, taken out of the index for the caller
        to close (a new conversation needs its room); None when there is none."""
        with self._lock:
            session_id = next((sid for sid in self._idle.values() if owned(sid)), None)
            if session_id is not None:
                for key in [k for k, sid in self._idle.items() if sid == session_id]:
                    del self._idle[key]
            return session_id

    def discard(self, session_id: str) -> None:
        """The session was closed (DELETE): it can no longer be claimed."""
        with self._lock:
            for key in [k for k, sid in self._idle.items() if sid == session_id]:
                del self._idle[key]

    def __len__(self) -> int:
        with self._lock:
            return len(self._idle)
