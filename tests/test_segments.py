"""Attention over KV segments: a row's shared segments (read in place, once per step for all the rows that
reference them) and its own tokens, merged by their log-sum-exps, is attention over the whole row."""

import torch
import torch.nn.functional as F

from chatrt.cache.kv import GrowingLayer
from chatrt.engine.segments import attend, attend_lse, causal_mask, merge

H, H_KV, D = 6, 2, 16


def layer(shared: list[tuple[torch.Tensor, torch.Tensor]], own: int) -> GrowingLayer:
    """A cache layer with these shared segments and `own` tokens of its own (random keys and values)."""
    out = GrowingLayer(tuple(shared))
    out.append(torch.randn(1, H_KV, own, D), torch.randn(1, H_KV, own, D))
    return out


def whole(q: torch.Tensor, lay: GrowingLayer) -> torch.Tensor:
    """The reference: SDPA over the row's segments joined, its new tokens (q's) the last ones."""
    keys, values = lay.update(torch.empty(1, H_KV, 0, D), torch.empty(1, H_KV, 0, D))
    mask = causal_mask(q.shape[2], keys.shape[-2], q.device)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True, scale=0.25)


def segment(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(1, H_KV, n, D), torch.randn(1, H_KV, n, D)


def test_merging_two_halves_by_their_log_sum_exps_is_attention_over_both():
    q, (k, v) = torch.randn(1, H, 5, D), segment(300)
    o1, l1 = attend_lse(q, k[..., :120, :], v[..., :120, :], 0.25)
    o2, l2 = attend_lse(q, k[..., 120:, :], v[..., 120:, :], 0.25)
    merged, lse = merge(o1, l1, o2, l2)
    o, whole_lse = attend_lse(q, k, v, 0.25)
    torch.testing.assert_close(merged, o, rtol=0, atol=1e-6)
    torch.testing.assert_close(lse, whole_lse, rtol=0, atol=1e-5)
    torch.testing.assert_close(o, F.scaled_dot_product_attention(q, k, v, scale=0.25, enable_gqa=True), rtol=0,
                               atol=1e-6)  # fmt: skip


def test_rows_sharing_segments_decoding_and_prefilling_in_one_step_attend_as_over_their_whole_cache():
    torch.manual_seed(0)
    system, fork = segment(200), segment(40)
    rows = [  # (layer, new tokens): decoding and prompt rows, on one, two or no shared segments
        (layer([system], 1), 1),
        (layer([system], 30), 7),
        (layer([system, fork], 5), 1),
        (layer([], 50), 1),
        (layer([system], 12), 12),
        (layer([(system[0][..., :90, :], system[1][..., :90, :])], 3), 1),  # a crop inside a shared segment
    ]
    spans, start = [], 0
    for _, n in rows:
        spans.append((start, start + n))
        start += n
    q = torch.randn(1, H, start, D)
    out = attend(q, [lay for lay, _ in rows], spans, 0.25)
    for (lay, _), (a, b) in zip(rows, spans, strict=True):
        torch.testing.assert_close(out[..., a:b, :], whole(q[..., a:b, :], lay), rtol=0, atol=2e-6)


def test_a_shared_segment_is_attended_once_per_step_for_all_its_rows(monkeypatch):
    """16 decoding rows on one shared prompt: one call reads the prompt for all of them, one per row its own."""
    from chatrt.engine import segments

    reads = []
    real = segments.attend_lse

    def counting(q, keys, values, scale, **kw):  # type: ignore[no-untyped-def]
        reads.append(keys.shape[-2])
        return real(q, keys, values, scale, **kw)

    monkeypatch.setattr(segments, "attend_lse", counting)
    system = segment(400)
    layers = [layer([system], 10 + n) for n in range(16)]
    out = attend(torch.randn(1, H, 16, D), layers, [(n, n + 1) for n in range(16)], 0.25)
    assert out.shape == (1, H, 16, D)
    assert reads.count(400) == 1 and sorted(r for r in reads if r != 400) == list(range(10, 26))


def test_rows_without_shared_segments_are_plain_sdpa_bit_for_bit():
    torch.manual_seed(1)
    layers = [layer([], 20), layer([], 33)]
    q = torch.randn(1, H, 4, D)
    out = attend(q, layers, [(0, 1), (1, 4)], 0.25)
    assert torch.equal(out[..., :1, :], whole(q[..., :1, :], layers[0]))
    assert torch.equal(out[..., 1:, :], whole(q[..., 1:, :], layers[1]))
