"""`benchmarks/key_block_growth.py`: a block grown all at once is the block quantized at once
(ratio 1), grown a token at a time it is read back within its grid, and the script runs end
to end on keys handed to it (the model run is replaced)."""

from __future__ import annotations

import logging

import pytest
import torch

from hf_subtok.quant import quantize_channels
from tests.benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def script():
    return load_benchmark("key_block_growth")


def _drifting_keys(seed: int) -> torch.Tensor:
    """`[1, 2, 32, 16]` keys whose channels drift, as RoPE's slow channels do."""
    generator = torch.Generator().manual_seed(seed)
    drift = torch.linspace(0, 3, 32).view(32, 1) * torch.randn(16, generator=generator)
    return torch.randn(1, 2, 32, 16, generator=generator) + drift


def test_a_block_grown_in_one_chunk_is_the_block_quantized_at_once(script):
    keys = _drifting_keys(0)
    at_once = quantize_channels(keys, 2, 32).dequantize(torch.float32)
    torch.testing.assert_close(script.grown(keys, 2, 32, log_scale=False), at_once, rtol=0, atol=0)
    assert script.error_ratios([keys], 2, [32], log_scale=True) == {32: pytest.approx(1.0)}


def test_grown_token_by_token_each_key_stays_inside_its_blocks_grid(script):
    keys = _drifting_keys(1)
    out = script.grown(keys, 2, 1, log_scale=False)
    low, high = keys.amin(-2, keepdim=True), keys.amax(-2, keepdim=True)
    spread = high - low
    assert (out >= low - spread).all() and (out <= high + spread).all()
    assert 1.0 <= script.error_ratios([keys], 2, [1], log_scale=False)[1] < 10


def test_main_reports_both_scale_formats(script, monkeypatch, caplog):
    monkeypatch.setattr(script, "model_key_blocks", lambda tokens, block: [_drifting_keys(2), _drifting_keys(3)])
    with caplog.at_level(logging.INFO, logger="key_block_growth"):
        script.main(["--chunks", "1", "8", "--block", "32"])
    lines = [r.getMessage() for r in caplog.records if r.name == "key_block_growth"]
    assert len(lines) == 2 and lines[0].startswith("float16 scales: 1 at a time") and lines[1].startswith("log scales")
