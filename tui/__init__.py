"""The Textual terminal UI of chatrt; it talks to chatrt only through its public API.

Placeholder until the TUI issue: `chatrt chat` runs a line-based chat meanwhile.
"""
