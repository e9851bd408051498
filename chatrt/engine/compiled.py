"""The compiled step: the whole model as one graph compiled ahead of time (AOTInductor) for any step of up to
`max(max_batch, PROMPT_TOKENS)` tokens, with attention kept out of the graph as an opaque op over each row's own
cache, whose rows come from a per-thread forward context (as vLLM keeps its attention op out of its graphs).
Decoding rows always run through it; a step with prompt chunks does where it was measured faster.

Compiling never makes a user wait: a process of its own (`aot.py`, a minute or two of one core, at a lower
priority) exports and compiles the model while the eager forward serves, and the package is kept on disk per
model fingerprint, torch and transformers version, device, dtype, CPU and size, so a later start only loads it
(seconds, in the background). A compiled step runs in C++ and releases the GIL (the attention op takes it for
its Python).

The forward is written out for the Llama family (it follows transformers' LlamaModel: the same modules, the
same rotary embedding); any other model runs eagerly.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from transformers import DynamicCache, PreTrainedModel

from chatrt.cache.kv import cache_layer, new_cache
from chatrt.engine import segments
from chatrt.errors import CompileFailed
from chatrt.model import LoadedModel, quiet

log = logging.getLogger("chatrt")
SUPPORTED = frozenset({"llama"})
AUTO_MIN_PARAMS = 50_000_000
"""`compile = "auto"` compiles models at least this large: the package holds the weights twice (as given and
packed for the GEMM kernels), which is worth its disk and minute of compiling where a step reads the weights."""
PROMPT_TOKENS = 128
"""The graph takes steps of up to this many tokens (or max_batch, if more), so short prompts (a chat's next
message) can run through it too where that was measured faster."""

_context = threading.local()  # the rows of the step this thread runs: (caches, spans)


_LIBRARY = torch.library.Library("chatrt", "DEF")  # registered plainly: custom_op's wrappers cost 30 calls a step
_LIBRARY.define("attend(Tensor q, Tensor k, Tensor v, int layer, float scale) -> Tensor")


@torch.library.impl(_LIBRARY, "attend", "CompositeExplicitAutograd")
def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, scale: float) -> torch.Tensor:
    """q: [1, H, T, D]; k, v: [1, H_kv, T, D] for the T packed tokens of the step's rows. Each row's keys and
    values are appended to its own cache and it attends over that cache and the shared segments it references
    (causally among its new tokens). Returns [1, H, T, D], contiguous."""
    caches, spans = _context.rows
    assert spans[-1][1] == q.shape[2], "the rows' tokens are the step's tokens"
    layers = []
    for cache, (start, end) in zip(caches, spans, strict=True):
        layers.append(cache_layer(cache, layer))
        layers[-1].append(k[..., start:end, :], v[..., start:end, :])
    return segments.attend(q, layers, spans, scale).contiguous()


@torch.library.register_fake("chatrt::attend")
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, scale: float) -> torch.Tensor:
    return q.new_empty(q.shape)  # contiguous, as the real one returns


def llama_forward(model: PreTrainedModel, ids: torch.Tensor, positions: torch.Tensor, last: torch.Tensor) -> (
    torch.Tensor
):  # fmt: skip
    """transformers' LlamaForCausalLM forward with `chatrt::attend` for attention: ids, positions [1, T] (the
    step's rows' tokens, packed); `last` [R], the index of each row's last token. Returns their logits, [R, V]
    (the output head runs on those tokens only)."""
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
    return model.lm_head(m.norm(h[0, last])).float()  # [R, V]


def compilable(lm: LoadedModel, setting: str) -> str:
    """Why this model is not compiled under `setting` ("" when it is)."""
    if setting == "off":
        return "engine.compile is off"
    if lm.model.config.model_type not in SUPPORTED:
        return f"the {lm.model.config.model_type!r} architecture has no compiled forward (only {sorted(SUPPORTED)})"
    if setting == "auto" and sum(p.numel() for p in lm.model.parameters()) < AUTO_MIN_PARAMS:
        return "the model is too small for compiling to pay"
    return ""


def package_path(lm: LoadedModel, max_tokens: int, folder: Path) -> Path:
    """Where the compiled step of this model (its weights and tokenizer) for up to this many tokens, torch and
    transformers, device, dtype and CPU instruction set is kept."""
    device = lm.device.type if lm.device.type != "cpu" else f"cpu-{torch.backends.cpu.get_cpu_capability()}"
    dtype = str(lm.dtype).removeprefix("torch.")
    versions = f"torch{torch.__version__}-transformers{transformers.__version__}"  # the graph holds both's code
    return folder / f"{lm.info.fingerprint[:24]}-{versions}-{device}-{dtype}-{max_tokens}tokens.pt2"


def load_package(path: Path) -> Callable[..., list[torch.Tensor]]:
    """The compiled step in `path`, loaded. AOTInductor's loader extracts the package (about the size of the
    weights: 1.1 GB for the bundled model) into a new `aotinductor_*` folder of the temporary directory and
    leaves it there when the process ends without its destructor (as most do): one more copy per start, until
    the disk is full. What it loaded stays mapped, so the folder is removed once the load is done (Linux keeps
    a mapped file's pages after its name is gone; elsewhere the removal fails and is ignored)."""
    tmp = Path(tempfile.gettempdir())
    before = set(tmp.glob("aotinductor_*"))
    fn = torch._inductor.aoti_load_package(str(path))
    for folder in set(tmp.glob("aotinductor_*")) - before:  # this load's (its package's name inside)
        if any(child.name.startswith(path.stem) for child in folder.iterdir()):
            shutil.rmtree(folder, ignore_errors=True)
    return fn


Rows = list[tuple[DynamicCache, list[int]]]
"""A step's rows: each row's cache and the ids that run after it."""
Eager = Callable[[LoadedModel, DynamicCache, list[int]], torch.Tensor]
"""The eager forward of one row (`runner.forward`), which the compiled step is measured against."""


class CompiledSteps:
    """The compiled step of one loaded model, shared by every engine (runtime) of the process that runs it:
    `for_model` gives the same one, so a second runtime neither compiles again nor competes for the CPU."""

    @classmethod
    def for_model(cls, lm: LoadedModel, max_rows: int, folder: Path, eager: Eager) -> CompiledSteps:
        """The model's compiled step for up to `max_rows` decoding rows (and short prompts), loaded or compiled
        in the background. `folder`: where compiled packages are kept between runs."""
        tokens = max(max_rows, PROMPT_TOKENS)
        path = package_path(lm, tokens, folder)
        with _SHARED_LOCK:
            mine = _SHARED.setdefault(lm.model, {})
            if path not in mine:
                mine[path] = cls(lm, tokens, path, eager)
            return mine[path]

    def __init__(self, lm: LoadedModel, tokens: int, path: Path, eager: Eager) -> None:
        self.lm, self.tokens, self.path, self._eager = lm, tokens, path, eager
        """`tokens`: the most tokens a step through the graph may hold."""
        self.prompt_tokens = 0
        """The most tokens a step with prompt chunks in it runs compiled: where the graph was measured faster
        than the eager forward on this machine (its GEMM kernels are tuned for decoding's few rows)."""
        self.how = "loaded"
        """How the step becomes ready: "loaded" (compiled by an earlier start) or "compiled" (by this one)."""
        self.seconds = 0.0
        """How long it took to be ready."""
        self.error = ""
        self.steps = 0
        """Steps that ran through the compiled graph."""
        self._fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
        self._done = threading.Event()
        threading.Thread(target=self._prepare, name="chatrt-compile", daemon=True).start()

    @property
    def ready(self) -> bool:
        """Whether steps run through the compiled graph now."""
        return self._fn is not None

    def takes(self, rows: Rows) -> bool:
        """Whether these rows run faster through the graph: decoding rows (one token each) always, rows with
        prompt chunks up to the measured `prompt_tokens`."""
        if self._fn is None:
            return False
        tokens = sum(len(ids) for _, ids in rows)
        return tokens <= (self.tokens if tokens == len(rows) else self.prompt_tokens)

    def run(self, rows: Rows) -> torch.Tensor:
        """Each row's ids run after its cache (which grows by them) through the graph: the logits of each row's
        last token, [R, V]. Only for rows it `takes`."""
        assert self._fn is not None and sum(len(ids) for _, ids in rows) <= self.tokens
        logits = _call(self._fn, self.lm.device, rows)
        self.steps += 1
        return logits

    def describe(self) -> str:
        """Whether the step is compiled, how, and what failed."""
        if self.error:
            return f"compiling the decode step failed, steps run eagerly: {self.error}"
        if not self.ready:
            doing = "compiling" if self.how == "compiled" else "loading"
            return f"the decode step is {doing} (eager steps serve meanwhile)"
        prompts = f"prompts up to {self.prompt_tokens} tokens" if self.prompt_tokens else "no prompt chunks"
        return f"step for up to {self.tokens} tokens {self.how} in {self.seconds:.0f} s (decoding rows and {prompts})"

    def wait(self, timeout: float | None = None) -> bool:
        """Until the step is ready (or compiling failed); whether that happened in time."""
        return self._done.wait(timeout)

    def _prepare(self) -> None:
        t0 = time.perf_counter()
        try:
            fn = None
            if self.path.is_file():
                try:
                    fn = load_package(self.path)
                except Exception as e:  # damaged, or built by a torch this one cannot load: built again
                    log.warning("the compiled decode step %s cannot be loaded (%s); compiling it again", self.path, e)
                    self.path.unlink(missing_ok=True)
                    self.path.with_suffix(".json").unlink(missing_ok=True)
            if fn is None:
                self.how = "compiled"
                self._build()
                fn = load_package(self.path)
            self.prompt_tokens = self._prompt_tokens(fn)
            self.seconds = time.perf_counter() - t0
            self._fn = fn
            log.info("%s", self.describe())
        except Exception as e:  # a model or a machine the compiler cannot handle: the eager forward serves
            self.error = f"{type(e).__name__}: {e}"
            log.warning("%s", self.describe())
        finally:
            self._done.set()

    def _prompt_tokens(self, fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> int:
        """`_measure`d once per package (a few seconds), then kept beside it."""
        kept = self.path.with_suffix(".json")
        try:
            return int(json.loads(kept.read_text())["prompt_tokens"])
        except (OSError, ValueError, KeyError, TypeError):
            tokens = self._measure(fn)
            kept.write_text(json.dumps({"prompt_tokens": tokens}))
            return tokens

    def _measure(self, fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> int:
        """The most prompt tokens (of 8, 16, 32, ...) one row runs faster through the graph than eagerly, after a
        few tokens of context (best of two tries each); 0 if none."""
        context = list(range(1, 17))

        def compiled(ids: list[int]) -> float:
            cache = new_cache()
            self._eager(self.lm, cache, context)
            t0 = time.perf_counter()
            _call(fn, self.lm.device, [(cache, ids)])
            return time.perf_counter() - t0

        def eager(ids: list[int]) -> float:
            cache = new_cache()
            self._eager(self.lm, cache, context)
            t0 = time.perf_counter()
            self._eager(self.lm, cache, ids)
            return time.perf_counter() - t0

        best, n = 0, 8
        while n <= self.tokens:
            ids = list(range(100, 100 + n))
            if min(compiled(ids) for _ in range(2)) >= min(eager(ids) for _ in range(2)):
                break
            best, n = n, 2 * n
        return best

    def _build(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.with_suffix(".json").unlink(missing_ok=True)  # measured again once built
        with tempfile.TemporaryDirectory(dir=self.path.parent, prefix=".model-") as tmp:
            with quiet():
                self.lm.model.save_pretrained(tmp)  # the compiler process loads the very weights this one runs
            args = [tmp, str(self.lm.device), str(self.tokens), str(self.path)]
            # The compiler's working files (a gigabyte or two for the bundled model) go with the folder; the
            # package is the one thing kept.
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(Path(tmp) / "inductor")}
            done = subprocess.run([sys.executable, "-m", "chatrt.engine.aot", *args], capture_output=True, text=True,
                                  env=env)  # fmt: skip
        if done.returncode != 0:
            log_file = self.path.with_suffix(".log")
            log_file.write_text(done.stderr)
            last = [line for line in done.stderr.splitlines() if line.strip()][-1:] or [f"exit {done.returncode}"]
            raise CompileFailed(f"the compiler process failed ({last[0]}); its output is in {log_file}")


def _call(fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], device: torch.device,
          rows: Rows) -> torch.Tensor:  # fmt: skip
    """The rows packed into one call of the graph, their caches in this thread's forward context: [R, V]."""
    spans, end = [], 0
    for _, ids in rows:
        spans.append((end, end + len(ids)))
        end += len(ids)
    ids = torch.tensor([[i for _, row in rows for i in row]], device=device)  # [1, T]
    positions = torch.tensor([[cache.get_seq_length() + j for cache, row in rows for j in range(len(row))]],
                             device=device)  # fmt: skip  # [1, T]
    last = torch.tensor([stop - 1 for _, stop in spans], device=device)  # [R]
    _context.rows = ([cache for cache, _ in rows], spans)
    try:
        with torch.inference_mode():
            return fn(ids, positions, last)
    finally:
        _context.rows = None


_SHARED: weakref.WeakKeyDictionary[torch.nn.Module, dict[Path, CompiledSteps]] = weakref.WeakKeyDictionary()
_SHARED_LOCK = threading.Lock()
