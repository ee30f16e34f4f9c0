"""A row of a left-padded batch gets what its prompt gets alone: budgeted, scored and packed on
its own tokens (the oracle: the same prompt generated alone with the same config)."""

from __future__ import annotations

import pytest
import torch

from hf_subtok import PRESETS, SubTokenCache, SubTokenConfig
from tests.tiny_models import make_tiny_model

NEW_TOKENS = 16
FLOOR = 32  # a small short-context floor keeps the prompts short
LENGTHS = (110, 70, 20)  # above the floor, above it too, below it


def _config(name, **fields) -> SubTokenConfig:
    base = PRESETS[name] if isinstance(name, str) else {}
    return SubTokenConfig(**{**base, "floor_tokens": FLOOR, **fields})


def _prompts(seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (n,), generator=generator) for n in LENGTHS]


def _left_padded(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1
    return ids, mask


def _generate(model, cache, ids, mask):
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=NEW_TOKENS, do_sample=False
        )
    return out[:, ids.shape[1] :]


def _check_rows_match_alone(model, config) -> SubTokenCache:
    prompts = _prompts()
    ids, mask = _left_padded(prompts)
    cache = SubTokenCache(model, config)
    batch = _generate(model, cache, ids, mask)
    for row, prompt in enumerate(prompts):
        alone = _generate(model, SubTokenCache(model, config), prompt[None], torch.ones(1, len(prompt), dtype=torch.long))[0]
        # the batch row may run on after the row alone stopped at its end token (then padding)
        assert torch.equal(batch[row, : len(alone)], alone), f"row {row} ({len(prompt)} tokens) differs from alone"
    return cache


@pytest.mark.parametrize(
    "name, fields",
    [("balanced", {}), ("compact", {}), ("groups-only", {}), (None, {"budget": 0.25}),
     (None, {"budget": 0.1, "window": 8, "head_budgets": "adaptive"})],
    ids=["balanced", "compact", "groups-only", "budget0.25", "budget0.1-heads"],
)
def test_padded_rows_equal_prompt_alone(name, fields):
    model = make_tiny_model("llama")
    cache = _check_rows_match_alone(model, _config(name, **fields))
    report = cache.memory_report()
    assert report["ratio"] < 1.0  # the long rows were compressed


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "qwen3"])
def test_padded_rows_equal_prompt_alone_architectures(arch):
    _check_rows_match_alone(make_tiny_model(arch), _config("balanced"))


def test_rows_hold_only_their_own_tokens():
    """Padding is not stored: each row holds its real tokens (an independent count: the mask)."""
    model = make_tiny_model("llama")
    prompts = _prompts()
    ids, mask = _left_padded(prompts)
    cache = SubTokenCache(model, _config("lossless"))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, past_key_values=cache)
    layer = cache.layers[0]
    assert [row.get_seq_length() for row in layer.row_layers()] == [int(m.sum()) for m in mask]
    assert cache.get_seq_length() == ids.shape[1]  # positions, as transformers counts them


def test_beam_search_and_return_sequences_on_rows():
    """Rows copied or reordered by beam search behave like the same search alone."""
    model = make_tiny_model("llama")
    prompts = _prompts()[:2]
    ids, mask = _left_padded(prompts)
    for kwargs in ({"num_beams": 2}, {"num_return_sequences": 2, "do_sample": True}):
        cache = SubTokenCache(model, _config("balanced"))
        torch.manual_seed(0)
        with torch.no_grad():
            batch = model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=8, **kwargs)
        assert batch.shape[0] == (4 if "num_return_sequences" in kwargs else 2)
        assert len(cache.layers[0].row_layers()) == 4  # a row per beam or per returned sequence
        if "num_beams" in kwargs:
            alone = model.generate(input_ids=prompts[1][None], past_key_values=SubTokenCache(model, _config("balanced")),
                                   max_new_tokens=8, num_beams=2)
            got = batch[1, ids.shape[1] :]
            assert torch.equal(got[: alone.shape[1] - len(prompts[1])], alone[0, len(prompts[1]) :])
