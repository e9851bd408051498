"""SessionRecord: a session as Redis keeps it (its transcript, and what its stored KV is). Apart from the store so
that code which only reads or builds records does not need the Redis client installed."""

from __future__ import annotations

from pydantic import BaseModel

from chatrt.cache.kv import KVMeta
from chatrt.message import Message

RECORD_VERSION = 2


class SessionRecord(BaseModel):
    """A session as Redis keeps it: the transcript (the source of truth) and, when its KV is there, what it is."""

    version: int = RECORD_VERSION
    session_id: str
    system_prompt: str | None
    messages: list[Message]
    turns: int
    fingerprint: str
    """Of the model that wrote the transcript; another model must re-tokenize the replies."""
    cache_scope: str = ""
    """Whose cached prefixes the session may start from (`ChatRuntime.open_session`)."""
    kv: KVMeta | None = None
    rev: str = ""
    """New with every write of the transcript. A write names the revs it may replace, so a process whose lease
    ran out cannot write over a turn another process answered meanwhile (a fencing token)."""
    sig: str = ""
    """Digest of everything above (an HMAC under the deployment's secret when one is set)."""
