"""Rows of a batch that share a plan are stacked into one layer (`storage.row_groups`): each row
still answers and holds what its prompt gets alone (the oracle: the prompt generated alone with
the same config), and a decode step makes one pass over the group instead of one per row."""

from __future__ import annotations

import statistics

import pytest
import torch

from hf_subtok import SubTokenCache, SubTokenConfig, cache_kwargs
from tests.test_decode_step_calls import _Calls, _compute
from tests.tiny_models import make_tiny_model

ROWS = 3
PROMPT = 200
NEW_TOKENS = 24  # three pack cycles of 8-token chunks
# one storage format (no per-row precision choice), keys per token: every layer's rows stack
ONE_FORMAT = SubTokenConfig(budget=0.25, bits=4, rotate=True, window=16, pack_chunk=8, floor_tokens=32, recipe=None)
# 2-bit keys stored before RoPE (per channel, positions as runs), never evicting: every layer's rows stack
PRE_ROPE = SubTokenConfig(bits=2, num_groups=2, quant_group_size=8, rotate=True, window=16, pack_chunk=8, floor_tokens=32, recipe=None, key_space="pre_rope")


def _prompts(rows: int = ROWS, seed: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 256, (rows, PROMPT), generator=generator)  # [B, T], no padding


def _generate(model, cache, ids):
    with torch.no_grad():
        out = model.generate(input_ids=ids, **cache_kwargs(cache), max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[:, ids.shape[1] :]


@pytest.mark.parametrize(
    "config",
    [ONE_FORMAT, "balanced", "groups-only", SubTokenConfig(budget=0.25, recipe=None, floor_tokens=32), PRE_ROPE],
    ids=["one-format", "balanced", "groups-only", "budget0.25", "pre-rope"],
)
def test_rows_sharing_a_plan_are_stacked_and_answer_as_alone(config):
    model = make_tiny_model("llama")
    ids = _prompts()
    cache = SubTokenCache(model, config)
    batch = _generate(model, cache, ids)
    for row in range(ROWS):
        alone = _generate(model, SubTokenCache(model, config), ids[row : row + 1])[0]
        assert torch.equal(batch[row, : len(alone)], alone), f"row {row} differs from the prompt alone"
    leaves = [len(layer.rows) for layer in cache.layers]
    assert min(leaves) < ROWS, leaves  # some layer stacked its rows
    if config is ONE_FORMAT or config is PRE_ROPE:
        assert leaves == [1] * len(leaves)


def _held(cache) -> dict[str, int]:
    """Bytes by tensor kind (`packed_keys.payload`, `window_values`, ...), over every layer and
    row, from the tensors themselves; the rotation matrices (one set per cache) left out."""
    total: dict[str, int] = {}
    for layer in cache.layers:
        for name, tensor in layer.stored_tensors().items():
            if name.startswith("rotation") or ".rotation" in name:
                continue
            kind = name.split(".", 2)[-1] if name.startswith("rows.") else name
            total[kind] = total.get(kind, 0) + tensor.numel() * tensor.element_size()
    return total


def test_stacked_rows_hold_the_tensors_of_the_rows_alone():
    model = make_tiny_model("llama")
    ids = _prompts()
    cache = SubTokenCache(model, ONE_FORMAT)
    _generate(model, cache, ids)
    expected: dict[str, int] = {}
    for row in range(ROWS):
        alone = SubTokenCache(model, ONE_FORMAT)
        _generate(model, alone, ids[row : row + 1])
        for kind, size in _held(alone).items():
            expected[kind] = expected.get(kind, 0) + size
    assert all(len(layer.rows) == 1 for layer in cache.layers)
    assert _held(cache) == expected
    for layer in cache.layers:  # and each row's own tensors, taken out of the group, as alone
        assert [row.packed_keys.shape[0] for row in layer.row_layers()] == [1] * ROWS


def _median_step_calls(model, cache, ids, steps: int = 16) -> float:
    counts = []
    with torch.no_grad():
        logits = model(input_ids=ids, **cache_kwargs(cache)).logits
        for step in range(3 + steps):
            calls = _Calls()
            with calls:
                logits = model(input_ids=logits[:, -1:].argmax(-1), **cache_kwargs(cache)).logits
            if step >= 3:
                counts.append(_compute(calls.ops))
    return statistics.median(counts)


def test_a_stacked_batch_steps_with_the_calls_of_one_row():
    """Four rows sharing a plan decode with about the calls of one row (a few to pick the group's
    rows), not four times them as rows attended one by one would."""
    model = make_tiny_model("llama")
    one = _median_step_calls(model, SubTokenCache(model, ONE_FORMAT), _prompts(1))
    four = _median_step_calls(model, SubTokenCache(model, ONE_FORMAT), _prompts(4))
    assert four <= 1.15 * one, (four, one)


def test_reordering_a_stacked_batch_takes_its_rows_apart_then_stacks_them_again():
    """Beam-style reordering of stacked rows gives each batch position the row it names (a walk
    of the tensors taken out before), and the next step stacks the rows again."""
    model = make_tiny_model("llama")
    ids = _prompts()
    cache = SubTokenCache(model, ONE_FORMAT)
    _generate(model, cache, ids)
    layer = cache.layers[1]
    assert len(layer.rows) == 1
    before = [{name: t.clone() for name, t in row.stored_tensors().items()} for row in layer.row_layers()]
    cache.reorder_cache(torch.tensor([2, 0, 0]))
    assert len(layer.rows) == ROWS
    for row, source in zip(layer.row_layers(), [2, 0, 0], strict=True):
        held = row.stored_tensors()
        assert held.keys() == before[source].keys()
        assert all(torch.equal(t, before[source][name]) for name, t in held.items())
    with torch.no_grad():
        model(input_ids=torch.tensor([[5], [6], [6]]), **cache_kwargs(cache))
        model(input_ids=torch.tensor([[7], [8], [8]]), **cache_kwargs(cache))
    assert len(layer.rows) == 1 and layer.row_index[0].tolist() == [0, 1, 2]


def test_rows_of_equal_length_stack_apart_from_the_others_and_each_answers_as_alone():
    """A left-padded batch whose rows 0 and 2 have the same length: those two stack into one group,
    row 1 stays alone, and attention runs once per group (query and mask rows picked, outputs put
    back in batch order): every row answers as its prompt alone."""
    model = make_tiny_model("llama")
    generator = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 256, (n,), generator=generator) for n in (PROMPT, PROMPT - 40, PROMPT)]
    ids = torch.zeros(3, PROMPT, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, PROMPT - len(prompt) :], mask[row, PROMPT - len(prompt) :] = prompt, 1
    cache = SubTokenCache(model, ONE_FORMAT)
    with torch.no_grad():
        batch = model.generate(input_ids=ids, attention_mask=mask, **cache_kwargs(cache), max_new_tokens=NEW_TOKENS,
                               do_sample=False)[:, PROMPT:]
    assert [index.tolist() for index in cache.layers[0].row_index] == [[0, 2], [1]]
    for row, prompt in enumerate(prompts):
        alone = _generate(model, SubTokenCache(model, ONE_FORMAT), prompt[None])[0]
        assert torch.equal(batch[row, : len(alone)], alone), f"row {row} differs from the prompt alone"
