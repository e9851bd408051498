"""What a session works with, handed down by the runtime that owns them (a session never reaches back up)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from chatrt.cache.index import PrefixIndex
from chatrt.cache.prefix import PrefixEntry, PrefixStore
from chatrt.cache.spill import PrefixSpill
from chatrt.cache.tiers import Tiers
from chatrt.config import Config
from chatrt.engine import Engine
from chatrt.model import ModelInfo
from chatrt.stats import Recorder
from chatrt.template import ChatTemplate, Message

if TYPE_CHECKING:
    from chatrt.cache.journal import Journal
    from chatrt.session import Session


@dataclass
class Parts:
    """One object shared by the runtime's sessions: a config the runtime is given later applies to their next
    turns."""

    config: Config
    info: ModelInfo
    template: ChatTemplate
    engine: Engine
    tiers: Tiers
    prefixes: PrefixStore
    spill: PrefixSpill
    journal: Journal | None  # None without Redis
    index: PrefixIndex
    """Which idle sessions' caches begin like a prompt (for a turn to start from another session's)."""
    recorder: Recorder
    forget: Callable[[Session, bool], None]
    """The runtime lets go of a session that ended (closed: True, or only left this process: False)."""
    fork: Callable[[Session, list[Message], PrefixEntry | None, str | None], Session]
    """The runtime opens a fork of a session: (parent, its messages, the shared prefix the fork starts from,
    acquired for it, or None; the new session's id or None)."""
