"""Vector-quantized storage (`quant.codebook`): each piece coded by its nearest codeword,
codewords recovered exactly, k-means finding clusters, tokens moved with their codebook kept,
bytes counted with the codebook, errors."""

from __future__ import annotations

import pytest
import torch

from hf_subtok.quant import CodedTensor, quantize_vectors
from hf_subtok.quant.codebook import FIT_POINTS, code_bits, fit_codebook, nearest_words
from tests.kernel_cases import DEVICE, DTYPES

# (values shape [..., T, N], words, piece)
CASES = {
    "B2-Hkv3-T37-N64-W16-d4": ((2, 3, 37, 64), 16, 4),
    "B1-Hkv2-T5-N128-W256-d8": ((1, 2, 5, 128), 256, 8),
    "B1-Hkv1-T9-N16-W4-d2": ((1, 1, 9, 16), 4, 2),
    "B1-Hkv2-K3-T20-N32-W32-d4": ((1, 2, 3, 20, 32), 32, 4),
    "single-token-N64-W16-d4": ((1, 1, 1, 64), 16, 4),
}


def _values(shape, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    norms = torch.rand(*shape[:-1], 1, generator=generator).mul(3).exp()  # tokens of very different sizes
    return (torch.randn(*shape, generator=generator) * norms).to(dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("words, bits", [(2, 2), (4, 2), (5, 4), (16, 4), (17, 8), (256, 8)])
def test_codes_take_the_narrowest_packable_width(words, bits):
    assert code_bits(words) == bits


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_every_piece_is_coded_by_its_nearest_codeword(case, dtype):
    shape, words, piece = CASES[case]
    x = _values(shape, dtype)
    q = quantize_vectors(x, words, piece)
    *lead, tokens, channels = shape
    bits = code_bits(words)
    assert q.shape == x.shape and q.bits == bits and q.piece == piece
    assert q.payload.shape == (*lead, tokens, channels // piece * bits // 8)
    assert q.scale.shape == (*lead, tokens, 1) and q.codebook.shape == (*lead, words, piece)
    scale, codebook = q.scale.float(), q.codebook.float()
    pieces = (x.float() / scale).reshape(*lead, tokens * channels // piece, 1, piece)
    distances = (pieces - codebook.unsqueeze(-3)).square().sum(-1)  # [..., T*P, W]
    chosen = distances.gather(-1, q.codes().reshape(*lead, -1, 1)).squeeze(-1)
    assert (chosen <= distances.amin(-1) * (1 + 1e-4) + 1e-5).all()
    expected = codebook.gather(-2, q.codes().reshape(*lead, -1, 1).expand(*lead, tokens * channels // piece, piece))
    expected = expected.reshape(*lead, tokens, channels) * scale
    assert torch.allclose(q.dequantize(torch.float32), expected, atol=1e-6, rtol=1e-6)
    assert q.dequantize(dtype).dtype == dtype


def test_tokens_made_of_codewords_come_back_exactly():
    """Words of unit RMS, tokens concatenations of them at any scale: every code is recovered
    and the round trip is exact up to the float32 scale."""
    generator = torch.Generator().manual_seed(1)
    words = torch.randn(2, 16, 4, generator=generator)
    words = words / words.square().mean(-1, keepdim=True).sqrt()  # each word unit RMS
    codes = torch.randint(16, (2, 30, 8), generator=generator)  # [Hkv, T, P]
    tokens = torch.stack([words[h][codes[h]] for h in range(2)]).reshape(2, 30, 32)
    x = tokens * torch.rand(2, 30, 1, generator=generator).add(0.1).mul(5)
    q = quantize_vectors(x, 16, 4, codebook=words, scale_dtype=torch.float32)
    assert torch.equal(q.codes(), codes)
    assert torch.allclose(q.dequantize(torch.float32), x, atol=1e-5, rtol=1e-5)


def test_kmeans_finds_separated_clusters_deterministically():
    generator = torch.Generator().manual_seed(5)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = (centres.repeat_interleave(20, 0) + 0.1 * torch.randn(60, 2, generator=generator)).unsqueeze(0)
    centroids = fit_codebook(points, 3)
    found = sorted(tuple(round(float(v)) for v in c) for c in centroids[0])
    assert found == sorted(tuple(round(float(v)) for v in c) for c in centres)
    clusters = [set(row.tolist()) for row in nearest_words(points, centroids)[0].view(3, 20)]
    assert all(len(c) == 1 for c in clusters) and len(set.union(*clusters)) == 3
    assert torch.equal(fit_codebook(points, 3), centroids)


def test_more_words_than_points_and_repeated_points_are_fitted():
    points = torch.ones(1, 3, 4)
    assert torch.equal(fit_codebook(points, 16), torch.ones(1, 16, 4))


def test_zero_tokens_keep_a_zero_scale_and_come_back_as_zeros():
    x = _values((1, 2, 6, 16), torch.float32)
    x[:, :, 2] = 0
    q = quantize_vectors(x, 4, 4)
    assert (q.scale[:, :, 2] == 0).all()
    assert (q.dequantize(torch.float32)[:, :, 2] == 0).all()


def test_later_tokens_are_coded_against_a_given_codebook_and_cat_with_the_first():
    x = _values((2, 3, 40, 64), torch.float32)
    prompt = quantize_vectors(x[..., :32, :], 16, 4)
    later = quantize_vectors(x[..., 32:, :], 16, 4, codebook=prompt.codebook)
    assert later.codebook is prompt.codebook
    joined = CodedTensor.cat([prompt, later])
    assert joined.shape == x.shape and joined.codebook is prompt.codebook
    assert torch.equal(joined.dequantize(torch.float32)[..., 32:, :], later.dequantize(torch.float32))
    empty = quantize_vectors(x[..., :0, :], 16, 4, codebook=prompt.codebook)
    assert empty.shape == (2, 3, 0, 64)
    other = quantize_vectors(x[..., 32:, :], 16, 4)
    with pytest.raises(ValueError, match="another codebook"):
        CodedTensor.cat([prompt, other])
    nothing = quantize_vectors(x[..., :0, :], 16, 4)  # an empty store: zero codebook, left out by cat
    assert (nothing.codebook == 0).all()
    started = CodedTensor.cat([nothing, prompt, later])
    assert started.codebook is prompt.codebook and started.shape == x.shape
    with pytest.raises(ValueError, match=r"n >= 1"):
        fit_codebook(torch.zeros(2, 0, 4), 16)


def test_take_slice_and_apply_move_tokens_and_keep_each_rows_codebook():
    x = _values((2, 3, 12, 32), torch.float32)
    q = quantize_vectors(x, 16, 4)
    full = q.dequantize(torch.float32)
    index = torch.tensor([[5, 0, 11], [2, 2, 7], [9, 1, 3]]).expand(2, 3, 3)
    taken = q.take(index)
    assert torch.equal(taken.dequantize(torch.float32), torch.take_along_dim(full, index.unsqueeze(-1), dim=-2))
    assert torch.equal(q.slice_tokens(3, 8).dequantize(torch.float32), full[..., 3:8, :])
    flipped = q.apply(lambda t: t.flip(0))  # a batch reorder
    assert torch.equal(flipped.dequantize(torch.float32), full.flip(0))


def test_bytes_count_codes_scales_and_codebook():
    q = quantize_vectors(_values((1, 3, 100, 64), torch.float32), 16, 4)
    assert q.nbytes == 3 * 100 * 8 + 3 * 100 * 2 + 3 * 16 * 4 * 2  # 4-bit codes, float16 scales and words


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda x: quantize_vectors(x, 1, 4), "words must be an int in 2..256"),
        (lambda x: quantize_vectors(x, 257, 4), "words must be an int in 2..256"),
        (lambda x: quantize_vectors(x, True, 4), "words must be an int in 2..256"),
        (lambda x: quantize_vectors(x, 16, 3), "piece must be a positive int dividing"),
        (lambda x: quantize_vectors(x[..., :8], 4, 4), "do not fill whole bytes"),
        (lambda x: quantize_vectors(x.long(), 16, 4), "floating point tensor"),
        (lambda x: quantize_vectors(x, 16, 4, codebook=torch.zeros(1, 2, 8, 4)), "codebook must be"),
        (lambda x: quantize_vectors(x, 16, 4, scale_dtype=torch.int8), "scale_dtype must be one of"),
    ],
    ids=["one-word", "too-many-words", "bool-words", "piece-not-dividing", "partial-byte", "int-input",
         "codebook-shape", "scale-dtype"],
)
def test_bad_arguments_raise_value_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call(_values((1, 2, 10, 32), torch.float32))


def test_mismatched_components_are_refused():
    q = quantize_vectors(_values((1, 2, 10, 32), torch.float32), 16, 4)
    with pytest.raises(ValueError, match="stored in 4 bits, got bits=8"):
        CodedTensor(q.payload, q.scale, q.codebook, 8)
    with pytest.raises(ValueError, match="scale must be"):
        CodedTensor(q.payload, q.scale[..., :5, :], q.codebook, 4)
    with pytest.raises(ValueError, match="scale its dtype or torch.uint8"):
        CodedTensor(q.payload, q.scale.float(), q.codebook, 4)


def test_kmeans_on_more_points_than_it_fits_on_still_finds_the_clusters():
    generator = torch.Generator().manual_seed(6)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    count = FIT_POINTS  # three times as many points as the fit uses
    points = (centres.repeat_interleave(count, 0) + 0.1 * torch.randn(3 * count, 2, generator=generator)).unsqueeze(0)
    found = sorted(tuple(round(float(v)) for v in c) for c in fit_codebook(points, 3)[0])
    assert found == sorted(tuple(round(float(v)) for v in c) for c in centres)
