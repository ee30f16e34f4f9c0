"""End to end: greedy generation gives the same tokens whichever path computes attention
(PyTorch reference, or the Triton kernels; under the interpreter on a CPU)."""

from __future__ import annotations

import pytest
import torch

from hf_subtok import SubTokenCache, SubTokenConfig
from hf_subtok.kernels import pack_value_groups
from hf_subtok.storage import packing
from tests.kernel_cases import DEVICE
from tests.tiny_models import make_tiny_model, random_prompts

pytest.importorskip("triton")
from hf_subtok.kernels import packed_attention_triton  # noqa: E402

pytestmark = pytest.mark.usefixtures("nan_empty")

NEW_TOKENS = 24


def _generate(model, backend, inputs, keep_groups=3):
    config = SubTokenConfig(num_groups=8, keep_groups=keep_groups, window=8, backend=backend, floor_tokens=0)
    cache = SubTokenCache(model, config)
    with torch.no_grad():
        out = model.generate(
            **inputs, past_key_values=cache, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
        )
    rows = cache.layers[0].row_layers()  # a batch is stored row by row
    assert all(row.packed_keys.shape[-2] > 0 for row in rows), "decoding must have packed window chunks"
    return out


@pytest.mark.parametrize("keep_groups", [3, 8], ids=["K3of8", "K8of8-implied-indices"])
@pytest.mark.parametrize("padded", [False, True], ids=["full", "left_padded"])
def test_greedy_tokens_match_torch_backend(padded, keep_groups, monkeypatch):
    model = make_tiny_model("llama").to(DEVICE)
    lengths = [30, 19] if padded else [30, 30]
    ids = torch.zeros(2, 30, dtype=torch.long)
    mask = torch.zeros(2, 30, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, 30 - n :] = random_prompts(1, n, seed=row)[0]
        mask[row, 30 - n :] = 1
    inputs = {"input_ids": ids.to(DEVICE), "attention_mask": mask.to(DEVICE)}
    expected = _generate(model, "torch", inputs, keep_groups)

    # The storage packs through `pack_value_groups`; route it through the Triton kernel too.
    def pack_with_triton(values, scores, keep_groups, **kwargs):
        return pack_value_groups(values, scores, keep_groups, backend="triton")

    monkeypatch.setattr(packing, "pack_value_groups", pack_with_triton)
    launches = []
    launcher = packed_attention_triton.packed_decode_attention_triton

    def counting_launcher(query, kv, attention_mask=None, *args, **kwargs):
        launches.append(attention_mask is not None)
        return launcher(query, kv, attention_mask, *args, **kwargs)

    monkeypatch.setattr(packed_attention_triton, "packed_decode_attention_triton", counting_launcher)
    got = _generate(model, "triton", inputs, keep_groups)
    assert len(launches) >= 2 * (NEW_TOKENS - 1), "each row's decode steps must run the Triton kernel"
    assert torch.equal(got, expected)
