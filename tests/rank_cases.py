"""Shared builders for the rank-attention tests: random bases, tokens projected on them, and the
dense keys/values attention must see (built explicitly, never through the code under test)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hf_subtok.quant import quantize
from hf_subtok.rank import BasesConfig, RankBases
from hf_subtok.rank.projection import LayerBases, project_tokens, rank_view
from tests.kernel_cases import DEVICE


@dataclass(frozen=True)
class RankShape:
    """Stored tokens Ts, tail Tt, head_dim D, R query heads per KV head, coefficient widths."""

    stored: int
    tail: int
    head_dim: int
    group: int
    key_width: int
    value_width: int
    batch: int = 2
    kv_heads: int = 2

    @property
    def id(self) -> str:
        return (
            f"B{self.batch}-Hkv{self.kv_heads}-R{self.group}-Ts{self.stored}-Tt{self.tail}-D{self.head_dim}"
            f"-Rk{self.key_width}-Rv{self.value_width}"
        )


def random_bases(kv_heads: int, head_dim: int, generator: torch.Generator, means: bool = True) -> LayerBases:
    """Random orthonormal `[Hkv, D, D]` bases (QR of Gaussian matrices) and random means."""

    def orthonormal():
        q, _ = torch.linalg.qr(torch.randn(kv_heads, head_dim, head_dim, generator=generator, dtype=torch.float64))
        return q.float()

    variance = torch.linspace(1.0, 0.01, head_dim).expand(kv_heads, head_dim).contiguous()
    mean = (lambda: torch.randn(kv_heads, head_dim, generator=generator)) if means else (lambda: None)
    return LayerBases(orthonormal(), orthonormal(), mean(), mean(), variance, variance.clone())


def truncated(x: torch.Tensor, basis: torch.Tensor, mean: torch.Tensor | None, rank: torch.Tensor) -> torch.Tensor:
    """The oracle: `[B, Hkv, T, D]` tokens with each token's coefficients past its rank dropped,
    `mu + sum_{j < r_t} <x_t - mu, b_j> b_j`, one token at a time in float64."""
    batch, heads, tokens, _ = x.shape
    out = torch.empty(x.shape, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            mu = torch.zeros(x.shape[-1], dtype=torch.float64) if mean is None else mean[h].double()
            for t in range(tokens):
                cols = basis[h, :, : int(rank[b, h, t])].double().cpu()  # [D, r]
                out[b, h, t] = mu.cpu() + cols @ (cols.T @ (x[b, h, t].double().cpu() - mu.cpu()))
    return out.to(x.device)


def make_rank(shape: RankShape, dtype: torch.dtype, seed: int = 0, bits: int | None = None, means: bool = True,
              full: bool = False, device: str = DEVICE):
    """`(query [B, Hq, 1, D], kv, keys_seen, values_seen)`: the dense `[B, Hkv, T, D]` keys and
    values attention over `kv` must equal (stored tokens as their coefficients rebuild them).

    `full`: every token at full rank in a full-width basis (then the seen tensors are the
    original keys and values). `bits`: coefficients quantized (then the seen tensors are rebuilt
    from the dequantized coefficients)."""
    generator = torch.Generator().manual_seed(seed)
    b, h, d = shape.batch, shape.kv_heads, shape.head_dim
    total = shape.stored + shape.tail
    bases = random_bases(h, d, generator, means)
    keys = torch.randn(b, h, total, d, generator=generator)
    values = torch.randn(b, h, total, d, generator=generator)
    query = torch.randn(b, h * shape.group, 1, d, generator=generator)
    if full:
        key_rank = torch.full((b, h, shape.stored), d, dtype=torch.uint8)
        value_rank = key_rank
    else:
        key_rank = torch.randint(0, shape.key_width + 1, (b, h, shape.stored), generator=generator, dtype=torch.int16)
        value_rank = torch.randint(0, shape.value_width + 1, (b, h, shape.stored), generator=generator).to(torch.uint8)
    stored_k, stored_v = keys[:, :, : shape.stored], values[:, :, : shape.stored]
    widths = {"key_width": shape.key_width, "value_width": shape.value_width}
    key_c, value_c = project_tokens(stored_k, stored_v, bases, key_rank, value_rank, dtype=dtype, **widths)
    if bits is None:
        seen_k = truncated(stored_k, bases.key_basis, bases.key_mean, key_rank)
        seen_v = truncated(stored_v, bases.value_basis, bases.value_mean, value_rank)
        if dtype != torch.float32:  # the coefficients were rounded: rebuild from the rounded ones
            seen_k = _rebuild(key_c, bases.key_basis, bases.key_mean)
            seen_v = _rebuild(value_c, bases.value_basis, bases.value_mean)
    else:
        key_c, value_c = quantize(key_c.float(), bits, 8), quantize(value_c.float(), bits, 8)
        seen_k = _rebuild(_masked(key_c.dequantize(torch.float32), key_rank), bases.key_basis, bases.key_mean)
        seen_v = _rebuild(_masked(value_c.dequantize(torch.float32), value_rank), bases.value_basis, bases.value_mean)
    tail_k, tail_v = keys[:, :, shape.stored :], values[:, :, shape.stored :]
    kv = rank_view(
        _to(key_c, device), _to(value_c, device), key_rank.to(device), value_rank.to(device), bases.to(device=device),
        tail_k.to(device, dtype).contiguous(), tail_v.to(device, dtype).contiguous(), backend="triton",
    )
    keys_seen = torch.cat([seen_k.to(device), tail_k.to(device, dtype).double()], dim=2)
    values_seen = torch.cat([seen_v.to(device), tail_v.to(device, dtype).double()], dim=2)
    if full:
        keys_seen, values_seen = keys.to(device).double(), values.to(device).double()
    return query.to(device, dtype), kv, keys_seen.float(), values_seen.float()


def _masked(coeffs: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    keep = torch.arange(coeffs.shape[-1]) < rank.long().unsqueeze(-1)
    return coeffs * keep


def _rebuild(coeffs, basis, mean) -> torch.Tensor:
    dense = coeffs.double() @ basis[..., : coeffs.shape[-1]].double().transpose(-1, -2)  # [B, Hkv, Ts, D]
    return dense if mean is None else dense + mean.double().unsqueeze(1)


def _to(x, device):
    return x.to(device) if isinstance(x, torch.Tensor) else x.apply(lambda t: t.to(device))


def sdpa(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask=None, scale=None) -> torch.Tensor:
    """torch's SDPA in float32 over dense `[B, Hkv, T, D]` keys/values repeated for the query heads."""
    group = query.shape[1] // keys.shape[1]
    k = keys.float().repeat_interleave(group, dim=1)
    v = values.float().repeat_interleave(group, dim=1)
    return torch.nn.functional.scaled_dot_product_attention(query.float(), k, v, attn_mask=mask, scale=scale)


def random_model_bases(model, seed: int = 0, key_space: str = "post_rope") -> RankBases:
    """Random (orthonormal) bases and means for every layer of `model`, without a calibration."""
    config = BasesConfig.for_model(model, key_space=key_space, calibration={"text": "random"}, metrics={})
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in config.tensor_shapes().items():
        if name.endswith("basis"):
            tensors[name] = torch.linalg.qr(torch.randn(shape, generator=generator))[0].contiguous()
        else:
            tensors[name] = torch.rand(shape, generator=generator)
    return RankBases(config, tensors)
