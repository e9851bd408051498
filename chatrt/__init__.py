"""chatrt: a multi-turn chat runtime that keeps each conversation's KV cache between turns.

Bots import ChatRuntime; everything else is reachable from it.
"""

from chatrt.config import Config
from chatrt.errors import (
    ChatrtError,
    ConfigError,
    ContextLengthError,
    InvalidMessage,
    ModelLoadError,
    SessionBusy,
    SessionClosed,
    SessionNotFound,
    TemplateError,
    TooManySessions,
)
from chatrt.runtime import ChatRuntime
from chatrt.session import Reply, Session
from chatrt.stats import RuntimeStats, SessionStats, TurnStats
from chatrt.template import Message

__all__ = [
    "ChatRuntime",
    "ChatrtError",
    "Config",
    "ConfigError",
    "ContextLengthError",
    "InvalidMessage",
    "Message",
    "ModelLoadError",
    "Reply",
    "RuntimeStats",
    "Session",
    "SessionBusy",
    "SessionClosed",
    "SessionNotFound",
    "SessionStats",
    "TemplateError",
    "TooManySessions",
    "TurnStats",
]
