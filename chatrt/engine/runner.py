"""How the engine runs the model for one step: decode rows through a compiled graph when one is ready
(`compiled.py`), else a lone row through the plain forward (bit for bit what it computes alone, the exactness
tests' reference path) and several rows through one packed forward (`packed.py`).
The engine's step and everything that computes KV (shared prefixes, cost probes, tests, the bench) run here.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from chatrt.engine.compiled import CompiledSteps
from chatrt.engine.packed import run_rows
from chatrt.model import LoadedModel


@torch.inference_mode()
def forward(lm: LoadedModel, cache: DynamicCache, ids: list[int]) -> torch.Tensor:
    """Run `ids` after the tokens in `cache` (which grows by them), alone: the logits of the last position ([V])."""
    assert ids, "a forward needs at least one new token"
    x = torch.tensor([ids], device=lm.device)  # [1, S]
    return lm.model(input_ids=x, **{lm.cache_arg: cache}, use_cache=True, logits_to_keep=1).logits[0, -1].float()


def run(lm: LoadedModel, rows: list[tuple[DynamicCache, list[int]]], compiled: CompiledSteps | None = None) -> (
    torch.Tensor
):  # fmt: skip
    """Each row's `ids` run after its cache (which grows by them): the logits of each row's last new token,
    [R, V]. Decode rows go through the compiled graph when it is ready; otherwise a lone row runs the plain
    forward, several rows one packed forward."""
    if compiled is not None and all(len(ids) == 1 for _, ids in rows):
        logits = compiled.run(rows)
        if logits is not None:
            return logits
    if len(rows) == 1:
        cache, ids = rows[0]
        return forward(lm, cache, ids)[None]
    return run_rows(lm, [cache for cache, _ in rows], [ids for _, ids in rows])
