"""Calibration of rank bases on tiny random models: captured keys/values, orthonormal bases,
held-out truncation error falling with the rank and below a random basis's."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from hf_subtok.rank import RankBases, calibrate_bases
from hf_subtok.rank.capture import capture_kv
from hf_subtok.rank.statistics import MomentSums, principal_axes, truncation_errors
from hf_subtok.tasks import load_text
from tests.tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def calibrated(tiny_chat_model, smollm_tokenizer):
    text = load_text("haystack")[:6000]
    return calibrate_bases(tiny_chat_model, smollm_tokenizer, text, tokens=512, window=128, held_out=128, progress=False)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_capture_matches_what_the_cache_receives(arch):
    """Keys after RoPE and values as a DynamicCache holds them; keys before RoPE rotate into them."""
    model = make_tiny_model(arch)
    got = {}
    ids = torch.randint(3, 250, (2, 21), generator=torch.Generator().manual_seed(0))
    with capture_kv(model, lambda i, pre, post, v: got.setdefault(i, (pre, post, v))), torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
    assert isinstance(cache, DynamicCache)
    assert sorted(got) == list(range(model.config.num_hidden_layers))
    for i, (pre, post, values) in got.items():
        torch.testing.assert_close(post, cache.layers[i].keys)
        torch.testing.assert_close(values, cache.layers[i].values)
        torch.testing.assert_close(pre.norm(dim=-1), post.norm(dim=-1))  # RoPE is a rotation
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # hooks removed


def test_bases_are_orthonormal_and_ordered(calibrated):
    config = calibrated.config
    eye = torch.eye(config.head_dim)
    for i in range(config.num_layers):
        layer = calibrated.layer(i)
        for basis, variance in ((layer.key_basis, layer.key_variance), (layer.value_basis, layer.value_variance)):
            assert basis.shape == (config.num_kv_heads, config.head_dim, config.head_dim)
            torch.testing.assert_close(basis.transpose(-1, -2) @ basis, eye.expand_as(basis), atol=1e-5, rtol=0)
            assert (variance >= 0).all() and (variance[:, :-1] >= variance[:, 1:]).all()
    assert calibrated.config.calibration["tokens"] == 512
    assert calibrated.config.centered and calibrated.layer(0).key_mean is not None


def test_held_out_error_falls_with_rank_and_beats_a_random_basis(calibrated, tiny_chat_model, smollm_tokenizer):
    errors = calibrated.config.metrics["relative_error"]
    for name, by_rank in errors.items():
        values = list(by_rank.values())
        assert values == sorted(values, reverse=True) and 0 <= values[-1] < values[0] <= 1, (name, by_rank)
    held_out = smollm_tokenizer(load_text("ppl")[:3000], add_special_tokens=False).input_ids[:200]
    captured = {}
    with capture_kv(tiny_chat_model, lambda i, pre, post, v: captured.setdefault(i, (post, v))), torch.no_grad():
        tiny_chat_model.get_decoder()(input_ids=torch.tensor([held_out]), use_cache=False)
    dim = calibrated.config.head_dim
    ranks = list(range(dim + 1))
    generator = torch.Generator().manual_seed(0)
    for i, (keys, values) in captured.items():
        layer = calibrated.layer(i)
        for tokens, basis, mean in ((keys, layer.key_basis, layer.key_mean), (values, layer.value_basis, layer.value_mean)):
            err, energy = truncation_errors(tokens, basis, mean, ranks)
            assert (err[1:] <= err[:-1] + 1e-9).all() and err[-1] < 1e-8 * energy
            random, _ = torch.linalg.qr(torch.randn(basis.shape, generator=generator, dtype=torch.float64))
            random_err, _ = truncation_errors(tokens, random.float(), mean, ranks)
            assert (err[1:dim // 2 + 1] < random_err[1:dim // 2 + 1]).all(), (i, err, random_err)


@pytest.mark.parametrize("key_space", ["post_rope", "pre_rope"])
def test_key_basis_is_the_best_basis_of_its_space(key_space, tiny_chat_model, smollm_tokenizer, tmp_path):
    """At every rank the saved key basis rebuilds the fitted keys (before or after RoPE, as
    asked) with the least error any basis can have: the tail of the singular values of the
    centred keys (Eckart-Young), computed here by an SVD of the data matrix."""
    text = load_text("haystack")[:3000]
    bases = calibrate_bases(
        tiny_chat_model, smollm_tokenizer, text, tokens=96, window=96, held_out=0, key_space=key_space, progress=False
    )
    bases.save_pretrained(tmp_path / "b")
    assert RankBases.from_pretrained(tmp_path / "b").config.key_space == key_space
    ids = smollm_tokenizer(text, add_special_tokens=False).input_ids[:96]
    captured = {}
    with capture_kv(tiny_chat_model, lambda i, pre, post, v: captured.setdefault(i, (pre, post))), torch.no_grad():
        tiny_chat_model.get_decoder()(input_ids=torch.tensor([ids]), use_cache=False)
    dim = bases.config.head_dim
    for i, (pre, post) in captured.items():
        keys = (pre if key_space == "pre_rope" else post).double()  # [1, Hkv, T, D]
        layer = bases.layer(i)
        for head in range(keys.shape[1]):
            x = keys[0, head]
            tail = torch.linalg.svdvals(x - x.mean(0)).square().flip(0).cumsum(0).flip(0)  # [D]: sum over j >= r
            err, _ = truncation_errors(keys[:, head : head + 1], layer.key_basis[head : head + 1], layer.key_mean[head : head + 1], list(range(dim)))
            torch.testing.assert_close(err, tail, rtol=1e-3, atol=1e-6 * float(tail[0]))
    with pytest.raises(ValueError, match=r"key_space must be one of \('post_rope', 'pre_rope'\), got 'rope'"):
        calibrate_bases(tiny_chat_model, smollm_tokenizer, text, tokens=96, window=96, held_out=0, key_space="rope")


def test_principal_axes_recover_a_known_spectrum():
    generator = torch.Generator().manual_seed(1)
    axes, _ = torch.linalg.qr(torch.randn(8, 8, generator=generator, dtype=torch.float64))
    scales = torch.tensor([8.0, 4, 2, 1, 0.5, 0.25, 0.1, 0.05], dtype=torch.float64)
    tokens = (torch.randn(1, 1, 20000, 8, generator=generator, dtype=torch.float64) * scales) @ axes.T + 3.0
    moments = MomentSums(1, 1, 8)
    moments.add(0, tokens)
    basis, mean, variance = principal_axes(moments, center=True)
    torch.testing.assert_close(mean[0, 0], torch.full((8,), 3.0), atol=0.2, rtol=0)
    torch.testing.assert_close(variance[0, 0], scales.float().square(), rtol=0.05, atol=0.01)
    alignment = (basis[0, 0].double().T @ axes).abs().diagonal()
    assert (alignment[:4] > 0.99).all()


def test_bad_arguments_name_the_field(tiny_chat_model, smollm_tokenizer):
    with pytest.raises(ValueError, match="tokens must be an integer >= 1, got 0"):
        calibrate_bases(tiny_chat_model, smollm_tokenizer, "some text", tokens=0)
    with pytest.raises(ValueError, match="too few for window"):
        calibrate_bases(tiny_chat_model, smollm_tokenizer, "a short text", tokens=64, window=64, held_out=0, progress=False)
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300))
    with pytest.raises(ValueError, match="not supported"):
        calibrate_bases(gpt2, smollm_tokenizer, load_text("haystack")[:2000], tokens=64, window=64, held_out=0, progress=False)
