"""Compiled decode steps: the whole model as one graph compiled ahead of time (AOTInductor) for any number of
rows up to `max_batch` (one token each), with attention kept out of the graph as an opaque op over each row's own
cache, whose rows come from a per-thread forward context (as vLLM keeps its attention op out of its graphs).

Compiling never makes a user wait: the model is exported here (seconds), compiled by a process of its own
(`aot.py`, a minute or two of one core, at a lower priority) while the eager forward serves, and the package is
kept on disk per model fingerprint, torch version, device, dtype, CPU and row count, so a later start loads it in
about a second. A step uses the graph once it is loaded; a compiled step runs in C++ without the GIL.

The forward is written out for the Llama family (it follows transformers' LlamaModel: the same modules, the
same rotary embedding); any other model runs eagerly.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from transformers import DynamicCache, PreTrainedModel

from chatrt.errors import CompileFailed
from chatrt.model import LoadedModel, quiet

log = logging.getLogger("chatrt")
SUPPORTED = frozenset({"llama"})
AUTO_MIN_PARAMS = 50_000_000
"""`compile = "auto"` compiles models at least this large: the package holds the weights twice (as given and
packed for the GEMM kernels), which is worth its disk and minute of compiling where a step reads the weights."""

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


def compilable(lm: LoadedModel, setting: str) -> str:
    """Why this model is not compiled under `setting` ("" when it is)."""
    if setting == "off":
        return "engine.compile is off"
    if lm.model.config.model_type not in SUPPORTED:
        return f"the {lm.model.config.model_type!r} architecture has no compiled forward (only {sorted(SUPPORTED)})"
    if setting == "auto" and sum(p.numel() for p in lm.model.parameters()) < AUTO_MIN_PARAMS:
        return "the model is too small for compiling to pay"
    return ""


def package_path(lm: LoadedModel, max_rows: int, folder: Path) -> Path:
    """Where the compiled step of this model (its weights and tokenizer) for this many rows, torch and
    transformers, device, dtype and CPU instruction set is kept."""
    device = lm.device.type if lm.device.type != "cpu" else f"cpu-{torch.backends.cpu.get_cpu_capability()}"
    dtype = str(lm.dtype).removeprefix("torch.")
    versions = f"torch{torch.__version__}-transformers{transformers.__version__}"  # the graph holds both's code
    return folder / f"{lm.info.fingerprint[:24]}-{versions}-{device}-{dtype}-{max_rows}rows.pt2"


class CompiledSteps:
    """The compiled decode step of one loaded model, shared by every engine (runtime) of the process that runs
    it: `for_model` gives the same one, so a second runtime neither compiles again nor competes for the CPU."""

    @classmethod
    def for_model(cls, lm: LoadedModel, max_rows: int, folder: Path) -> CompiledSteps:
        """The model's compiled step for up to `max_rows` rows, loading or compiling it in the background.
        `folder`: where compiled packages are kept between runs."""
        with _SHARED_LOCK:
            mine = _SHARED.setdefault(lm.model, {})
            if max_rows not in mine:
                mine[max_rows] = cls(lm, max_rows, package_path(lm, max_rows, folder))
            return mine[max_rows]

    def __init__(self, lm: LoadedModel, max_rows: int, path: Path) -> None:
        self.lm, self.max_rows, self.path = lm, max_rows, path
        self.how = ""
        """How the step became ready: "compiled" (this start) or "loaded" (compiled by an earlier one)."""
        self.seconds = 0.0
        """How long it took to be ready."""
        self.error = ""
        self.steps = 0
        """Steps that ran through the compiled graph."""
        self._fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
        self._done = threading.Event()
        threading.Thread(target=self._prepare, name="chatrt-compile", daemon=True).start()

    @property
    def ready(self) -> bool:
        """Whether steps run through the compiled graph now."""
        return self._fn is not None

    def run(self, rows: list[tuple[DynamicCache, list[int]]]) -> torch.Tensor | None:
        """Decode rows (one token each after its cache, which grows by it) through the compiled graph: the
        logits [R, V]; None while it is not ready or for more rows than it takes, for the eager forward to run."""
        fn = self._fn
        if fn is None or len(rows) > self.max_rows:
            return None
        device = self.lm.device
        ids = torch.tensor([[ids[0] for _, ids in rows]], device=device)  # [1, R]
        positions = torch.tensor([[cache.get_seq_length() for cache, _ in rows]], device=device)  # [1, R]
        _context.rows = ([cache for cache, _ in rows], [(n, n + 1) for n in range(len(rows))])
        try:
            with torch.inference_mode():
                logits = fn(ids, positions)
        finally:
            _context.rows = None
        self.steps += 1
        return logits

    def describe(self) -> str:
        """Whether the step is compiled, how, and what failed."""
        if self.error:
            return f"compiling the decode step failed, steps run eagerly: {self.error}"
        if not self.ready:
            return f"the decode step for up to {self.max_rows} rows is compiling (eager steps serve meanwhile)"
        return f"decode step for up to {self.max_rows} rows {self.how} in {self.seconds:.0f} s"

    def wait(self, timeout: float | None = None) -> bool:
        """Until the step is ready (or compiling failed); whether that happened in time."""
        return self._done.wait(timeout)

    def _prepare(self) -> None:
        t0 = time.perf_counter()
        try:
            self.how = "loaded"
            if self.path.is_file():
                try:
                    self._fn = torch._inductor.aoti_load_package(str(self.path))
                except Exception as e:  # damaged, or built by a torch this one cannot load: built again
                    log.warning("the compiled decode step %s cannot be loaded (%s); compiling it again", self.path, e)
                    self.path.unlink(missing_ok=True)
            if self._fn is None:
                self.how = "compiled"
                self._build()
                self._fn = torch._inductor.aoti_load_package(str(self.path))
            self.seconds = time.perf_counter() - t0
            log.info("%s", self.describe())
        except Exception as e:  # a model or a machine the compiler cannot handle: the eager forward serves
            self.error = f"{type(e).__name__}: {e}"
            log.warning("%s", self.describe())
        finally:
            self._done.set()

    def _build(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.path.parent, prefix=".model-") as tmp:
            with quiet():
                self.lm.model.save_pretrained(tmp)  # the compiler process loads the very weights this one runs
            args = [tmp, str(self.lm.device), str(self.max_rows), str(self.path)]
            done = subprocess.run([sys.executable, "-m", "chatrt.engine.aot", *args], capture_output=True, text=True)
        if done.returncode != 0:
            log_file = self.path.with_suffix(".log")
            log_file.write_text(done.stderr)
            last = [line for line in done.stderr.splitlines() if line.strip()][-1:] or [f"exit {done.returncode}"]
            raise CompileFailed(f"the compiler process failed ({last[0]}); its output is in {log_file}")


_SHARED: weakref.WeakKeyDictionary[torch.nn.Module, dict[int, CompiledSteps]] = weakref.WeakKeyDictionary()
_SHARED_LOCK = threading.Lock()
