"""The engine loop: one thread owns the model and runs every turn of every session as a request.

`step()` = schedule (decode rows and prefill chunks) → run them in one forward (a lone row runs the plain
forward, bit for bit what it would compute alone) → sample each row, deliver its piece, end finished requests.
Callers read a request's pieces from its channel; a caller that stops reading cancels the request.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import queue
import sys
import threading
from collections.abc import AsyncGenerator, Callable, Generator
from pathlib import Path

from chatrt.cache.kv import KV
from chatrt.config import EngineConfig, GenerationConfig, ModelConfig
from chatrt.engine import runner
from chatrt.engine.compiled import CompiledSteps, compilable
from chatrt.engine.generation import Generation
from chatrt.engine.packed import use_packed_attention
from chatrt.engine.scheduler import Scheduler
from chatrt.errors import RuntimeClosed
from chatrt.model import LoadedModel, cache_root

_END = None
log = logging.getLogger("chatrt")
_LIBC = ctypes.CDLL(None) if sys.platform == "linux" else None


def release_freed_memory() -> None:
    """Hand the C allocator's free pages back to the OS. glibc keeps what a long prefill's activations freed
    (tens of MB for a thousand tokens) resident otherwise, more than the shared KV they computed."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


class Request:
    """A turn submitted to the engine: its Generation (the sequence state: ids, how many are computed, the
    cache), the channel its pieces come through, and a cancel flag. A thread reads the channel with `stream()`,
    an event loop with `astream()`: no thread waits on a request for it."""

    def __init__(self, gen: Generation, engine: Engine) -> None:
        self.gen, self.engine = gen, engine
        gen.begin()
        self.delivered = 0
        """Characters of the reply handed to the reader: when it stops early, that is the reply."""
        self.ended = threading.Event()
        self._pieces: queue.SimpleQueue[str | BaseException | None] = queue.SimpleQueue()
        self._cancel = threading.Event()
        self._notify: Callable[[], None] = lambda: None  # an event loop's reader is woken through this

    @property
    def to_prefill(self) -> int:
        return self.gen.to_prefill

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def tokens(self) -> int:
        return len(self.gen.fed) - sum(len(s) for s in self.gen.shared)  # shared segments are kept once, apart

    def put(self, item: str | BaseException | None) -> None:
        """(engine) A piece, an error, or the end."""
        self._pieces.put(item)
        self._notify()

    def cancel(self) -> None:
        self._cancel.set()
        self.engine.wake()

    def stream(self) -> Generator[str, None, None]:
        """The reply's pieces as the engine produces them. Stopping early (close) cancels the request: the
        engine ends it at its next step (`ended`); `delivered` says how much of the reply this stream handed out."""
        try:
            while (item := self._pieces.get()) is not _END:
                yield self._take(item)
        finally:
            if not self.ended.is_set():
                self.cancel()

    async def astream(self) -> AsyncGenerator[str, None]:
        """`stream()` for an event loop: the engine wakes this reader through the loop, no thread blocks."""
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        self._notify = lambda: loop.call_soon_threadsafe(ready.set)
        try:
            while True:
                try:
                    item = self._pieces.get_nowait()
                except queue.Empty:
                    ready.clear()
                    if self._pieces.empty():  # a piece put after this check sets `ready` again
                        await ready.wait()
                    continue
                if item is _END:
                    return
                yield self._take(item)
        finally:  # nothing awaited here: a reader cancelled by a cancel scope would be cancelled again
            if not self.ended.is_set():
                self.cancel()
            self._notify = lambda: None

    def _take(self, item: str | BaseException | None) -> str:
        if isinstance(item, BaseException):
            raise item
        assert item is not None
        self.delivered += len(item)
        return item


class Engine:
    def __init__(self, lm: LoadedModel, config: EngineConfig, *, device_bytes: int = 0, thread: bool = True,
                 compiled_dir: Path | None = None) -> None:  # fmt: skip
        """`device_bytes`: the KV the running requests may hold on the device (0: no limit); beyond it the newest
        is preempted. `thread=False`: no loop thread; the caller runs `step()` (tests drive exact batches).
        `compiled_dir`: where compiled decode steps are kept between runs (by default beside the dequantized GGUF
        weights)."""
        self.lm, self._threaded = lm, thread
        use_packed_attention(lm)
        self.compiled: CompiledSteps | None = None
        """Compiled decode steps (compiling in the background), when engine.compile and the model allow."""
        self.not_compiled = compilable(lm, config.compile)
        """Why decode steps are not compiled ("" when they are)."""
        if not self.not_compiled:
            folder = compiled_dir or cache_root(ModelConfig()) / "compiled"
            self.compiled = CompiledSteps.for_model(lm, config.max_batch, folder, runner.forward)
        max_tokens = max(1, device_bytes // lm.info.kv_bytes_per_token) if device_bytes else 0
        self.scheduler: Scheduler[Request] = Scheduler(config.max_batch, config.prefill_chunk, max_tokens)
        self.steps = 0
        self.rows = 0  # rows run over all steps: rows / steps is the mean batch
        self.preemptions = 0
        self._work = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopped = False

    def decode_step(self) -> str:
        """How decode steps run: "compiled", "compiling" or "loading" (eagerly meanwhile), or "eager"."""
        if self.compiled is None or self.compiled.error:
            return "eager"
        if self.compiled.ready:
            return "compiled"
        return "compiling" if self.compiled.how == "compiled" else "loading"

    def submit(self, gen: Generation) -> Request:
        """Queue a reply; its pieces come through the returned request's `stream()`."""
        request = Request(gen, self)
        with self._work:
            if self._stopped:
                raise RuntimeClosed("the runtime is closed; create a new ChatRuntime to go on")
            self.scheduler.add(request)
            if self._thread is None and self._threaded:
                self._thread = threading.Thread(target=self._loop, name="chatrt-engine", daemon=True)
                self._thread.start()
            self._work.notify()
        return request

    def compute_kv(self, ids: tuple[int, ...]) -> KV:
        """The KV of `ids` from scratch (a shared prefix, a cost probe), prefilled by the loop: in chunks that
        share steps with the decoding rows, as a turn's prompt is. Blocks until it is computed."""
        gen = Generation(self.lm, None, list(ids), GenerationConfig(), prefill_only=True)
        request = self.submit(gen)
        while not self._threaded and not request.ended.is_set():  # no loop thread: the caller steps
            self.step()
        request.ended.wait()
        for _ in request.stream():  # nothing is sampled: only an error can come through
            pass
        if gen.kv is None:
            raise RuntimeClosed("the runtime closed before the prefix was computed")
        return gen.kv

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
                if not self._stopped and not self.scheduler.has_work():
                    release_freed_memory()  # going idle: what the steps' activations freed goes back to the OS
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
                    request.put(e)
                    self._end(request)

    def step(self) -> None:
        with self._work:  # schedule
            rows, cancelled, preempted = self.scheduler.schedule()
        for request in cancelled:
            self._end(request)
        for request in preempted:
            request.gen.park()
            self.preemptions += 1
        if not rows:
            return
        for request, _ in rows:
            request.gen.unpark(self.lm.device)
        try:  # run
            logits = runner.run(self.lm, [(r.gen.cache, r.gen.inputs(n)) for r, n in rows], self.compiled)  # type: ignore[misc]
        except Exception as e:  # every row of a failed step has a cache it cannot trust: each gets the error
            for request, _ in rows:
                request.put(e)
                self._end(request)
            return
        self.steps, self.rows = self.steps + 1, self.rows + len(rows)
        for (request, n), row_logits in zip(rows, logits, strict=True):  # postprocess
            gen = request.gen
            if gen.to_prefill:
                gen.ran(n)
                if gen.to_prefill:
                    continue  # more of the prompt to prefill before the first token
                if gen.prefill_only:
                    gen.end("length")
                    self._end(request)
                    continue
            else:
                gen.advance()
            try:
                piece = gen.accept(row_logits)
            except Exception as e:  # this row's sampling failed (its grammar): the others go on
                request.put(e)
                self._end(request)
                continue
            if piece:
                request.put(piece)
            if gen.done:
                self._end(request)

    def _end(self, request: Request) -> None:
        """The request leaves the engine: its reply ends (as cancelled if it had not), the stream is told."""
        with self._work:
            if request in self.scheduler.running:
                self.scheduler.finish(request)
        if rest := request.gen.end():
            request.put(rest)
        request.ended.set()  # before the end is put: a reader woken by it finds the request ended
        request.put(_END)
