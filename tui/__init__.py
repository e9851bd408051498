"""The Textual terminal UI of chatrt: sessions, a streaming conversation and live cache stats.

It talks to chatrt only through its public API (ChatRuntime, Session, the stats models).
"""

from tui.app import ChatApp, run

__all__ = ["ChatApp", "run"]
