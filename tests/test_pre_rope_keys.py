"""Keys stored before RoPE, in their own channels or calibrated bases (`key_space`, `key_bases`, issue 22).

Oracles: the model's own RoPE (`apply_rotary_pos_emb`), the dense keys a `DynamicCache` holds
for the same prompt, attention over the dequantized keys, each prompt of a batch run alone, and
an independent walk of the tensors the cache holds.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from hf_subtok import SubTokenCache
from hf_subtok.generate_args import cache_kwargs
from hf_subtok.kernels import packed_attention
from hf_subtok.quant.positions import PositionRuns
from hf_subtok.quant.pre_rope_keys import KeyBasis, PreRopeKeys
from hf_subtok.rank import RankBases
from hf_subtok.scorers import RopeInfo
from tests.benchmark_scripts import load_benchmark
from tests.rank_cases import random_model_bases
from tests.test_bytes_held import model_storages, walk
from tests.tiny_models import make_tiny_model

BITS8 = dict(bits=8, key_quantization="channel", window=16, pack_chunk=8, recipe=None)
PRE = dict(BITS8, key_space="pre_rope")


@pytest.fixture(scope="module")
def model():
    return make_tiny_model("llama")


def _save_bases(model, folder, key_space: str = "pre_rope", seed: int = 0) -> str:
    """Random orthonormal bases (and means) for `model`, saved to `folder`."""
    random_model_bases(model, seed, key_space).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def bases(model, tmp_path_factory):
    return _save_bases(model, tmp_path_factory.mktemp("bases"))


def _prompt(tokens: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    return torch.randint(3, 256, (batch, tokens), generator=torch.Generator().manual_seed(seed))


def _dense_keys(model, ids: torch.Tensor) -> list[torch.Tensor]:
    cache = DynamicCache()
    with torch.no_grad():
        model(ids, **cache_kwargs(cache))
    return [layer.keys for layer in cache.layers]


def test_position_runs_hold_any_positions():
    positions = torch.tensor([[[0, 1, 2, 5, 6, 9, 3, 4], [7, 8, 9, 10, 11, 12, 13, 14]]])  # [1, 2, 8]
    runs = PositionRuns.of(positions)
    assert torch.equal(runs.expand(8), positions)
    assert runs.start.shape[-1] == 4  # the first row's runs: 0-2, 5-6, 9, 3-4 (the second has one, padded)
    index = torch.tensor([[[1, 3, 7], [0, 5, 6]]])
    assert torch.equal(runs.take(index, 8).expand(3), torch.take_along_dim(positions, index, -1))
    assert torch.equal(runs.token_prefix(4).expand(4), positions[..., :4])
    joined = PositionRuns.cat([PositionRuns.span(0, 3, (1, 2)), PositionRuns.span(3, 2, (1, 2))])
    assert torch.equal(joined.expand(5)[0, 0], torch.arange(5))
    assert PositionRuns.of(joined.expand(5)).start.shape[-1] == 1  # continuing runs merge when read again


def test_coefficients_undo_the_models_rope(model):
    """`KeyBasis` turns keys rotated by the model's own RoPE back into their basis coefficients,
    and its keys are the model's rotated keys again."""
    rotary = model.model.rotary_emb
    dim, heads, tokens = 16, 2, 40
    generator = torch.Generator().manual_seed(1)
    basis = torch.linalg.qr(torch.randn(heads, dim, dim, generator=generator))[0]
    mean = torch.randn(heads, dim, generator=generator)
    key_basis = KeyBasis(basis, mean, RopeInfo.from_model(model).frequencies(), 1.0)
    before = torch.randn(1, heads, tokens, dim, generator=generator)
    positions = torch.arange(100, 100 + tokens).unsqueeze(0)  # [1, T]
    cos, sin = rotary(before, positions)
    _, after = apply_rotary_pos_emb(before, before, cos, sin)
    per_head = positions.expand(heads, -1).unsqueeze(0)  # [1, Hkv, T]
    coefficients = key_basis.coefficients(after, per_head)
    torch.testing.assert_close(coefficients, (before - mean.unsqueeze(1)) @ basis, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(key_basis.keys(coefficients, per_head), after, atol=1e-4, rtol=1e-4)


@pytest.fixture(params=["own channels", "calibrated"])
def key_bases(request, bases):
    """Keys stored before RoPE in their own channels (None) or in calibrated bases (a folder)."""
    return bases if request.param == "calibrated" else None


@pytest.mark.parametrize("budget", [None, 0.35])
def test_held_keys_are_the_dense_keys_at_their_positions(model, key_bases, budget):
    """Every packed key, rebuilt, is the dense key of the token at the position it holds (8-bit
    codes: within 2%), and the positions are the tokens each head kept, ascending."""
    ids = _prompt(300)
    dense = _dense_keys(model, ids)
    cache = SubTokenCache(model, key_bases=key_bases, budget=budget, **PRE)
    with torch.no_grad():
        model(ids, **cache_kwargs(cache))
    for layer, reference in zip(cache.layers, dense, strict=True):
        held = layer.packed_keys
        assert isinstance(held, PreRopeKeys)
        positions = held.token_positions()  # [1, Hkv, Ts]
        assert (positions.diff(dim=-1) > 0).all()
        expected = torch.take_along_dim(reference, positions.unsqueeze(-1), dim=2)  # [1, Hkv, Ts, D]
        error = (held.dequantize(torch.float32) - expected).norm() / expected.norm()
        assert error < 0.02
        if budget is not None:
            assert held.shape[-2] < 300 - layer.window_keys.shape[-2]  # tokens were evicted


def test_attention_equals_attention_over_the_rebuilt_keys(model, key_bases):
    """The packed path (keys rebuilt a block at a time) gives what dense attention over the
    dequantized keys and values gives."""
    ids = _prompt(300, seed=2)
    cache = SubTokenCache(model, key_bases=key_bases, num_groups=2, keep_groups=2, **PRE)  # every group kept
    with torch.no_grad():
        model(ids, **cache_kwargs(cache))
    layer = cache.layers[1]
    view = layer._view(layer.window_keys, layer.window_values)
    query = torch.randn(1, 4, 1, 16, generator=torch.Generator().manual_seed(3))
    out = packed_attention(query, view)
    keys = torch.cat([layer.packed_keys.dequantize(torch.float32), layer.window_keys], dim=-2)
    values = torch.cat([_dense_values(layer), layer.window_values], dim=-2)
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, keys.repeat_interleave(2, dim=1), values.repeat_interleave(2, dim=1)
    )
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def _dense_values(layer) -> torch.Tensor:
    """`[B, Hkv, Ts, D]` packed values with every group kept (slot k holds group k)."""
    values = layer.packed_values.dequantize(torch.float32)  # [B, Hkv, G, Ts, C]
    return values.permute(0, 1, 3, 2, 4).flatten(3)


def test_decoded_keys_join_at_their_positions(model, key_bases):
    """Keys packed while decoding (into the open block of coefficients, `extend_channels`) hold
    every position once, in order, and rebuild to the dense keys of those positions as closely
    as 8-bit keys stored after RoPE do."""
    ids = _prompt(300, seed=4)
    steps = torch.randint(3, 256, (1, 40), generator=torch.Generator().manual_seed(8))
    dense = _dense_keys(model, torch.cat([ids, steps], dim=-1))
    errors = {}
    for space in ("pre_rope", "post_rope"):
        cache = SubTokenCache(model, **dict(BITS8, key_space=space, key_bases=key_bases if space == "pre_rope" else None))
        with torch.no_grad():
            model(ids, **cache_kwargs(cache))
            for t in range(steps.shape[-1]):
                model(steps[:, t : t + 1], **cache_kwargs(cache))
        worst = []
        for layer, reference in zip(cache.layers, dense, strict=True):
            held = layer.packed_keys.dequantize(torch.float32)  # [1, Hkv, Ts, D]
            if space == "pre_rope":
                assert torch.equal(layer.packed_keys.token_positions()[0, 0], torch.arange(held.shape[-2]))
            expected = reference[..., : held.shape[-2], :]
            worst.append(((held - expected).norm(dim=-1) / expected.norm(dim=-1)).max().item())
        errors[space] = max(worst)
    assert errors["pre_rope"] < 0.1 and errors["pre_rope"] < 2 * errors["post_rope"], errors


def test_padded_batch_answers_as_each_prompt_alone(model, key_bases):
    prompts = [_prompt(260, seed=5)[0], _prompt(300, seed=6)[0]]
    alone = []
    for prompt in prompts:
        cache = SubTokenCache(model, key_bases=key_bases, budget=0.4, **PRE)
        alone.append(model.generate(prompt[None], max_new_tokens=10, do_sample=False, **cache_kwargs(cache))[0, -10:])
    ids = torch.zeros(2, 300, dtype=torch.long)
    mask = torch.zeros(2, 300, dtype=torch.long)
    for r, prompt in enumerate(prompts):
        ids[r, 300 - len(prompt):], mask[r, 300 - len(prompt):] = prompt, 1
    cache = SubTokenCache(model, key_bases=key_bases, budget=0.4, **PRE)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, **cache_kwargs(cache))
    for r in range(2):
        assert torch.equal(out[r, -10:], alone[r])


def test_memory_report_counts_bases_and_positions(model, key_bases):
    """The report equals an independent walk of what the cache holds, bases, frequencies and
    position runs included, and stays within the budget while decoding."""
    ids = _prompt(400, seed=7)
    cache = SubTokenCache(model, key_bases=key_bases, budget=0.45, **PRE)
    with torch.no_grad():
        out = model(ids, **cache_kwargs(cache))
        for _ in range(20):
            out = model(out.logits[:, -1:].argmax(-1), **cache_kwargs(cache))
            report = cache.memory_report()
            assert report["ratio"] <= 0.45 * 1.01
    held = walk(cache)
    assert held.bytes(exclude=model_storages(model)) == report["stored_bytes"]
    parts = report["parts"]
    assert any("key_basis.basis" in name for name in parts) == (key_bases is not None)
    assert any("key_basis.inv_freq" in name for name in parts)
    assert any("positions.start" in name for name in parts)


def test_bases_of_another_kind_or_model_are_refused(model, tmp_path):
    post = _save_bases(model, tmp_path / "post", key_space="post_rope")
    with pytest.raises(ValueError, match="were calibrated with key_space='post_rope'"):
        SubTokenCache(model, key_bases=post, **PRE)
    other = make_tiny_model("llama", seed=1)
    with pytest.raises(ValueError, match="do not fit this model"):
        SubTokenCache(other, key_bases=_save_bases(model, tmp_path / "pre"), **PRE)
    with pytest.raises(ValueError, match="needs key_space='pre_rope'"):
        SubTokenCache(model, key_bases=post, **BITS8)
    with pytest.raises(ValueError, match="head_budgets"):
        SubTokenCache(model, head_budgets="adaptive", budget=0.3, **PRE)
    with pytest.raises(ValueError, match="key_bases must be"):
        SubTokenCache(model, key_bases="", **PRE)
    with pytest.raises(ValueError, match="key_space must be one of"):
        SubTokenCache(model, **dict(PRE, key_space="before"))


def test_variants_script_writes_orthonormal_bases_that_load(model, bases, monkeypatch, tmp_path):
    """`benchmarks/key_bases_variants.py` writes, beside the calibrated bases, artifacts whose key
    bases are orthonormal (rebuilt keys are the dense keys) and which a cache loads."""
    script = load_benchmark("key_bases_variants")
    source = _save_bases(model, tmp_path / "calibrated")
    monkeypatch.setattr("sys.argv", ["key_bases_variants.py", source])
    script.main()
    for name in ("identity", "hadamard", "pca-hadamard", "pca-uncentred"):
        loaded = RankBases.from_pretrained(str(tmp_path / f"calibrated-{name}"))
        basis = loaded.tensors["key_basis"]  # [L, Hkv, D, D]
        torch.testing.assert_close(basis.transpose(-1, -2) @ basis, torch.eye(16).expand_as(basis), atol=1e-5, rtol=0)
        SubTokenCache(model, key_bases=str(tmp_path / f"calibrated-{name}"), **PRE)
    identity = RankBases.from_pretrained(str(tmp_path / "calibrated-identity")).tensors
    assert torch.equal(identity["key_mean"], torch.zeros_like(identity["key_mean"]))


def test_a_plan_that_weighs_precisions_measures_keys_in_their_bases(model, bases):
    """With `bits='auto'` the plan's fidelity trial stores keys as each format would, in the
    bases for per-channel formats; the cache stays within its budget and holds per-channel keys
    in the bases."""
    ids = _prompt(400, seed=9)
    cache = SubTokenCache(
        model, key_bases=bases, budget=0.2, bits="auto", key_quantization="channel", window=16, pack_chunk=8, recipe=None,
        key_space="pre_rope",
    )
    with torch.no_grad():
        model(ids, **cache_kwargs(cache))
    report = cache.memory_report()
    assert report["ratio"] <= report["target_ratio"] * 1.01  # the floor of 128 dense tokens binds at 400
    for layer in cache.layers:
        assert isinstance(layer.packed_keys, PreRopeKeys) == (layer.storage.bits is not None)


def test_runs_grow_in_place_of_new_runs():
    runs = PositionRuns.span(0, 5, (1, 2)).grown(3)
    assert runs.start.shape[-1] == 1 and torch.equal(runs.expand(8)[0, 1], torch.arange(8))


def test_evicting_while_decoding_keeps_each_token_at_its_position(model, key_bases):
    """A layer under a budget packs decoded tokens as chunks of their own and re-selects: every
    key it keeps, decoded ones among them, rebuilds to the dense key of the position it holds."""
    ids = _prompt(300, seed=4)
    steps = torch.randint(3, 256, (1, 60), generator=torch.Generator().manual_seed(8))
    dense = _dense_keys(model, torch.cat([ids, steps], dim=-1))
    cache = SubTokenCache(model, key_bases=key_bases, budget=0.45, **PRE)
    with torch.no_grad():
        model(ids, **cache_kwargs(cache))
        for t in range(steps.shape[-1]):
            model(steps[:, t : t + 1], **cache_kwargs(cache))
    for layer, reference in zip(cache.layers, dense, strict=True):
        positions = layer.packed_keys.token_positions()  # [1, Hkv, Ts]
        assert (positions.diff(dim=-1) > 0).all() and int(positions.max()) < layer.packed_positions
        assert (positions >= 300).any()  # decoded tokens were kept
        assert positions.shape[-1] < layer.packed_positions  # and some tokens evicted
        expected = torch.take_along_dim(reference, positions.unsqueeze(-1), dim=2)
        error = (layer.packed_keys.dequantize(torch.float32) - expected).norm(dim=-1) / expected.norm(dim=-1)
        assert error.median() < 0.02 and error.max() < 0.15
