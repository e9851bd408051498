"""`chatrt chat` run for real: a child process on a pseudo-terminal, typed into, read back, and quit."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time

import pytest

from tests.conftest import tiny_llama

ANSI = re.compile(rb"\x1b(\[[0-9;?<>=]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)|[()][A-Za-z0-9]|[=>78DEHMNOc])")


class Terminal:
    """A process on a pty of a given size; `expect` waits for text on screen (escape codes stripped)."""

    def __init__(self, args: list[str], columns: int = 140, rows: int = 40) -> None:
        self.fd, child = pty.openpty()
        fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
        env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": str(columns), "LINES": str(rows)}
        self.proc = subprocess.Popen(args, stdin=child, stdout=child, stderr=child, env=env, close_fds=True)
        os.close(child)
        self.seen = b""

    def expect(self, text: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while text.encode() not in ANSI.sub(b"", self.seen):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                tail = ANSI.sub(b"", self.seen)[-2000:].decode(errors="replace")
                raise AssertionError(f"{text!r} never appeared on the terminal; last output:\n{tail}")
            self._read(0.1)

    def send(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def wait(self, timeout: float = 60.0) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self._read(0.1)
        return self.proc.wait(timeout=1)

    def _read(self, timeout: float) -> None:
        if select.select([self.fd], [], [], timeout)[0]:
            try:
                self.seen += os.read(self.fd, 65536)
            except OSError:  # the child closed the terminal
                time.sleep(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.fd)


@pytest.fixture
def tiny_folder(tokenizer, tmp_path):
    """The tiny model saved as a transformers folder, the way a user points --model at one."""
    folder = tmp_path / "tiny"
    tiny_llama(tokenizer).model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_chat_runs_in_a_real_terminal_answers_quits_and_its_chat_comes_back(tiny_folder, tmp_path):
    chat = [sys.executable, "-m", "chatrt.cli", "chat", "--model", str(tiny_folder)]
    term = Terminal([*chat, "--system", "Be brief."])
    try:
        term.expect("system: Be brief.")
        term.expect("0 turns")
        term.send("hello there\r")
        term.expect("1 turn ")
        term.expect("KV on device")
        term.send("\x11")  # Ctrl+Q
        assert term.wait() == 0
        assert b"\x1b[?1049l" in term.seen  # it left the alternate screen: the terminal is given back
    finally:
        term.close()
    term = Terminal(chat)  # started again: the chat is listed, shown, and goes on
    try:
        term.expect("hello there")
        term.expect("1 turn ")
        term.expect("not cached")  # its KV went with the first process: the next turn computes it
        term.send("and again\r")
        term.expect("2 turns")
        term.expect("KV on device")
        term.send("\x11")
        assert term.wait() == 0
    finally:
        term.close()
