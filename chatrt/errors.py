"""Typed errors of chatrt, each with a message a user can act on.

Every error chatrt raises on purpose derives from ChatrtError, so callers can catch one type.
"""


class ChatrtError(Exception):
    """Base of every error chatrt raises on purpose."""


class ConfigError(ChatrtError):
    """A configuration file, value or environment override is invalid."""


class SchemaError(ConfigError):
    """A turn's response_format cannot be followed: its JSON schema is invalid or uses what no grammar can."""


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


class SessionConflict(ChatrtError):
    """Another process advanced or closed this session while this turn ran (this process's lease had run out),
    so this turn was not written over it. The reply this turn produced is in `reply`; the session here has
    been brought back to the stored transcript."""

    def __init__(self, message: str, reply: str = "") -> None:
        super().__init__(message)
        self.reply = reply


class RuntimeClosed(ChatrtError):
    """The runtime (and its engine loop) was closed: nothing more is computed in it."""


class CacheRejected(ChatrtError):
    """Stored KV that cannot be trusted (another model, a bad checksum, missing chunks); it is recomputed."""


class StoreUnavailable(ChatrtError):
    """Redis could not be reached or answered with an error."""


class CloseIncomplete(StoreUnavailable):
    """A session was closed in this process, but Redis could not be reached to delete its keys. The runtime
    keeps retrying the delete and holds the session's lease meanwhile, so no other process resumes it."""


class MetricsUnavailable(ChatrtError):
    """A runtime's metrics endpoint could not be read."""


class CompileFailed(ChatrtError):
    """The decode step could not be compiled; steps run eagerly (as fast as with `engine.compile = "off"`)."""
