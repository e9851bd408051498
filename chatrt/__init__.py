"""chatrt: a multi-turn chat runtime that keeps each conversation's KV cache between turns.

Bots import ChatRuntime; everything else is reachable from it.
"""

from chatrt.async_runtime import AsyncChatRuntime, AsyncSession
from chatrt.config import Config
from chatrt.errors import (
    CacheRejected,
    ChatrtError,
    CloseIncomplete,
    ConfigError,
    ContextLengthError,
    InvalidMessage,
    MetricsUnavailable,
    ModelLoadError,
    RuntimeClosed,
    SessionBusy,
    SessionClosed,
    SessionConflict,
    SessionLeased,
    SessionNotFound,
    StoreUnavailable,
    TemplateError,
    TooManySessions,
)
from chatrt.runtime import ChatRuntime
from chatrt.session import Reply, Session
from chatrt.stats import RuntimeStats, SessionStats, TurnStats
from chatrt.template import Message

__all__ = [
    "AsyncChatRuntime",
    "AsyncSession",
    "CacheRejected",
    "ChatRuntime",
    "ChatrtError",
    "CloseIncomplete",
    "Config",
    "ConfigError",
    "ContextLengthError",
    "InvalidMessage",
    "Message",
    "MetricsUnavailable",
    "ModelLoadError",
    "Reply",
    "RuntimeClosed",
    "RuntimeStats",
    "Session",
    "SessionBusy",
    "SessionClosed",
    "SessionConflict",
    "SessionLeased",
    "SessionNotFound",
    "SessionStats",
    "StoreUnavailable",
    "TemplateError",
    "TooManySessions",
    "TurnStats",
]
