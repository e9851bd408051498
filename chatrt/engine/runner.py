"""How the engine runs the model for one step: through the compiled step where it is ready and faster
(`compiled.py`), else eagerly: a lone row through the plain forward (bit for bit what it computes alone, the
exactness tests' reference path), several rows through one packed forward (`packed.py`).
The engine's step and everything that computes KV (shared prefixes, cost probes, tests, the bench) run here.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from chatrt.engine.compiled import CompiledSteps, Rows
from chatrt.engine.packed import run_rows
from chatrt.model import LoadedModel


@torch.inference_mode()
def forward(lm: LoadedModel, cache: DynamicCache, ids: list[int]) -> torch.Tensor:
    """Run `ids` after the tokens in `cache` (which grows by them), alone: the logits of the last position ([V])."""
    assert ids, "a forward needs at least one new token"
    x = torch.tensor([ids], device=lm.device)  # [1, S]
    return lm.model(input_ids=x, **{lm.cache_arg: cache}, use_cache=True, logits_to_keep=1).logits[0, -1].float()


def run(lm: LoadedModel, rows: Rows, compiled: CompiledSteps | None = None) -> torch.Tensor:
    """Each row's `ids` run after its cache (which grows by them): the logits of each row's last new token,
    [R, V]. Once the compiled step is ready, the rows run through it where it is faster (decoding rows, short
    prompts); otherwise its rows of one token run through it and the prompt chunks eagerly beside them. Without
    it, a lone row runs the plain forward, several rows one packed forward."""
    if compiled is None or not compiled.ready:
        return eager(lm, rows)
    if compiled.takes(rows):
        return compiled.run(rows)
    single = [n for n, (_, ids) in enumerate(rows) if len(ids) == 1]
    if not single or not compiled.takes([rows[n] for n in single]):
        return eager(lm, rows)
    taken = set(single)
    chunks = [n for n in range(len(rows)) if n not in taken]
    logits = compiled.run([rows[n] for n in single])  # [S, V]
    out = logits.new_empty(len(rows), logits.shape[-1])  # [R, V]
    out[single] = logits
    out[chunks] = eager(lm, [rows[n] for n in chunks])
    return out


def eager(lm: LoadedModel, rows: Rows) -> torch.Tensor:
    """The rows through the model's own forward: a lone row plainly (the exact path), several rows packed."""
    if len(rows) == 1:
        cache, ids = rows[0]
        return forward(lm, cache, ids)[None]
    return run_rows(lm, [cache for cache, _ in rows], [ids for _, ids in rows])
