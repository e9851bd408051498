"""Compiled decode steps: the whole model as one inductor graph per bucket of rows (1, 2, 4, ... max_batch rows
of one token each; a step's rows are padded up to the next bucket), with attention kept out of the graph as an
opaque op over each row's own cache, whose rows come from a per-thread forward context (as vLLM keeps its
attention op out of its graphs). Graphs compile on a background thread, smallest bucket first, while the eager
forward serves: compiling never makes a user wait. A step uses a bucket once it is ready.

The forward is written out for the Llama family (it follows transformers' LlamaModel: the same modules, the
same rotary embedding); any other model runs eagerly. On this project's CPU the graph is compiled with
inductor's frozen weights and its CPU GEMM templates (`max-autotune-no-cudagraphs`), which read the weights
about twice as fast as eager PyTorch's GEMV.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel

from chatrt.cache.kv import new_cache
from chatrt.model import LoadedModel

log = logging.getLogger("chatrt")
SUPPORTED = frozenset({"llama"})
AUTO_MIN_PARAMS = 50_000_000
"""`compile = "auto"` compiles models at least this large: below it a step is overhead, not weights, and the
minute a graph takes to compile does not pay back."""
MODE = "max-autotune-no-cudagraphs"

_context = threading.local()  # the rows of the step this thread runs: (caches, spans)


@torch.library.custom_op("chatrt::attend", mutates_args=())
def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, scale: float) -> torch.Tensor:
    """q: [1, H, T, D]; k, v: [1, H_kv, T, D] for T packed tokens (the rows' tokens, then padding). Each row's
    keys and values are appended to its own cache and it attends over that cache (causally among its new
    tokens); padding attends to nothing and comes out as zeros. Returns [1, H, T, D]."""
    caches, spans = _context.rows
    outs = []
    for cache, (start, end) in zip(caches, spans, strict=True):
        keys, values = cache.update(k[..., start:end, :], v[..., start:end, :], layer)  # [1, H_kv, L, D]
        n, length = end - start, keys.shape[-2]
        mask = None if n == 1 else torch.ones(n, length, dtype=torch.bool, device=q.device).tril(length - n)
        outs.append(F.scaled_dot_product_attention(q[..., start:end, :], keys, values, attn_mask=mask, scale=scale,
                                                   enable_gqa=True))  # fmt: skip
    padding = q.shape[2] - (spans[-1][1] if spans else 0)
    if padding:
        outs.append(q.new_zeros(q.shape[0], q.shape[1], padding, q.shape[3]))
    return torch.cat(outs, dim=2).contiguous()


@attend.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, scale: float) -> torch.Tensor:
    return q.new_empty(q.shape)  # contiguous, as the real one returns


def llama_forward(model: PreTrainedModel, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """transformers' LlamaForCausalLM forward with `chatrt::attend` for attention: ids, positions [1, T];
    returns the logits of every position, [T, V]."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    m, t = model.model, ids.shape[1]
    h = m.embed_tokens(ids)  # [1, T, E]
    cos, sin = m.rotary_emb(h, positions)
    for i, layer in enumerate(m.layers):
        a = layer.self_attn
        x = layer.input_layernorm(h)
        q = a.q_proj(x).view(1, t, -1, a.head_dim).transpose(1, 2)  # [1, H, T, D]
        k = a.k_proj(x).view(1, t, -1, a.head_dim).transpose(1, 2)  # [1, H_kv, T, D]
        v = a.v_proj(x).view(1, t, -1, a.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        o = torch.ops.chatrt.attend(q, k, v, i, a.scaling)  # [1, H, T, D]
        h = h + a.o_proj(o.transpose(1, 2).reshape(1, t, -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.lm_head(m.norm(h))[0].float()  # [T, V]


def buckets(max_batch: int) -> list[int]:
    """1, 2, 4, ... and max_batch itself."""
    sizes = [1 << n for n in range(max_batch.bit_length()) if 1 << n <= max_batch]
    return sizes if sizes[-1] == max_batch else [*sizes, max_batch]


def compilable(lm: LoadedModel, setting: str) -> str:
    """Why this model is not compiled under `setting` ("" when it is)."""
    if setting == "off":
        return "engine.compile is off"
    if lm.model.config.model_type not in SUPPORTED:
        return f"the {lm.model.config.model_type!r} architecture has no compiled forward (only {sorted(SUPPORTED)})"
    if setting == "auto" and sum(p.numel() for p in lm.model.parameters()) < AUTO_MIN_PARAMS:
        return "the model is too small for compiling to pay"
    return ""


class CompiledSteps:
    """The compiled graphs of one loaded model, shared by every engine (runtime) of the process that runs it:
    `for_model` gives the same one, so a second runtime neither compiles again nor competes for the CPU."""

    @classmethod
    def for_model(cls, lm: LoadedModel, max_batch: int, cache_dir: str = "") -> CompiledSteps:
        """The model's compiled steps, compiling (in the background) the buckets up to `max_batch` not compiled
        yet. `cache_dir`: where inductor keeps compiled code and autotuning results between runs."""
        with _SHARED_LOCK:
            steps = _SHARED.get(lm.model)
            if steps is None:
                steps = _SHARED[lm.model] = cls(lm, cache_dir)
        steps.want(buckets(max_batch))
        return steps

    def __init__(self, lm: LoadedModel, cache_dir: str = "") -> None:
        self.lm = lm
        self.buckets: list[int] = []
        self.ready: dict[int, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {}
        self.seconds: dict[int, float] = {}
        """How long each bucket took to compile."""
        self.error = ""
        self.steps = 0
        """Steps that ran through a compiled graph."""
        if cache_dir:
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", cache_dir)
        self._pending: list[int] = []
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._done.set()
        self._thread: threading.Thread | None = None

    def want(self, sizes: list[int]) -> None:
        """Compile these buckets too, on the background thread."""
        with self._lock:
            new = [b for b in sizes if b not in self.buckets]
            if not new or self.error:
                return
            self.buckets = sorted({*self.buckets, *new})
            self._pending = sorted({*self._pending, *new})
            self._done.clear()
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._compile_all, name="chatrt-compile", daemon=True)
                self._thread.start()

    def run(self, rows: list[tuple[DynamicCache, list[int]]]) -> torch.Tensor | None:
        """Decode rows (one token each after its cache, which grows by it) through the compiled graph of their
        bucket: the logits [R, V]; None when that bucket is not compiled (yet), for the eager forward to run."""
        size = next((b for b in self.buckets if b >= len(rows)), None)
        fn = self.ready.get(size) if size is not None else None
        if fn is None:
            return None
        device = self.lm.device
        ids = [ids[0] for _, ids in rows] + [0] * (size - len(rows))  # type: ignore[operator]
        positions = [cache.get_seq_length() for cache, _ in rows] + [0] * (size - len(rows))  # type: ignore[operator]
        _context.rows = ([cache for cache, _ in rows], [(n, n + 1) for n in range(len(rows))])
        try:
            with torch.inference_mode():
                logits = fn(torch.tensor([ids], device=device), torch.tensor([positions], device=device))
        finally:
            _context.rows = None
        self.steps += 1
        return logits[: len(rows)]

    def describe(self) -> str:
        """Which buckets are compiled, in how long, and what failed."""
        ready = ", ".join(f"{b} rows ({s:.0f} s)" for b, s in self.seconds.items()) or "none yet"
        return f"compiled decode steps: {ready}" + (f"; compiling failed: {self.error}" if self.error else "")

    def wait(self, timeout: float | None = None) -> bool:
        """Until every bucket is compiled (or compiling stopped); whether it finished."""
        return self._done.wait(timeout)

    def _compile_all(self) -> None:
        # Every bucket is one more graph of the same function: dynamo's limit of 8 per function would refuse some.
        dynamo = torch._dynamo.config
        dynamo.recompile_limit = max(dynamo.recompile_limit, 64)
        try:
            while True:
                with self._lock:
                    if not self._pending:
                        self._done.set()
                        return
                    size = self._pending.pop(0)
                self._compile(size)
        except Exception as e:  # a model or a machine the compiler cannot handle: the eager forward serves
            self.error = f"{type(e).__name__}: {e}"
            log.warning("compiling the decode step failed, the eager forward serves: %s", self.error)
            with self._lock:
                self._pending = []
                self._done.set()

    def _compile(self, size: int) -> None:
        t0 = time.perf_counter()
        fn = torch.compile(partial(llama_forward, self.lm.model), mode=MODE, fullgraph=True, dynamic=False)
        device = self.lm.device
        _context.rows = ([new_cache() for _ in range(size)], [(n, n + 1) for n in range(size)])
        try:
            with torch.inference_mode(), torch._inductor.config.patch(freezing=True):
                fn(torch.zeros(1, size, dtype=torch.long, device=device),
                   torch.zeros(1, size, dtype=torch.long, device=device))  # fmt: skip  # compiles here
        finally:
            _context.rows = None
        self.seconds[size] = time.perf_counter() - t0
        self.ready[size] = fn
        log.info("compiled the decode step for %d rows in %.0f s", size, self.seconds[size])


_SHARED: weakref.WeakKeyDictionary[torch.nn.Module, CompiledSteps] = weakref.WeakKeyDictionary()
_SHARED_LOCK = threading.Lock()
