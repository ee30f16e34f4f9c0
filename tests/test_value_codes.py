"""Value groups stored as codeword indices (`value_codes`): accounted exactly, read by the
reference attention and by the Triton kernel (interpreted here) as the dequantized values
would be, one codebook per KV head and slot fitted on the first values packed and kept while
decoding, moved with its sequence, and refused where it does not apply."""

from __future__ import annotations

import dataclasses
import importlib.util
import math

import pytest
import torch

from hf_subtok import SubTokenCache, SubTokenConfig
from hf_subtok.allocation.select import tokens_within
from hf_subtok.kernels import packed_attention, packed_attention_reference
from hf_subtok.quant import CodedTensor, quantize_vectors
from hf_subtok.storage.rollback import _CROP_TAKES_LENGTH
from tests.kernel_cases import DTYPES, TOLERANCE, Shape, make_packed
from tests.tiny_models import (
    decode_within_budget,
    greedy_per_backend,
    make_tiny_model,
    random_prompts,
)

_WIDE = dict(head_dim=64, num_attention_heads=2, num_key_value_heads=1, hidden_size=128)

pytestmark = pytest.mark.usefixtures("nan_empty")


def test_storage_format_counts_codes_one_scale_and_the_codebooks():
    storage = SubTokenConfig(bits=2, num_groups=2, keep_groups=1, value_codes=16).storage_format(64, 4)
    assert storage.coded_values
    assert storage.slot_bytes == 32 // 4 * 4 // 8 + 2 + 1  # 8 four-bit indices, a scale, the group index
    assert storage.codebook_bytes(1) == 16 * 4 * 2
    wide = SubTokenConfig(bits=4, num_groups=1, value_codes=256, code_piece=8).storage_format(128, 2)
    assert wide.slot_bytes == 16 + 2 + 1 and wide.codebook_bytes(1) == 256 * 8 * 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("groups, keep", [(1, 1), (4, 2)], ids=["K1of1", "K2of4"])
def test_measured_bytes_match_the_storage_format(groups, keep, dtype):
    """Every token kept, no window: held bytes are the format's row bytes (codes, scales,
    group indices, key tables of the blocks held, codebooks) for each layer and sequence."""
    model = make_tiny_model("llama", dtype=dtype, **_WIDE)
    config = SubTokenConfig(
        num_groups=groups, keep_groups=keep, window=0, bits=2, value_codes=16,
        floor_tokens=0,  # packed from the first token (a 100-token context is under the default floor)
    )
    cache = SubTokenCache(model, config)
    tokens = 100
    with torch.no_grad():
        model(input_ids=random_prompts(2, tokens), past_key_values=cache)
    report = cache.memory_report()
    rows = cache.layers[0].row_layers()  # the batch is stored row by row
    assert len(rows) == 2
    for layer in rows:
        assert isinstance(layer.packed_values, CodedTensor) and layer.packed_values.shape[-2] == tokens
    blocks = 4 + -(-(tokens - 4) // 32)  # 4 sinks a block each, then 32-token blocks
    row = rows[0].storage.row_bytes(tokens, blocks, keep, scored=False)
    assert report["stored_bytes"] == 2 * 2 * row  # layers x batch
    assert report["parts"]["packed_values.codebook"] == 2 * 2 * keep * 16 * 4 * 2
    assert report["parts"]["packed_values.payload"] == 2 * 2 * keep * tokens * (64 // groups // 4) // 2


def _coded(kv, words: int = 16, piece: int = 4):
    """`kv` with its packed values as codeword indices, and the same with them dequantized."""
    coded = quantize_vectors(kv.values, words, piece)
    dtype = kv.tail_values.dtype
    return dataclasses.replace(kv, values=coded, backend="torch"), dataclasses.replace(
        kv, values=coded.dequantize(dtype), backend="torch"
    )


SHAPES = [
    Shape(stored=130, tail=9, head_dim=64, group=3, keep=3, groups=8),
    Shape(stored=40, tail=0, head_dim=128, group=2, keep=1, groups=1),  # empty tail, K = G = 1
    Shape(stored=33, tail=8, head_dim=64, group=5, keep=2, groups=4, kv_heads=3),
]


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES, ids=[s.id for s in SHAPES])
def test_reference_equals_attention_over_the_dequantized_values(shape, dtype, monkeypatch):
    monkeypatch.setattr(packed_attention_reference, "BLOCK_TOKENS", 16)  # every case crosses blocks
    query, kv, _, _ = make_packed(shape, dtype)
    coded, dequantized = _coded(kv)
    got = packed_attention(query, coded)
    want = packed_attention(query, dequantized)
    torch.testing.assert_close(got, want, **TOLERANCE[dtype])


triton_only = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
TRITON_SHAPES = [*SHAPES, Shape(stored=65, tail=64, head_dim=64, group=1, keep=8, groups=8, batch=1)]  # full window


@triton_only
@pytest.mark.parametrize("words, piece", [(16, 4), (256, 8), (4, 2)], ids=["W16-d4", "W256-d8", "W4-d2"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", TRITON_SHAPES, ids=[s.id for s in TRITON_SHAPES])
def test_triton_matches_the_reference(shape, dtype, words, piece):
    query, kv, _, _ = make_packed(shape, dtype, seed=12)
    coded, _ = _coded(kv, words, piece)
    got = packed_attention(query, coded, backend="triton")
    assert got.dtype == dtype and got.shape == query.shape
    want = packed_attention(query, coded)
    torch.testing.assert_close(got.float(), want.float(), **TOLERANCE[dtype])


def _framed(part: torch.Tensor) -> torch.Tensor:
    """`part` copied into the middle of a buffer poisoned with NaN (0xFF for bytes), strided."""
    fill = 255 if part.dtype == torch.uint8 else math.nan
    buffer = torch.full([n + 4 for n in part.shape], fill, dtype=part.dtype, device=part.device)
    return buffer[tuple(slice(2, 2 + n) for n in part.shape)].copy_(part)


@triton_only
def test_triton_reads_only_inside_the_codes_scales_and_codebook():
    query, kv, _, _ = make_packed(SHAPES[0], torch.float32, seed=13)
    coded, _ = _coded(kv)
    framed = dataclasses.replace(coded, values=coded.values.apply(_framed))
    assert not framed.values.codebook.is_contiguous()
    got = packed_attention(query, framed, backend="triton")
    assert got.isfinite().all()
    torch.testing.assert_close(got, packed_attention(query, coded), **TOLERANCE[torch.float32])


@triton_only
def test_greedy_tokens_match_whichever_path_reads_the_codes():
    model = make_tiny_model("llama", **_WIDE)
    config = SubTokenConfig(num_groups=2, keep_groups=1, window=4, bits=2, value_codes=16, floor_tokens=0)
    tokens = greedy_per_backend(model, config, random_prompts(2, 40), 16)
    assert torch.equal(tokens["torch"], tokens["triton"])


def test_the_prompts_codebook_codes_every_later_pack():
    """A small window packs a chunk every few steps: each is coded against the codebook fitted
    on the prompt (the same tensor), and generation runs to the end."""
    model = make_tiny_model("llama", **_WIDE)
    config = SubTokenConfig(num_groups=1, keep_groups=1, window=4, pack_chunk=2, bits=2, value_codes=16, floor_tokens=0)
    cache = SubTokenCache(model, config)
    prompt = random_prompts(1, 60)
    with torch.no_grad():
        model(input_ids=prompt[:, :-1], past_key_values=cache)  # generate feeds the last token
    codebooks = [layer.packed_values.codebook for layer in cache.layers]
    packed = cache.layers[0].packed_values.shape[-2]
    out = model.generate(prompt, past_key_values=cache, max_new_tokens=12, do_sample=False)
    assert out.shape[-1] == 72
    assert cache.layers[0].packed_values.shape[-2] > packed
    assert all(layer.packed_values.codebook is book for layer, book in zip(cache.layers, codebooks, strict=True))


@pytest.mark.parametrize("bits", [2, 4], ids=["int2-channel-keys", "int4-token-keys"])
def test_an_evicting_cache_with_coded_values_uses_its_budget_and_stays_within_it(bits):
    """The plan counts each row's codebooks once (keys per channel or per token alike): the
    cache holds at most its budget while decoding, and after the prompt most of it."""
    model = make_tiny_model("llama", **_WIDE)
    # the budget, not the short-context floor, sets the bytes of 300 tokens
    config = SubTokenConfig(num_groups=2, budget=0.07, window=8, bits=bits, value_codes=16, floor_tokens=0, recipe=None)
    cache = decode_within_budget(model, config, prompt_tokens=300)
    assert all(isinstance(row.packed_values, CodedTensor) for row in cache.layers[0].row_layers())
    fresh = SubTokenCache(model, config)
    with torch.no_grad():
        model(input_ids=random_prompts(2, 300), past_key_values=fresh)
    assert fresh.memory_report()["ratio"] > 0.9 * config.budget  # a token priced with a codebook each: 0.04


def test_a_codebook_larger_than_the_budget_keeps_no_tokens_and_holds_no_words():
    """256 words of 8 channels (4 kB per row) do not fit a 60-token row at 15%: the plan keeps
    no packed token, and the empty store's codebook takes no memory of its own."""
    model = make_tiny_model("llama", **_WIDE)
    config = SubTokenConfig(
        num_groups=1, budget=0.15, window=8, bits=4, value_codes=256, code_piece=8, floor_tokens=0, recipe=None
    )
    cache = SubTokenCache(model, config)
    with torch.no_grad():
        model(input_ids=random_prompts(1, 60), past_key_values=cache)
    report = cache.memory_report()
    assert cache.layers[0].packed_values.shape[-2] == 0
    assert report["ratio"] <= config.budget
    assert report["parts"].get("packed_values.codebook", 0) == 0  # an empty store holds no words


def test_codebooks_follow_their_sequences_when_the_batch_is_reordered_and_stay_when_a_crop_is_refused():
    """Each sequence is a row with its own codebook: reordering the batch reorders the rows,
    codebooks with them; coded values are lossy, so `crop` refuses and changes nothing."""
    model = make_tiny_model("llama", **_WIDE)
    config = SubTokenConfig(num_groups=1, keep_groups=1, window=0, bits=2, value_codes=16, floor_tokens=0)
    cache = SubTokenCache(model, config)
    with torch.no_grad():
        model(input_ids=random_prompts(2, 50), past_key_values=cache)
    layer = cache.layers[0]
    before = [row.packed_values for row in layer.row_layers()]
    assert not torch.equal(before[0].codebook, before[1].codebook)  # each sequence its own
    cache.reorder_cache(torch.tensor([1, 0]))
    for row, source in zip(layer.row_layers(), reversed(before), strict=True):
        assert torch.equal(row.packed_values.codebook, source.codebook)
        assert torch.equal(row.packed_values.dequantize(torch.float32), source.dequantize(torch.float32))
    with pytest.raises(ValueError, match="cannot roll back"):
        cache.crop(30 if _CROP_TAKES_LENGTH else 30 - 50)
    assert cache.get_seq_length() == 50
    for row, source in zip(layer.row_layers(), reversed(before), strict=True):
        assert row.packed_values.shape[-2] == 50
        assert torch.equal(row.packed_values.codebook, source.codebook)


def test_beam_search_runs_with_coded_values():
    model = make_tiny_model("llama", **_WIDE)
    config = SubTokenConfig(num_groups=1, keep_groups=1, window=4, bits=2, value_codes=16, floor_tokens=0)
    out = model.generate(
        random_prompts(1, 40), past_key_values=SubTokenCache(model, config), max_new_tokens=6, num_beams=2, do_sample=False
    )
    assert out.shape == (1, 46)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"value_codes": 1, "bits": 2}, "value_codes must be in 2..256"),
        ({"value_codes": 300, "bits": 2}, "value_codes must be in 2..256"),
        ({"value_codes": 16}, "value_codes needs bits="),
        ({"value_codes": 16, "bits": "auto", "budget": 0.2}, "value_codes needs bits="),
        ({"value_codes": 16, "bits": 2, "budget": 0.2, "span": "adaptive"}, "span='fixed' and head_budgets='uniform'"),
        ({"value_codes": 16, "bits": 2, "budget": 0.2, "head_budgets": "adaptive"}, "span='fixed' and head_budgets='uniform'"),
        ({"value_codes": 16, "bits": 2, "code_piece": 0}, "code_piece must be >= 1"),
    ],
    ids=["one-word", "too-many-words", "no-bits", "auto-bits", "adaptive-span", "adaptive-heads", "zero-piece"],
)
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        SubTokenConfig(**settings)


@pytest.mark.parametrize("piece, words", [(3, 16), (8, 16)], ids=["piece-not-dividing", "codes-not-whole-bytes"])
def test_pieces_that_do_not_fit_a_value_group_are_refused(piece, words):
    config = SubTokenConfig(num_groups=8, keep_groups=4, bits=2, value_codes=words, code_piece=piece)
    with pytest.raises(ValueError, match=f"code_piece={piece}"):
        config.storage_format(64, 4)


def test_with_key_tables_each_token_is_priced_without_the_rows_codebooks():
    """Keys per channel: what fits a row is its tables and codebooks once, then whole tokens."""
    model = make_tiny_model("llama", **_WIDE)
    cache = SubTokenCache(model, SubTokenConfig(num_groups=2, budget=0.15, window=8, bits=2, value_codes=16, recipe=None))
    with torch.no_grad():
        model(input_ids=random_prompts(1, 100), past_key_values=cache)
    layer, blocks, runs = cache.layers[0], 6, 9
    storage, keep = layer.storage, layer.keep_groups
    fixed = storage.row_bytes(0, blocks, keep, scored=True, key_runs=runs)
    token = storage.row_bytes(1, 0, keep, scored=True) - storage.row_bytes(0, 0, keep, scored=True)
    assert storage.codebook_bytes(keep) > 0 and fixed > storage.codebook_bytes(keep) + blocks * storage.key_block_bytes
    assert tokens_within(storage, keep, fixed + 10.5 * token, 1000, (blocks, runs, 0)) == 10


def test_the_token_count_a_row_can_hold_leaves_room_for_its_codebooks():
    """Keys per token (no key tables): what fits a row's bytes is its codebooks, then whole
    tokens."""
    model = make_tiny_model("llama", **_WIDE)
    cache = SubTokenCache(model, SubTokenConfig(num_groups=2, budget=0.15, window=8, bits=4, value_codes=16, recipe=None))
    with torch.no_grad():
        model(input_ids=random_prompts(1, 100), past_key_values=cache)
    layer = cache.layers[0]
    token = layer.storage.token_bytes(layer.keep_groups, scored=True)
    books = layer.storage.codebook_bytes(layer.keep_groups)
    assert books > 0
    assert tokens_within(layer.storage, layer.keep_groups, books + 10.5 * token, 1000, (0, 0, 0)) == 10
    assert layer.storage.row_bytes(10, 0, layer.keep_groups, scored=True) <= books + 10.5 * token


@triton_only
def test_a_codebook_strided_in_its_last_dim_is_refused_before_launch():
    query, kv, _, _ = make_packed(SHAPES[0], torch.float32, seed=14)
    coded, _ = _coded(kv)
    book = coded.values.codebook
    strided = book.transpose(-1, -2).contiguous().transpose(-1, -2)  # same words, last dim strided
    bad = dataclasses.replace(coded, values=CodedTensor(coded.values.payload, coded.values.scale, strided, 4))
    with pytest.raises(ValueError, match="kv.values.codebook must be contiguous in its last dim"):
        packed_attention(query, bad, backend="triton")
    torch.testing.assert_close(packed_attention(query, bad), packed_attention(query, coded))  # the reference reads it


def test_coded_groups_narrower_than_a_scalar_quantization_group_are_accepted():
    """2-channel groups in 2-channel pieces with 8-bit codes fill whole bytes, though 2 channels
    at 2 bits would not."""
    storage = SubTokenConfig(num_groups=32, keep_groups=16, bits=2, value_codes=256, code_piece=2).storage_format(64, 4)
    assert storage.coded_values and storage.slot_bytes == 1 + 2 + 1


def test_long_prompts_are_coded_a_chunk_at_a_time(monkeypatch):
    """Codes computed over chunks of pieces equal those computed at once."""
    from hf_subtok.quant import codebook

    x = torch.randn(1, 2, 300, 16, generator=torch.Generator().manual_seed(15))
    whole = quantize_vectors(x, 16, 4)
    monkeypatch.setattr(codebook, "CODE_CHUNK", 7)
    chunked = quantize_vectors(x, 16, 4, codebook=whole.codebook)
    assert torch.equal(chunked.payload, whole.payload)
