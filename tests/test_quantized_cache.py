"""The precision axis in the cache: quantized keys and value groups, accounted and bounded."""

from __future__ import annotations

import pytest
import torch

from hf_subtok import SubTokenCache, SubTokenConfig
from hf_subtok.formats import StorageFormat
from hf_subtok.quant import ChannelQuantizedTensor, QuantizedTensor
from hf_subtok.storage.rollback import _CROP_TAKES_LENGTH
from tests.tiny_models import make_tiny_model, random_prompts

_WIDE = dict(head_dim=64, num_attention_heads=2, num_key_value_heads=1, hidden_size=128)


@pytest.mark.parametrize("keys", ["channel", "token"])
@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_measured_bytes_match_the_storage_format(bits, dtype, keys):
    """Every token kept, no window: held bytes are exactly tokens x the format's token bytes
    (per-channel keys: plus the tables of the blocks held, the last one partly filled)."""
    model = make_tiny_model("llama", dtype=dtype, **_WIDE)
    config = SubTokenConfig(
        num_groups=4, keep_groups=2, window=0, bits=bits, quant_group_size=16, key_quantization=keys,
        floor_tokens=0,  # packed from the first token (a 100-token context is under the default floor)
    )
    cache = SubTokenCache(model, config)
    tokens = 100
    with torch.no_grad():
        model(input_ids=random_prompts(2, tokens), past_key_values=cache)
    report = cache.memory_report()
    storage = StorageFormat(64, 4, dtype.itemsize, bits, 16, keys, 32)
    blocks = 4 + -(-(tokens - 4) // 32) if keys == "channel" else 0  # 4 sinks a block each
    row = storage.row_bytes(tokens, blocks, 2, scored=False)
    for layer in cache.layers:  # the batch is stored row by row, each row the whole prompt
        assert [r.packed_keys.shape[-2] for r in layer.row_layers()] == [tokens, tokens]
    assert report["stored_bytes"] == 2 * 2 * row  # layers x batch
    if keys == "token":
        assert row == tokens * storage.token_bytes(2, scored=False)
    assert report["dense_bytes"] == 2 * 2 * tokens * 2 * 64 * dtype.itemsize
    assert {"packed_keys.payload", "packed_keys.scale", "packed_values.zero"} <= set(report["parts"])


@pytest.mark.parametrize("keys", ["channel", "token"])
@pytest.mark.parametrize("bits", [8, 4])
def test_stored_keys_and_values_are_within_half_a_step(bits, keys):
    model = make_tiny_model("llama", **_WIDE)
    keys_seen = {}

    def keep_keys(module, args, kwargs, output):
        keys_seen.setdefault("k", output)

    hook = model.model.layers[0].self_attn.k_proj.register_forward_hook(keep_keys, with_kwargs=True)
    config = SubTokenConfig(num_groups=4, keep_groups=4, window=0, bits=bits, key_quantization=keys, floor_tokens=0)
    cache = SubTokenCache(model, config)
    with torch.no_grad():
        model(input_ids=random_prompts(1, 50), past_key_values=cache)
    hook.remove()
    layer = cache.layers[0]
    assert isinstance(layer.packed_values, QuantizedTensor)
    stored = layer.packed_keys
    if keys == "channel":
        assert isinstance(stored, ChannelQuantizedTensor)
        step = stored.token_scales()[0]  # [B, Hkv, T, D]
    else:
        assert isinstance(stored, QuantizedTensor)
        step = stored.scale.float().repeat_interleave(stored.group_size, dim=-1)  # [B, Hkv, T, D]
    exact = _roped_keys(model, keys_seen["k"], 50)
    error = (stored.dequantize(torch.float32) - exact).abs()
    assert (error <= step / 2 + 1e-5).all()


def _roped_keys(model, projected: torch.Tensor, tokens: int) -> torch.Tensor:
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attention = model.model.layers[0].self_attn
    keys = projected.view(1, tokens, -1, attention.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
    cos, sin = model.model.rotary_emb(keys, torch.arange(tokens).view(1, -1))
    return apply_rotary_pos_emb(keys, keys, cos, sin)[0]


@pytest.mark.parametrize("keys", ["channel", "token"])
@pytest.mark.parametrize("budget", [0.3, 0.15, 0.08, 0.05])
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_budget_holds_with_quantized_storage_through_decoding(bits, budget, keys):
    model = make_tiny_model("qwen2", **_WIDE)
    config = SubTokenConfig(
        budget=budget, bits=bits, num_groups=4, window=16, pack_chunk=8, key_quantization=keys,
        floor_tokens=0, recipe=None,  # the budget, not the short-context floor, sets the bytes of 400 tokens
    )
    try:
        cache = SubTokenCache(model, config)
    except ValueError:
        pytest.fail("a budget that fits a window should be accepted")
    ratios = []
    with torch.no_grad():
        model(input_ids=random_prompts(2, 400), past_key_values=cache)
        for step in range(20):
            model(input_ids=random_prompts(2, 1, seed=step), past_key_values=cache)
            ratios.append(cache.memory_report()["ratio"])
    assert max(ratios) <= budget * 1.01
    # the budget is spent, up to what keeping every token whole would cost
    everything = StorageFormat(64, 4, 4, bits, 32, keys).token_bytes(4, scored=True) / (2 * 64 * 4)
    assert min(ratios) >= min(budget, everything) * 0.7, "the budget should be spent"


def test_per_channel_key_tables_stay_bounded_while_decoding_evicts():
    """Decoding packs small blocks and evicts tokens from old ones: the tables never hold
    blocks no token uses, and the budget holds with them counted."""
    model = make_tiny_model("llama", **_WIDE)
    config = SubTokenConfig(budget=0.1, bits=2, num_groups=4, window=16, pack_chunk=8, floor_tokens=0, recipe=None)
    cache = SubTokenCache(model, config)
    with torch.no_grad():
        model(input_ids=random_prompts(1, 300), past_key_values=cache)
        for step in range(120):
            model(input_ids=random_prompts(1, 1, seed=step), past_key_values=cache)
            assert cache.memory_report()["ratio"] <= 0.1 * 1.01
    for layer in cache.layers:
        keys = layer.packed_keys
        assert isinstance(keys, ChannelQuantizedTensor)
        used = {int(b) for b in keys.token_blocks().flatten()}
        assert used == set(range(keys.scale.shape[-2]))  # one head here: every table row is used


def test_lower_precision_keeps_more_tokens_at_the_same_budget():
    model = make_tiny_model("llama", **_WIDE)
    kept = {}
    for bits in (None, 8, 4):
        cache = SubTokenCache(model, SubTokenConfig(budget=0.2, bits=bits, num_groups=4, keep_groups=4, window=16, recipe=None))
        with torch.no_grad():
            model(input_ids=random_prompts(1, 400), past_key_values=cache)
        kept[bits] = cache.memory_report()["tokens_packed"]
    assert kept[None] < kept[8] < kept[4]


def test_quantized_generation_stays_close_to_dense():
    model = make_tiny_model("llama", **_WIDE)
    ids = random_prompts(2, 120)
    dense = model.generate(ids, max_new_tokens=16, do_sample=False)
    config = SubTokenConfig(num_groups=4, keep_groups=4, window=8, bits=8, floor_tokens=0)
    cache = SubTokenCache(model, config)
    out = model.generate(ids, past_key_values=cache, max_new_tokens=16, do_sample=False)
    assert (out[:, 120:] == dense[:, 120:]).float().mean() >= 0.9


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"bits": 3}, "bits must be one of"),
        ({"bits": True}, "bits must be one of"),
        ({"bits": 4, "quant_group_size": 0}, "quant_group_size must be >= 1"),
    ],
    ids=["bits-3", "bits-bool", "group-size-0"],
)
def test_bad_precision_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SubTokenConfig(keep_groups=4, **kwargs)


def test_group_size_that_does_not_divide_the_head_is_refused():
    model = make_tiny_model("llama", **_WIDE)
    per_token_keys = SubTokenConfig(
        num_groups=4, keep_groups=2, bits=4, quant_group_size=24, key_quantization="token"
    )
    with pytest.raises(ValueError, match="quant_group_size=24 at bits=4 does not fit head_dim=64"):
        SubTokenCache(model, per_token_keys)
    with pytest.raises(ValueError, match="quant_group_size=12 at bits=4 does not fit value group width=16"):
        SubTokenCache(model, SubTokenConfig(num_groups=4, keep_groups=2, bits=4, quant_group_size=12))
    with pytest.raises(ValueError, match="key_quantization must be one of"):
        SubTokenConfig(bits=4, key_quantization="head")
    with pytest.raises(ValueError, match="key_block must be >= 1, got 0"):
        SubTokenConfig(bits=4, key_block=0)
    with pytest.raises(ValueError, match="key_sinks must be >= 0, got -1"):
        SubTokenConfig(bits=4, key_sinks=-1)


def test_plan_trades_precision_for_tokens():
    """Equal attention over every token: 4 bits keeping all beats full precision keeping a few;
    attention on a few tokens and a coarse low-bit format: full precision of those few wins."""
    from hf_subtok.allocation import StorageChoice, plan_layer

    formats = {bits: StorageFormat(64, 4, 4, bits) for bits in (None, 4, 2)}
    group_scores = torch.ones(1, 1, 100, 4)
    budget = 100 * formats[4].token_bytes(4, scored=True)
    spread = torch.full((1, 1, 100), 0.01)
    choices = [StorageChoice(formats[None]), StorageChoice(formats[4], 0.99)]
    plan = plan_layer(spread, group_scores, budget, choices=choices, candidate_groups=[4])
    assert plan.storage.bits == 4 and plan.keep_tokens == 100
    peaked = torch.zeros(1, 1, 100)
    peaked[..., :5] = 0.2
    choices = [StorageChoice(formats[None]), StorageChoice(formats[2], 0.5)]
    plan = plan_layer(peaked, group_scores, budget, choices=choices, candidate_groups=[4])
    assert plan.storage.bits is None and plan.keep_tokens >= 5


def test_fidelity_orders_bit_widths():
    from hf_subtok.storage.tensors import quantization_fidelity

    keys, values = torch.randn(2, 1, 2, 300, 64)
    fidelity = {bits: quantization_fidelity(keys, values, StorageFormat(64, 4, 4, bits)) for bits in (None, 8, 4, 2)}
    assert fidelity[None] == 1.0
    assert 1.0 > fidelity[8] > 0.98 > fidelity[4] > 0.85 > fidelity[2] > 0.4


def test_auto_bits_picks_a_precision_per_layer_within_budget():
    model = make_tiny_model("llama", num_hidden_layers=3, **_WIDE)
    config = SubTokenConfig(budget=0.15, bits="auto", num_groups=4, window=16, floor_tokens=0, recipe=None)
    cache = SubTokenCache(model, config)
    with torch.no_grad():
        model(input_ids=random_prompts(1, 400), past_key_values=cache)
    report = cache.memory_report()
    assert report["ratio"] <= 0.15 * 1.01
    assert all(layer.storage.bits in (8, 4, 2) for layer in cache.layers), "at 15% whole tokens need bits"
    assert [entry["bits"] for entry in report["per_layer"]] == [layer.storage.bits for layer in cache.layers]


def test_auto_bits_needs_a_token_budget():
    with pytest.raises(ValueError, match="bits='auto' needs budget="):
        SubTokenConfig(keep_groups=2, bits="auto")


def test_auto_key_layout_is_per_channel_at_two_bits_only():
    config = SubTokenConfig(budget=0.2, bits="auto", recipe=None)
    layouts = {bits: config.storage_format(64, 4, bits).key_layout for bits in (8, 4, 2)}
    assert layouts == {8: "token", 4: "token", 2: "channel"}
    forced = SubTokenConfig(budget=0.2, bits=4, key_quantization="channel", recipe=None)
    assert forced.storage_format(64, 4).channel_keys


def test_attention_sinks_get_a_block_each_and_come_back_near_exact():
    model = make_tiny_model("llama", **_WIDE)
    keys_seen = {}

    def keep_keys(module, args, kwargs, output):
        keys_seen.setdefault("k", output)

    hook = model.model.layers[0].self_attn.k_proj.register_forward_hook(keep_keys, with_kwargs=True)
    config = SubTokenConfig(num_groups=4, keep_groups=4, window=0, bits=2, key_sinks=3, floor_tokens=0)
    cache = SubTokenCache(model, config)
    with torch.no_grad():
        model(input_ids=random_prompts(1, 70), past_key_values=cache)
    hook.remove()
    stored = cache.layers[0].packed_keys
    assert stored.token_blocks()[0, 0, :4].tolist() == [0, 1, 2, 3]  # three sinks alone, then a block of 32
    assert stored.run_length[0, 0, :4].tolist() == [1, 1, 1, 32]
    exact = _roped_keys(model, keys_seen["k"], 70)
    error = (stored.dequantize(torch.float32) - exact).abs()
    assert error[..., :3, :].max() < 1e-2 * exact[..., :3, :].abs().max()
    assert error[..., 3:, :].max() > 10 * error[..., :3, :].max()


@pytest.mark.parametrize("log_scales", ["none", "both"], ids=["fp16-scales", "log-scales"])
def test_decoded_tokens_join_the_open_key_block_in_a_cache_that_never_evicts(log_scales):
    """Every token kept: decode-time chunks fill the last per-channel key block instead of
    adding tables of their own, so the tables are those of the tokens in full blocks, the held
    bytes are the format's row bytes, and the ratio does not grow while decoding."""
    model = make_tiny_model("llama", **_WIDE)
    config = SubTokenConfig(
        axes="groups", num_groups=1, keep_groups=1, bits=2, value_codes=16, window=2, key_block=32,
        key_sinks=1, log_scales=log_scales, floor_tokens=0,
    )
    cache = SubTokenCache(model, config)
    with torch.no_grad():
        model(input_ids=random_prompts(2, 50), past_key_values=cache)
        ratios = [cache.memory_report()["ratio"]]
        for step in range(40):
            model(input_ids=random_prompts(2, 1, seed=step), past_key_values=cache)
            ratios.append(cache.memory_report()["ratio"])
    packed = 90 - 2  # all but the window
    blocks = 1 + -(-(packed - 1) // 32)  # the sink, then 32-token blocks
    for layer in cache.layers:
        assert len(layer.row_layers()) == 2  # the batch is stored row by row
        for sequence in layer.row_layers():
            keys = sequence.packed_keys
            assert keys.shape[-2] == packed and keys.scale.shape[-2] == blocks
            assert keys.run_length[0, 0].tolist() == [1, 32, 32, packed - 65]
    row = cache.layers[0].row_layers()[0].storage.row_bytes(packed, blocks, 1, scored=False)
    window = 2 * 2 * 64 * 4  # keys and values of 2 float32 tokens
    assert cache.memory_report()["stored_bytes"] == 2 * 2 * (row + window)  # layers x batch
    assert ratios[-1] <= ratios[0]


def test_a_cache_with_quantized_key_blocks_refuses_to_crop():
    """2-bit keys are lossy: the packed key blocks cannot be rolled back to what a cache that
    never saw the cropped tokens would hold, so `crop` refuses and leaves the cache as it was."""
    model = make_tiny_model("llama", **_WIDE)
    config = SubTokenConfig(
        axes="groups", num_groups=1, keep_groups=1, bits=2, window=2, key_block=32, key_sinks=1, floor_tokens=0
    )
    cache = SubTokenCache(model, config)
    with torch.no_grad():
        model(input_ids=random_prompts(1, 50), past_key_values=cache)
    keys = cache.layers[0].packed_keys
    runs = keys.run_length[0, 0].tolist()
    assert runs == [1, 32, 15]  # packed into key blocks: the sink, a full block, the open one
    assert not any(layer.is_croppable for layer in cache.layers)
    with pytest.raises(ValueError, match="cannot roll back"):
        cache.crop(40 if _CROP_TAKES_LENGTH else -10)  # 40 of 50 tokens either way
    assert cache.get_seq_length() == 50
    assert cache.layers[0].packed_keys is keys and keys.run_length[0, 0].tolist() == runs
