"""Typed errors of chatrt, each with a message a user can act on.

Every error chatrt raises on purpose derives from ChatrtError, so callers can catch one type.
"""


class ChatrtError(Exception):
    """Base of every error chatrt raises on purpose."""


class ConfigError(ChatrtError):
    """A configuration file, value or environment override is invalid."""


class ModelLoadError(ChatrtError):
    """The model or its tokenizer could not be found or loaded."""


class TemplateError(ChatrtError):
    """The chat template cannot render this transcript safely."""


class InvalidMessage(ChatrtError):
    """A message is empty, has an unknown role, or cannot be sent in this state."""


class ContextLengthError(ChatrtError):
    """The prompt plus the requested new tokens do not fit the model's context window."""


class SessionNotFound(ChatrtError):
    """No open session has this id."""


class SessionClosed(ChatrtError):
    """The session was closed; open a new one."""


class SessionBusy(ChatrtError):
    """The session is generating a reply in another thread."""


class TooManySessions(ChatrtError):
    """The runtime already holds `session.max_sessions` open sessions."""


class SessionLeased(ChatrtError):
    """Another process holds this session's lease (it is advancing the conversation there)."""


class CacheRejected(ChatrtError):
    """Stored KV that cannot be trusted (another model, a bad checksum, missing chunks); it is recomputed."""


class StoreUnavailable(ChatrtError):
    """Redis could not be reached or answered with an error."""


class MetricsUnavailable(ChatrtError):
    """A runtime's metrics endpoint could not be read."""
