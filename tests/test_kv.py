"""KV holds keys and values for exactly its ids; crops are views and the transformers cache shares its tensors."""

import pytest
import torch

from chatrt.cache.integrity import Sealer
from chatrt.cache.kv import KV, KVSpec, check_meta, common_prefix_len, from_chunks, to_chunks
from chatrt.engine import forward
from chatrt.errors import CacheRejected
from tests.conftest import compute_kv, prefill, tiny_llama


def test_common_prefix_len():
    assert common_prefix_len([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix_len((1, 2), [1, 2, 3]) == 2
    assert common_prefix_len([], [1]) == 0
    assert common_prefix_len([5], [6]) == 0


def test_kv_of_prefix_equals_crop_of_longer_kv(tiny_lm):
    ids = tuple(range(100, 140))
    full, part = compute_kv(tiny_lm, ids), compute_kv(tiny_lm, ids[:25])
    cropped = full.crop(25)
    assert cropped.ids == part.ids
    for a, b in zip(cropped.keys + cropped.values, part.keys + part.values, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert cropped.keys[0].untyped_storage().data_ptr() == full.keys[0].untyped_storage().data_ptr()


def test_geometry_and_bytes(tiny_lm):
    kv = compute_kv(tiny_lm, (1, 2, 3, 4, 5))
    assert len(kv) == 5 and len(kv.keys) == tiny_lm.info.num_layers
    assert kv.keys[0].shape == (1, tiny_lm.info.num_kv_heads, 5, tiny_lm.info.head_dim)
    assert kv.nbytes == 5 * tiny_lm.info.kv_bytes_per_token


def test_as_cache_shares_tensors_and_growth_never_mutates_them(tiny_lm):
    kv = compute_kv(tiny_lm, tuple(range(200, 220)))
    before = [t.clone() for t in kv.keys + kv.values]
    cache = kv.as_cache()
    assert cache.get_seq_length() == 20
    assert cache.layers[0].keys.data_ptr() == kv.keys[0].data_ptr()
    _, grown = prefill(tiny_lm, kv, [7, 8, 9])
    assert grown.get_seq_length() == 23
    for a, b in zip(kv.keys + kv.values, before, strict=True):
        assert torch.equal(a, b)


def test_appending_a_token_does_not_copy_the_whole_cache(tiny_lm):
    """A 300-token reply after a 1,000-token prompt: the cache moves to new room a few times, not per token."""
    kv = compute_kv(tiny_lm, tuple(range(100, 1100)))
    cache = kv.as_cache()
    homes = set()
    for token in range(300):
        forward(tiny_lm, cache, [500 + token])
        homes.add(cache.layers[0].keys.untyped_storage().data_ptr())
    assert cache.get_seq_length() == 1300 and len(homes) <= 3
    grown = KV.from_cache(cache, (*kv.ids, *range(500, 800)))
    assert torch.equal(grown.keys[1][..., :1000, :], kv.keys[1])  # what it started from, copied once
    room = grown.keys[0].untyped_storage().nbytes()
    assert grown.keys[0].numel() * 4 < room <= grown.keys[0].numel() * 4 * (1 + 1 / 8) + 64 * 2 * 16 * 4


def test_kv_rejects_mismatched_lengths():
    t = torch.zeros(1, 2, 3, 4)
    with pytest.raises(AssertionError):
        KV((1, 2), (t,), (t,))


def test_to_same_device_is_identity(tiny_lm):
    kv = compute_kv(tiny_lm, (1, 2, 3))
    assert kv.to(kv.device) is kv
    moved = kv.to("meta")
    assert moved.device.type == "meta" and moved.ids == kv.ids


def test_bytes_round_trip_is_bit_exact_and_chunked(tiny_lm):
    kv = compute_kv(tiny_lm, tuple(range(200, 260))).crop(50)  # views: serialization must not need contiguity
    meta, chunks = to_chunks(kv, tiny_lm.info.fingerprint, chunk_bytes=4096, sealer=Sealer())
    assert meta.chunks == len(chunks) > 1 and all(len(c) <= 4096 for c in chunks)
    assert meta.ids == kv.ids and meta.nbytes == sum(len(c) for c in chunks)
    back = from_chunks(meta, [bytes(c) for c in chunks], KVSpec.of(tiny_lm.info), Sealer(), "cpu")
    assert back.ids == kv.ids
    assert all(torch.equal(a, b) for a, b in zip(back.keys + back.values, kv.keys + kv.values, strict=True))


def flip(chunk: bytes) -> bytes:
    return chunk[:-1] + bytes([chunk[-1] ^ 1])


@pytest.mark.parametrize(
    "spoil, reason",
    [
        (lambda meta, chunks: (meta, [*chunks[:-1], None]), "missing"),
        (lambda meta, chunks: (meta, [flip(chunks[0]), *chunks[1:]]), "digest"),
        (lambda meta, chunks: (meta.model_copy(update={"fingerprint": "other"}), chunks), "another model"),
        (lambda meta, chunks: (meta.model_copy(update={"ids": (9, *meta.ids[1:])}), chunks), "digest"),
        (lambda meta, chunks: (meta.model_copy(update={"ids": meta.ids[:-1]}), chunks), "shapes"),
        (lambda meta, chunks: (meta.model_copy(update={"key_shape": (1, 1, 1, 1)}), chunks), "shapes"),
        (lambda meta, chunks: (meta.model_copy(update={"num_layers": 1}), chunks), "layers"),
        (lambda meta, chunks: (meta.model_copy(update={"dtype": "float16"}), chunks), "float16"),
        (lambda meta, chunks: (meta.model_copy(update={"chunks": 3_000_000}), chunks), "3000000 chunks"),
        (lambda meta, chunks: (meta.model_copy(update={"nbytes": 2**40}), chunks), "bytes"),
        (lambda meta, chunks: (meta.model_copy(update={"ids": (10**9, *meta.ids[1:])}), chunks), "token ids"),
    ],
)
def test_untrusted_bytes_are_rejected_never_loaded(tiny_lm, spoil, reason):
    meta, chunks = to_chunks(compute_kv(tiny_lm, (1, 2, 3, 4)), tiny_lm.info.fingerprint, 1024, Sealer())
    meta, chunks = spoil(meta, [bytes(c) for c in chunks])
    with pytest.raises(CacheRejected, match=reason):
        from_chunks(meta, chunks, KVSpec.of(tiny_lm.info), Sealer(), "cpu")


def test_metadata_that_does_not_fit_the_model_is_refused_before_anything_is_read(tokenizer, tiny_lm):
    """A forger can make metadata and bytes agree (and recompute a sha256); they must still fit this model."""
    other = tiny_llama(tokenizer, dtype=torch.float16)  # another dtype: its caches are no use to a float32 model
    kv = compute_kv(other, (1, 2, 3, 4))
    meta, _ = to_chunks(kv, tiny_lm.info.fingerprint, 1024, Sealer())  # the forger copies the fingerprint
    with pytest.raises(CacheRejected, match="float16"):
        check_meta(meta, KVSpec.of(tiny_lm.info))
    short = KV(kv.ids, kv.keys[:1], kv.values[:1])
    with pytest.raises(CacheRejected, match="1 layers"):
        check_meta(to_chunks(short, tiny_lm.info.fingerprint, 1024, Sealer())[0], KVSpec.of(tiny_lm.info))


def test_with_a_secret_only_caches_signed_with_it_are_accepted(tiny_lm):
    kv = compute_kv(tiny_lm, (1, 2, 3, 4))
    ours, forged = Sealer("s3cret"), Sealer()  # the forger has everything but the secret
    meta, chunks = to_chunks(kv, tiny_lm.info.fingerprint, 1024, ours)
    assert meta.digest.startswith("hmac-sha256:")
    assert from_chunks(meta, [bytes(c) for c in chunks], KVSpec.of(tiny_lm.info), ours, "cpu").ids == kv.ids
    for sealer in (forged, Sealer("guess")):
        meta, chunks = to_chunks(kv, tiny_lm.info.fingerprint, 1024, sealer)
        with pytest.raises(CacheRejected, match="secret"):
            from_chunks(meta, [bytes(c) for c in chunks], KVSpec.of(tiny_lm.info), ours, "cpu")
