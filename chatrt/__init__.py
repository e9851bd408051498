"""chatrt: a multi-turn chat runtime that keeps each conversation's KV cache between turns.

Bots import ChatRuntime; everything else is reachable from it.
"""

import importlib
from typing import TYPE_CHECKING

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
    SchemaError,
    SessionBusy,
    SessionClosed,
    SessionConflict,
    SessionLeased,
    SessionNotFound,
    StoreUnavailable,
    TemplateError,
    TooManySessions,
)

# The runtime's names load torch and transformers: they are imported on first use, so `chatrt stats` and other
# light commands start in a fraction of a second.
_LAZY = {
    "AsyncChatRuntime": "chatrt.async_runtime",
    "AsyncSession": "chatrt.async_runtime",
    "AsyncTurn": "chatrt.turn",
    "ChatRuntime": "chatrt.runtime",
    "LoadedModel": "chatrt.model",
    "Message": "chatrt.message",
    "Reply": "chatrt.turn",
    "RuntimeStats": "chatrt.stats",
    "Session": "chatrt.session",
    "SessionStats": "chatrt.stats",
    "Turn": "chatrt.turn",
    "TurnStats": "chatrt.stats",
}

if TYPE_CHECKING:
    from chatrt.async_runtime import AsyncChatRuntime, AsyncSession
    from chatrt.message import Message
    from chatrt.model import LoadedModel
    from chatrt.runtime import ChatRuntime
    from chatrt.session import Session
    from chatrt.stats import RuntimeStats, SessionStats, TurnStats
    from chatrt.turn import AsyncTurn, Reply, Turn


def __getattr__(name: str) -> object:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'chatrt' has no attribute {name!r}")


__all__ = [
    "AsyncChatRuntime",
    "AsyncSession",
    "AsyncTurn",
    "CacheRejected",
    "ChatRuntime",
    "ChatrtError",
    "CloseIncomplete",
    "Config",
    "ConfigError",
    "ContextLengthError",
    "InvalidMessage",
    "LoadedModel",
    "Message",
    "MetricsUnavailable",
    "ModelLoadError",
    "Reply",
    "RuntimeClosed",
    "RuntimeStats",
    "SchemaError",
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
    "Turn",
    "TurnStats",
]
