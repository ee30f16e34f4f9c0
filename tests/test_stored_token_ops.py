"""Every storage format moves tokens through one interface (`storage.tensors`: `cat_stored`,
`take_tokens`, `first_tokens`, `flatten_heads`, `token_prefix`), and each operation on stored
tokens equals the same operation on the plain tensor they decode to (the oracle: torch's own
cat, gather, slice and reshape on the dequantized tensor)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from hf_subtok.quant import quantize, quantize_channels, quantize_vectors
from hf_subtok.quant.stored import token_prefix
from hf_subtok.storage.tensors import cat_stored, first_tokens, flatten_heads, take_tokens

B, H, T, N = 2, 3, 40, 16


def _formats():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, H, T, N, generator=gen)
    return {
        "plain": x,
        "per-token": quantize(x, 4, 8),
        "per-channel": quantize_channels(x, 2, 8),
        "coded": quantize_vectors(x, 16, 4),
    }


def _plain(x):
    return x if isinstance(x, torch.Tensor) else x.dequantize(torch.float32)


@pytest.mark.parametrize("name", ["plain", "per-token", "per-channel", "coded"])
def test_token_operations_equal_the_same_on_the_decoded_tensor(name):
    stored = _formats()[name]
    decoded = _plain(stored)
    index = torch.stack([torch.randperm(T, generator=torch.Generator().manual_seed(h))[:25] for h in range(H)])
    index = index.expand(B, H, 25).contiguous()  # [B, H, t]

    assert torch.equal(_plain(take_tokens(stored, index)), decoded.gather(2, index[..., None].expand(-1, -1, -1, N)))
    assert torch.equal(_plain(first_tokens(stored, 17)), decoded[..., :17, :])
    assert torch.equal(_plain(token_prefix(stored, 17)), decoded[..., :17, :])
    other = take_tokens(stored, index[..., :5])
    assert torch.equal(_plain(cat_stored([stored, other])), torch.cat([decoded, _plain(other)], dim=-2))


@pytest.mark.parametrize("name", ["plain", "per-token", "per-channel"])
def test_flatten_heads_puts_every_heads_tokens_in_one_row(name):
    stored = _formats()[name]
    flat = flatten_heads(stored, 2)
    assert torch.equal(_plain(flat), _plain(stored).reshape(B, 1, H * T, N))


def test_coded_values_refuse_to_share_rows():
    with pytest.raises(ValueError, match="codebook per KV head"):
        flatten_heads(_formats()["coded"], 2)


def test_first_tokens_copies_so_the_rest_can_be_freed():
    for name, stored in _formats().items():
        cut = first_tokens(stored, 10)
        payload = cut if isinstance(cut, torch.Tensor) else cut.payload
        assert payload.untyped_storage().nbytes() < (stored if name == "plain" else stored.payload).untyped_storage().nbytes()


def test_storage_never_asks_which_quantized_format_it_holds_when_moving_tokens():
    """The token operations in `storage/` branch on plain-or-stored at most, never on the
    quantized classes: a new format is one class implementing the interface."""
    source = Path(__file__).parents[1] / "hf_subtok" / "storage" / "tensors.py"
    tree = ast.parse(source.read_text())
    ops = {"cat_stored", "take_tokens", "first_tokens", "flatten_heads"}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name in ops:
            named = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
            assert not named & {"QuantizedTensor", "ChannelQuantizedTensor", "CodedTensor"}, node.name
