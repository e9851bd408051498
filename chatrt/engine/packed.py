"""One forward over several rows (requests) at once: their new tokens packed into one sequence, so every linear
layer runs once for all of them, and attention per row over that row's own cache (SGLang's torch-native
backend works this way). No padding, and no session's KV is copied into a batch tensor.

transformers' modeling code is used as it is: a registered attention function ("chatrt") and a Cache whose
`update` appends each row's slice to that row's cache. Called without rows (any plain forward, `generate`),
the attention function is transformers' own SDPA, so a model set to "chatrt" behaves as one set to "sdpa".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from chatrt.cache.kv import cache_layer
from chatrt.engine import segments
from chatrt.model import LoadedModel

ATTENTION = "chatrt"


@dataclass
class Rows:
    """The rows of one packed forward: row i's new tokens are packed positions spans[i] = (start, end)."""

    caches: list[DynamicCache]
    spans: list[tuple[int, int]]


class PackedCache(DynamicCache):
    """What the model sees as its cache during a packed forward: it holds nothing itself, it appends each row's
    keys and values to that row's cache (the attention function reads them there)."""

    def __init__(self, rows: Rows) -> None:
        super().__init__()
        self.rows = rows

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):  # type: ignore[no-untyped-def, override]
        # key_states, value_states: [1, H_kv, T, D] for all T packed tokens
        for cache, (start, end) in zip(self.rows.caches, self.rows.spans, strict=True):
            cache_layer(cache, layer_idx).append(key_states[..., start:end, :], value_states[..., start:end, :])
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are given per token; masks are made per row by the attention function

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:  # type: ignore[no-untyped-def]
        q = args[0] if args else next(iter(kwargs.values()))
        return (q if isinstance(q, int) else int(q.shape[0])), 0


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):  # type: ignore[no-untyped-def]
    """query: [1, H, T, D] for the packed tokens. Each row attends over its own cache (its new tokens already
    appended) and the shared segments it references, causally: its j-th new token sees the cache up to itself."""
    rows: Rows | None = kwargs.pop("chatrt_rows", None)
    if rows is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)  # fmt: skip
    layers = [cache.layers[module.layer_idx] for cache in rows.caches]
    return segments.attend(query, layers, rows.spans, scaling).transpose(1, 2), None  # [1, T, H, D]


AttentionInterface.register(ATTENTION, packed_attention)
AttentionMaskInterface.register(ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def use_packed_attention(lm: LoadedModel) -> None:
    """Set the model to "chatrt" attention (SDPA, plus the packed path when rows are given)."""
    lm.model.config._attn_implementation = ATTENTION


@torch.inference_mode()
def run_rows(lm: LoadedModel, caches: list[DynamicCache], inputs: list[list[int]]) -> torch.Tensor:
    """One forward over every row's new tokens (`inputs[i]` after the tokens in `caches[i]`, which grow by them).
    Returns each row's last-position logits: [R, V]."""
    spans, ids, positions = [], [], []
    for cache, row in zip(caches, inputs, strict=True):
        assert row, "every row feeds at least one token"
        past = cache.get_seq_length()
        spans.append((len(ids), len(ids) + len(row)))
        ids += row
        positions += range(past, past + len(row))
    rows = Rows(caches, spans)
    last = torch.tensor([end - 1 for _, end in spans], device=lm.device)
    out = lm.model(
        input_ids=torch.tensor([ids], device=lm.device),  # [1, T]
        position_ids=torch.tensor([positions], device=lm.device),  # [1, T]
        **{lm.cache_arg: PackedCache(rows)},
        use_cache=True,
        logits_to_keep=last,
        chatrt_rows=rows,
    )
    return out.logits[0].float()  # [R, V]
