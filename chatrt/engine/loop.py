"""The engine loop: one thread owns the model and runs every turn of every session as a request.

`step()` = schedule (decode rows and prefill chunks) → run them in one forward (a lone row runs the plain
forward, bit for bit what it would compute alone) → sample each row, deliver its piece, end finished requests.
Callers read a request's pieces from its channel; a caller that stops reading cancels the request.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Generator

import torch

from chatrt.config import EngineConfig
from chatrt.engine.generation import Generation, forward
from chatrt.engine.packed import run_rows, use_packed_attention
from chatrt.engine.scheduler import Scheduler
from chatrt.model import LoadedModel

_END = None
log = logging.getLogger("chatrt")


class Request:
    """A turn submitted to the engine: its Generation (the reply's state), the prompt ids still to prefill, the
    channel its pieces come through, and a cancel flag."""

    def __init__(self, gen: Generation, engine: Engine) -> None:
        self.gen, self.engine = gen, engine
        self.pending = gen.begin()  # prompt ids still to run through the model
        self.pieces: queue.SimpleQueue[str | BaseException | None] = queue.SimpleQueue()
        self.ended = threading.Event()
        self._cancel = threading.Event()

    @property
    def to_prefill(self) -> int:
        return len(self.pending)

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def inputs(self, n: int) -> list[int]:
        return self.pending[:n] if self.pending else [self.gen.next_token]

    def cancel(self) -> None:
        self._cancel.set()
        self.engine.wake()

    def stream(self) -> Generator[str, None, None]:
        """The reply's pieces as the engine produces them. Stopping early (close) cancels the request, waits
        for the engine to end it, and keeps as the reply exactly the characters this stream handed out."""
        delivered = 0
        try:
            while (item := self.pieces.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                delivered += len(item)
                yield item
        finally:
            if not self.ended.is_set():
                self.cancel()
                self.ended.wait()
            self.gen.cut(delivered)


class Engine:
    def __init__(self, lm: LoadedModel, config: EngineConfig, *, thread: bool = True) -> None:
        """`thread=False`: no loop thread; the caller runs `step()` (tests drive exact batches this way)."""
        self.lm, self._threaded = lm, thread
        use_packed_attention(lm)
        self.scheduler: Scheduler[Request] = Scheduler(config.max_batch, config.prefill_chunk)
        self.steps = 0
        self.rows = 0  # rows run over all steps: rows / steps is the mean batch
        self._work = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopped = False

    def submit(self, gen: Generation) -> Request:
        """Queue a reply; its pieces come through the returned request's `stream()`."""
        request = Request(gen, self)
        with self._work:
            if self._stopped:
                raise RuntimeError("the engine is closed")
            self.scheduler.add(request)
            if self._thread is None and self._threaded:
                self._thread = threading.Thread(target=self._loop, name="chatrt-engine", daemon=True)
                self._thread.start()
            self._work.notify()
        return request

    def wake(self) -> None:
        with self._work:
            self._work.notify()

    @property
    def load(self) -> tuple[int, int]:
        """(running, waiting) requests."""
        with self._work:
            return len(self.scheduler.running), len(self.scheduler.waiting)

    def close(self) -> None:
        """Stop the loop; requests still queued end as cancelled."""
        with self._work:
            self._stopped = True
            self._work.notify()
        if self._thread is not None:
            self._thread.join()
        for request in (*self.scheduler.running, *self.scheduler.waiting):
            self._end(request)

    def _loop(self) -> None:
        while True:
            with self._work:
                while not self._stopped and not self.scheduler.has_work():
                    self._work.wait()
                if self._stopped:
                    return
            try:
                self.step()
            except Exception as e:  # a bug in a step must not leave streams waiting for ever: they get the error
                log.exception("engine step failed")
                with self._work:
                    requests = [*self.scheduler.running, *self.scheduler.waiting]
                    self.scheduler.waiting.clear()
                for request in requests:
                    request.pieces.put(e)
                    self._end(request)

    def step(self) -> None:
        with self._work:  # schedule
            rows, cancelled = self.scheduler.schedule()
        for request in cancelled:
            self._end(request)
        if not rows:
            return
        try:  # run
            logits = self._run([(r.gen, r.inputs(n)) for r, n in rows])
        except Exception as e:  # every row of a failed step has a cache it cannot trust: each gets the error
            for request, _ in rows:
                request.pieces.put(e)
                self._end(request)
            return
        self.steps, self.rows = self.steps + 1, self.rows + len(rows)
        for (request, n), row_logits in zip(rows, logits, strict=True):  # postprocess
            gen = request.gen
            if request.pending:
                del request.pending[:n]
                if request.pending:
                    continue  # more of the prompt to prefill before the first token
            else:
                gen.advance()
            if piece := gen.accept(row_logits):
                request.pieces.put(piece)
            if gen.done:
                self._end(request)

    def _run(self, rows: list[tuple[Generation, list[int]]]) -> torch.Tensor:
        """Logits of each row's last new token: [R, V]. A lone row runs the plain forward."""
        if len(rows) == 1:
            gen, ids = rows[0]
            return forward(self.lm, gen.cache, ids)[None]  # type: ignore[arg-type]
        return run_rows(self.lm, [gen.cache for gen, _ in rows], [ids for _, ids in rows])  # type: ignore[misc]

    def _end(self, request: Request) -> None:
        """The request leaves the engine: its reply ends (as cancelled if it had not), the stream is told."""
        with self._work:
            if request in self.scheduler.running:
                self.scheduler.finish(request)
        if rest := request.gen.end():
            request.pieces.put(rest)
        request.pieces.put(_END)
        request.ended.set()
