"""Value quantization over the range of least squared error (`quantize(clip=True)`).

The clipped round trip never has more squared error per group than the min/max one, keeps
every element inside its chosen range within half a step, clamps the others to the range's
ends, and at 2 bits clearly beats min/max on values with outliers. The cache clips value
groups where `value_clip` says (auto: at 2 bits), per-channel keys only with `key_clip`, and
costs no byte more.
"""

from __future__ import annotations

import pytest
import torch

from hf_subtok import SubTokenCache, SubTokenConfig
from hf_subtok.quant import quantize
from hf_subtok.quant.reference import CLIP_SHRINKS
from tests.kernel_cases import DTYPES
from tests.tiny_models import make_tiny_model, random_prompts


def _heavy_tailed(*shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=generator)
    return x * torch.rand(*shape, generator=generator).pow(4).mul(8).add(1)  # a few large entries


def _group_error(x, q, group_size):
    restored = q.dequantize(torch.float32)
    return (restored - x.float()).square().reshape(*x.shape[:-1], -1, group_size).sum(-1)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_clipped_error_never_exceeds_min_max(bits, dtype):
    x = _heavy_tailed(3, 5, 7, 64).to(dtype)
    plain, clipped = quantize(x, bits, 32), quantize(x, bits, 32, clip=True)
    assert clipped.shape == x.shape and clipped.nbytes == plain.nbytes
    assert (_group_error(x, clipped, 32) <= _group_error(x, plain, 32) * (1 + 1e-6) + 1e-9).all()


def test_clipping_helps_at_two_bits_and_clamps_only_outside_the_range():
    x = _heavy_tailed(4, 6, 200, 32, seed=1)
    plain, clipped = quantize(x, 2, 32), quantize(x, 2, 32, clip=True)
    assert _group_error(x, clipped, 32).sum() < 0.8 * _group_error(x, plain, 32).sum()
    scale, zero = clipped.scale.float(), clipped.zero.float()  # [..., 1]
    top = zero + 3 * scale
    restored = clipped.dequantize(torch.float32)
    inside = (x >= zero) & (x <= top)
    error = (restored - x).abs()
    assert (error[inside] <= (scale / 2).expand_as(x)[inside] * (1 + 1e-5) + 1e-6).all()
    assert torch.allclose(restored[x > top], top.expand_as(x)[x > top], atol=1e-5)
    assert torch.allclose(restored[x < zero], zero.expand_as(x)[x < zero], atol=1e-5)
    assert (~inside).any(), "some outliers should have been clamped"


def test_a_group_on_the_min_max_grid_keeps_its_range():
    x = torch.tensor([-1.0, -0.5, 0.0, 0.5]).repeat(8).view(1, 32)  # exact on the min/max grid
    plain, clipped = quantize(x, 2, 32), quantize(x, 2, 32, clip=True)
    assert torch.equal(clipped.scale, plain.scale) and torch.equal(clipped.zero, plain.zero)
    assert torch.equal(clipped.dequantize(torch.float32), x)
    assert CLIP_SHRINKS[0] == 1.0


def _candidate_errors(x, bits, group_size, scale_dtype):
    """`[..., N/gs, len(CLIP_SHRINKS)]` true squared round-trip error of every range the search
    tries (min/max shrunk around the middle), each quantized and dequantized on its own grid."""
    grouped = x.float().reshape(*x.shape[:-1], -1, group_size)
    low, high = grouped.amin(-1, keepdim=True), grouped.amax(-1, keepdim=True)
    middle, half = (low + high) / 2, (high - low) / 2
    errors = []
    for shrink in CLIP_SHRINKS:
        clamped = torch.minimum(torch.maximum(grouped, middle - shrink * half), middle + shrink * half)
        ranged = quantize(clamped.reshape(x.shape), bits, group_size, scale_dtype)  # min/max of the range
        # the unclamped x on that range's grid (its scale and zero)
        scale, zero = ranged.scale.float().unsqueeze(-1), ranged.zero.float().unsqueeze(-1)
        codes = ((grouped - zero) / torch.where(scale == 0, 1.0, scale)).round().clamp(0, (1 << bits) - 1)
        errors.append((codes * scale + zero - grouped).square().sum(-1))
    return torch.stack(errors, -1)


@pytest.mark.parametrize("bits", [2, 4])
def test_clip_search_picks_the_least_error_range(bits):
    """The chosen range's true error is the least of every candidate's (up to float rounding):
    scoring the candidates in code units instead of value units would fail this."""
    x = _heavy_tailed(6, 40, 64, seed=bits)
    clipped = quantize(x, bits, 32, clip=True)
    best = _candidate_errors(x, bits, 32, torch.float16).amin(-1)
    torch.testing.assert_close(_group_error(x, clipped, 32), best, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16], ids=["fp32-scales", "bf16-scales"])
def test_a_group_one_ulp_wide_keeps_its_exact_grid(scale_dtype):
    """Shrinking a range one float32 ulp wide collapses it to scale 0; the search must not
    take that (the min/max grid is exact here)."""
    a = torch.tensor(5.149428844451904)
    x = torch.stack([a, torch.nextafter(a, torch.tensor(10.0))] * 16).view(1, 32)
    plain, clipped = quantize(x, 4, 32, scale_dtype=scale_dtype), quantize(x, 4, 32, scale_dtype=scale_dtype, clip=True)
    assert float(clipped.scale) != 0.0
    assert (_group_error(x, clipped, 32) <= _group_error(x, plain, 32)).all()


@pytest.mark.parametrize(
    "value_clip, bits, clips",
    [("auto", 2, True), ("auto", 4, False), ("on", 4, True), ("off", 2, False), ("on", None, False)],
)
def test_value_clip_setting(value_clip, bits, clips):
    config = SubTokenConfig(budget=0.2, num_groups=2, bits=bits, value_clip=value_clip, recipe=None)
    assert config.storage_format(64, 4).clip_values is clips


def test_cache_clips_values_not_keys_at_two_bits_by_default():
    model = make_tiny_model("qwen2")
    ids = random_prompts(1, 300)
    caches = {}
    for value_clip in ("off", "auto"):
        caches[value_clip] = SubTokenCache(model, SubTokenConfig(budget=0.2, num_groups=2, window=16, bits=2, value_clip=value_clip, recipe=None))
        with torch.no_grad():
            model(input_ids=ids, past_key_values=caches[value_clip])
    plain, clipped = caches["off"].layers[0], caches["auto"].layers[0]
    assert torch.equal(clipped.packed_keys.payload, plain.packed_keys.payload), "keys are never clipped"
    assert not torch.equal(clipped.packed_values.scale, plain.packed_values.scale)
    assert caches["auto"].memory_report()["stored_bytes"] == caches["off"].memory_report()["stored_bytes"]


def test_bad_value_clip_is_refused():
    with pytest.raises(ValueError, match="value_clip must be one of"):
        SubTokenConfig(value_clip="mse")


@pytest.mark.parametrize(
    "settings, clips",
    [({"bits": 2}, False), ({"bits": 2, "key_clip": True}, True), ({"bits": 4, "key_quantization": "channel", "key_clip": True}, True)],
    ids=["int2-default", "int2-key_clip", "int4-channel-key_clip"],
)
def test_key_clip_setting(settings, clips):
    storage = SubTokenConfig(num_groups=2, **settings).storage_format(64, 4)
    assert storage.channel_keys and storage.clip_keys is clips


def test_cache_with_key_clip_narrows_key_ranges_at_the_same_bytes():
    """Every token and group kept (the same layout either way): with `key_clip` the packed
    keys' per-channel ranges are never wider than min/max (sink blocks alike), narrower in some
    (channel, block), and the cache holds exactly as many bytes."""
    model = make_tiny_model("qwen2")
    ids = random_prompts(1, 300)
    caches = {}
    for key_clip in (False, True):
        config = SubTokenConfig(num_groups=2, keep_groups=2, window=16, bits=2, key_block=64, key_clip=key_clip)
        caches[key_clip] = SubTokenCache(model, config)
        with torch.no_grad():
            model(input_ids=ids, past_key_values=caches[key_clip])
    plain, clipped = caches[False].layers[0].packed_keys, caches[True].layers[0].packed_keys
    assert clipped.scale.shape == plain.scale.shape
    assert (clipped.scale <= plain.scale).all() and (clipped.scale < plain.scale).any()
    assert torch.equal(clipped.run_block, plain.run_block) and torch.equal(clipped.run_length, plain.run_length)
    assert caches[True].memory_report()["stored_bytes"] == caches[False].memory_report()["stored_bytes"]


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"key_clip": "on", "bits": 2}, "key_clip must be True or False"),
        ({"key_clip": True}, "key_clip=True needs keys quantized per channel"),
        ({"key_clip": True, "bits": 2, "key_quantization": "token"}, "key_clip=True needs keys quantized per channel"),
        ({"key_clip": True, "bits": 4}, "key_clip=True needs keys quantized per channel"),
    ],
    ids=["not-a-bool", "no-bits", "token-keys", "int4-auto-is-per-token"],
)
def test_bad_key_clip_is_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        SubTokenConfig(**settings)
