"""What a session works with, handed down by the runtime that owns them (a session never reaches back up)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from chatrt.cache.prefix import PrefixStore
from chatrt.cache.spill import PrefixSpill
from chatrt.cache.tiers import Tiers
from chatrt.config import Config
from chatrt.engine import Engine
from chatrt.model import ModelInfo
from chatrt.stats import Recorder
from chatrt.template import ChatTemplate

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
    recorder: Recorder
    forget: Callable[[Session, bool], None]
    """The runtime lets go of a session that ended (closed: True, or only left this process: False)."""
