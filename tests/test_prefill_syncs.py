"""Host syncs of one prefill (issue 21.4): the plan reads its numbers from the device a few
times per layer, never once per token, per candidate format or per bisection step.

A host sync is counted where the host reads a tensor: `aten::_local_scalar_dense` (`.item()`,
`int(t)`, `bool(t)`, ...) and `Tensor.tolist()`/`.numpy()` (one transfer each). On a CPU
these are cheap, but on an accelerator each one waits for every queued kernel.

What remains per layer that packs its prompt, and why:
- `plan_layer`: 1, the worth of every candidate plan (K, precision, wide share) read at once;
- `_storage_choices` with `bits="auto"`: 1, every quantized format's round-trip error norms;
- adaptive span: 5 more (`fit_tokens` counts the tokens that can be widened, once per
  selection round of `_pack_selected`, 3 here; `WideGroups.take` checks its tokens were
  stored wide, twice);
- shared rows (`head_budgets="adaptive"`): 1, the longest head's survivor count (a shape);
- with `layer_budgets="adaptive"`, the split adds 2 per prefill (not per layer or per bisection
  step: `split_layer_budgets` bisects on the device); the precisions' fidelity is measured once,
  for the split and the pack alike (`PromptEvidence.choices`).
Storage adds up to 3 per layer whose plan picks 2-bit per-channel keys and drops tokens
(the shapes of the compacted tables, `quant.channel`): counted apart, since whether a plan
picks them depends on the prompt, not on its length.
"""

from __future__ import annotations

import traceback

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from hf_subtok import SubTokenCache, SubTokenConfig
from hf_subtok.generate_args import cache_kwargs
from tests.tiny_models import make_tiny_model

LAYERS = 3
ALL_AXES = {"bits": "auto", "num_groups": 2, "window": 16, "pack_chunk": 8, "floor_tokens": 0}
CHANNEL_SYNCS = 3  # most per layer from `quant.channel` (see the module docstring)
# config -> most host syncs of the plan per layer (see the module docstring), and per prefill on top
CASES = {
    "balanced": ({**ALL_AXES, "budget": 0.25}, 2, 0),
    "compact": ({**ALL_AXES, "bits": 2, "rotate": True, "budget": 0.1}, 1, 0),
    "tokens": ({"budget": 0.25, "floor_tokens": 0}, 1, 0),
    "layer_budgets": ({**ALL_AXES, "budget": 0.25, "layer_budgets": "adaptive"}, 2, 2),
    "span": ({"budget": 0.375, "span": "adaptive", "floor_tokens": 0}, 6, 0),
    "head_budgets": ({"budget": 0.25, "head_budgets": "adaptive", "floor_tokens": 0}, 2, 0),
}


class _Syncs:
    """Host syncs seen, split into those of `quant.channel` and the rest."""

    def __init__(self):
        self.plan = self.channel = 0

    def add(self) -> None:
        if any(frame.filename.endswith("quant/channel.py") for frame in traceback.extract_stack()):
            self.channel += 1
        else:
            self.plan += 1


class _ScalarReads(TorchDispatchMode):
    def __init__(self, syncs: _Syncs):
        super().__init__()
        self.syncs = syncs

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.syncs.add()
        return func(*args, **(kwargs or {}))


class _Transfers(TorchFunctionMode):
    def __init__(self, syncs: _Syncs):
        super().__init__()
        self.syncs = syncs

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.tolist, torch.Tensor.numpy):
            self.syncs.add()
        return func(*args, **(kwargs or {}))


def prefill_syncs(model, config: SubTokenConfig, tokens: int) -> _Syncs:
    """Host syncs of one prefill of `tokens` tokens with a fresh `SubTokenCache`."""
    ids = torch.randint(3, 200, (1, tokens), generator=torch.Generator().manual_seed(tokens))
    cache = SubTokenCache(model, config)
    syncs = _Syncs()
    with torch.no_grad(), _ScalarReads(syncs), _Transfers(syncs):
        model(input_ids=ids, use_cache=True, **cache_kwargs(cache))
    assert all(layer.packed_keys is not None and layer.packed_keys.shape[-2] for layer in cache.layers)
    return syncs


@pytest.fixture(scope="module")
def model():
    return make_tiny_model("llama", num_hidden_layers=LAYERS)


@pytest.mark.parametrize("name", sorted(CASES))
def test_prefill_syncs_bounded_and_independent_of_length(model, name):
    spec, per_layer, per_prefill = CASES[name]
    config = SubTokenConfig(**spec, recipe=None)  # each case its fields as written
    syncs = {tokens: prefill_syncs(model, config, tokens) for tokens in (192, 384)}
    plan = {tokens: s.plan for tokens, s in syncs.items()}
    assert plan[192] == plan[384], f"{name}: the plan's syncs grow with the prompt: {plan}"
    assert plan[384] <= per_layer * LAYERS + per_prefill, f"{name}: {plan[384]} host syncs in {LAYERS} layers"
    for tokens, s in syncs.items():
        assert s.channel <= CHANNEL_SYNCS * LAYERS, f"{name}: {s.channel} syncs in quant.channel at {tokens} tokens"
