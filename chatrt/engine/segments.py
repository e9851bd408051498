"""Attention of a step's rows over their KV segments: each row's own tokens, and the shared segments it references
(a shared prefix's KV, a fork point), which are read in place, never copied into the row's cache.

A shared segment is attended once per step for every row that references it, all their queries in one call, so
16 rows on one shared prompt read its keys and values once, not 16 times (FlashInfer's cascade attention; vLLM
has it for common prefixes). Each part returns its log-sum-exp, and the parts of a row are merged by them: the
softmax over the whole row, computed in pieces. A row without shared segments is plain SDPA over its cache.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from chatrt.cache.kv import GrowingLayer


def attend(q: torch.Tensor, layers: Sequence[GrowingLayer], spans: Sequence[tuple[int, int]], scale: float) -> (
    torch.Tensor
):  # fmt: skip
    """q: [1, H, T, D], the packed queries of the step's rows; row i's tokens are positions spans[i] and its cache
    layer is layers[i], its new tokens already appended (the last of its own). Each new token sees every shared
    token and its own ones up to itself. Returns [1, H, T, D]."""
    if len(layers) == 1:  # one row: its parts merged in place of a gather and scatter
        layer = layers[0]
        if not layer.shared:
            return attend_row(q, layer.keys, layer.values, scale)
        out, lse = attend_lse(q, layer.keys, layer.values, scale, causal=True)
        for k, v in layer.shared:
            out, lse = merge(out, lse, *attend_lse(q, k, v, scale))
        return out
    out = q.new_empty(q.shape)
    if not any(layer.shared for layer in layers):
        for layer, (start, end) in zip(layers, spans, strict=True):
            out[..., start:end, :] = attend_row(q[..., start:end, :], layer.keys, layer.values, scale)
        return out
    lse = q.new_empty(q.shape[:3], dtype=torch.float32)  # [1, H, T]
    groups: dict[int, tuple[torch.Tensor, torch.Tensor, list[int]]] = {}  # one per shared segment: its rows
    for n, (layer, (start, end)) in enumerate(zip(layers, spans, strict=True)):
        o, part = attend_lse(q[..., start:end, :], layer.keys, layer.values, scale, causal=True)
        out[..., start:end, :], lse[..., start:end] = o, part
        for k, v in layer.shared:
            groups.setdefault(id(k), (k, v, []))[2].append(n)
    for k, v, rows in groups.values():
        positions = [p for n in rows for p in range(*spans[n])]
        if len(positions) == q.shape[2]:  # every token of the step: no gathering
            out, lse = merge(out, lse, *attend_lse(q, k, v, scale))
            continue
        index = torch.tensor(positions, device=q.device)
        o, part = attend_lse(q.index_select(2, index), k, v, scale)
        merged, merged_lse = merge(out.index_select(2, index), lse.index_select(2, index), o, part)
        out.index_copy_(2, index, merged)
        lse.index_copy_(2, index, merged_lse)
    return out


def attend_row(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """q: [1, H, n, D], a row's n newest tokens; keys, values: [1, H_kv, L, D], those n last: [1, H, n, D]."""
    mask = causal_mask(q.shape[2], keys.shape[-2], q.device)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)


def attend_lse(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float, *, causal: bool = False) -> (
    tuple[torch.Tensor, torch.Tensor]
):  # fmt: skip
    """q: [1, H, N, D]; keys, values: [1, H_kv, L, D]. Attention of every query over all L keys (`causal`: the N
    queries are the last N of them, each seeing up to itself), and its log-sum-exp: ([1, H, N, D], [1, H, N] fp32).
    The H / H_kv query heads that share a key head are one query block over it, so keys are never repeated."""
    _, h, n, d = q.shape
    h_kv, length = keys.shape[1], keys.shape[2]
    g = h // h_kv
    qg = q.reshape(1, h_kv, g * n, d)  # query head kv·g + j, token t → row j·n + t of key head kv
    mask = None
    if causal and n > 1:
        allowed = causal_mask(n, length, q.device).repeat(g, 1)  # type: ignore[union-attr]  # [g·n, L]
        mask = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill_(~allowed, float("-inf"))
    if q.device.type == "cpu":  # the flash kernel SDPA runs on CPU, which also returns the log-sum-exp
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qg, keys, values, attn_mask=mask,
                                                                             scale=scale)  # fmt: skip
    else:  # the softmax written out: any device
        scores = (qg.float() @ keys.float().transpose(-1, -2)) * scale  # [1, H_kv, g·n, L]
        if mask is not None:
            scores = scores + mask
        lse = torch.logsumexp(scores, dim=-1)
        o = (torch.softmax(scores, dim=-1) @ values.float()).to(q.dtype)
    return o.reshape(1, h, n, d), lse.float().reshape(1, h, n)


def merge(out: torch.Tensor, lse: torch.Tensor, o: torch.Tensor, l: torch.Tensor) -> (  # noqa: E741
    tuple[torch.Tensor, torch.Tensor]
):  # fmt: skip
    """Two attentions of the same queries over disjoint keys ([1, H, N, D] each, with their log-sum-exps [1, H, N]
    fp32) as one attention over all of those keys: each weighted by its share of the softmax's denominator,
    exp(l) / (exp(lse) + exp(l)) = sigmoid(l - lse) for the second. Four kernels: this runs per layer."""
    weight = torch.sigmoid(l - lse).unsqueeze(-1)  # [1, H, N, 1]
    merged = torch.lerp(out.float(), o.float(), weight).to(out.dtype)
    return merged, torch.logaddexp(lse, l)


def causal_mask(n: int, length: int, device: torch.device) -> torch.Tensor | None:
    """[n, L]: a row's n newest tokens over its L cached ones, query j at position L - n + j seeing up to itself;
    None for one token, which sees everything."""
    return None if n == 1 else torch.ones(n, length, dtype=torch.bool, device=device).tril(length - n)
