"""Whether the installed transformers gives each chunk of `generate(prefill_chunk_size=...)` its
own rotary positions. Up to 5.2 it gives every chunk the last chunk's positions
(huggingface/transformers#43082); a test that takes generate's chunked prefill as its oracle
skips there."""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import DynamicCache, GenerationConfig

from hf_subtok import cache_kwargs

BUG = "huggingface/transformers#43082"


@functools.cache
def chunk_positions_right() -> bool:
    """True when a 3-chunk prompt's chunks start at positions 0, 8 and 16 inside generate."""
    from tests.tiny_models import make_tiny_model

    model = make_tiny_model("llama")
    starts = []
    rotary = model.model.rotary_emb
    forward = rotary.forward

    def recording(x, position_ids, *args, **kwargs):
        starts.append(int(position_ids[0, 0]))
        return forward(x, position_ids, *args, **kwargs)

    rotary.forward = recording
    ids = torch.arange(3, 27).unsqueeze(0)  # [1, 24]
    config = GenerationConfig(max_new_tokens=1, do_sample=False, prefill_chunk_size=8, pad_token_id=0)
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config,
                       **cache_kwargs(DynamicCache()))
    return starts[:3] == [0, 8, 16]


def skip_unless_chunk_positions_right() -> None:
    if not chunk_positions_right():
        pytest.skip(f"this transformers' generate(prefill_chunk_size=...) gives every chunk the last chunk's positions ({BUG})")
