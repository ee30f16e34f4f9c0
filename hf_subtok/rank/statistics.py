"""Principal axes of captured keys and values, and how well a rank-r truncation rebuilds tokens.

Pure tensor math: `MomentSums` accumulates, per layer and KV head, the count, sum and sum of
outer products of `[B, Hkv, T, D]` tokens (float64); `principal_axes` turns them into bases
(eigenvectors of the covariance, ordered by variance, signs fixed); `truncation_errors`
measures held-out tokens against bases.
"""

from __future__ import annotations

import torch


class MomentSums:
    """Running first and second moments of tokens, per layer and KV head (float64)."""

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int):
        self.count = torch.zeros(num_layers, kv_heads, dtype=torch.float64)
        self.sum = torch.zeros(num_layers, kv_heads, head_dim, dtype=torch.float64)
        self.outer = torch.zeros(num_layers, kv_heads, head_dim, head_dim, dtype=torch.float64)

    def add(self, layer: int, tokens: torch.Tensor) -> None:
        """Add `[B, Hkv, T, D]` tokens of layer `layer`."""
        x = tokens.detach().to(torch.float64).transpose(0, 1).flatten(1, 2)  # [Hkv, B*T, D]
        self.count[layer] += x.shape[1]
        self.sum[layer] += x.sum(1)
        self.outer[layer] += x.transpose(1, 2) @ x  # [Hkv, D, D]


def principal_axes(moments: MomentSums, center: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(basis [L, Hkv, D, D], mean [L, Hkv, D], variance [L, Hkv, D])` in float32.

    Column j of `basis[l, h]` is the j-th eigenvector of the tokens' second-moment matrix
    (covariance around the mean when `center`, else around zero, and `mean` is zero), ordered by
    decreasing eigenvalue (`variance`: the mean squared coefficient along it), its largest
    entry positive so that a basis is reproducible.
    """
    if not bool((moments.count > 0).all()):
        raise ValueError("principal_axes needs tokens for every layer and head; none were captured for some")
    count = moments.count[..., None]  # [L, Hkv, 1]
    mean = moments.sum / count if center else torch.zeros_like(moments.sum)
    second = moments.outer / count[..., None] - mean[..., :, None] * mean[..., None, :]  # [L, Hkv, D, D]
    second = (second + second.transpose(-1, -2)) / 2
    variance, vectors = torch.linalg.eigh(second)  # ascending
    variance, vectors = variance.flip(-1).clamp_min(0), vectors.flip(-1)
    top = vectors.abs().argmax(dim=-2, keepdim=True)  # [L, Hkv, 1, D]
    vectors = vectors * vectors.gather(-2, top).sign()
    return vectors.float(), mean.float(), variance.float()


def truncation_errors(
    tokens: torch.Tensor, basis: torch.Tensor, mean: torch.Tensor, ranks: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(errors [len(ranks)], energy)`: the summed squared error `||x - x_r||^2` of `[B, Hkv, T, D]`
    tokens rebuilt from their first r coefficients in `basis` `[Hkv, D, D]` around `mean`
    `[Hkv, D]`, for each r in `ranks`, and their summed squared norm `||x||^2` (float64)."""
    x = tokens.detach().to(torch.float64)
    coeffs = (x - mean.double().unsqueeze(1)) @ basis.double()  # [B, Hkv, T, D]
    tail = coeffs.square().flip(-1).cumsum(-1).flip(-1).sum((0, 2))  # [Hkv, D]: sum over j >= r
    tail = torch.cat([tail, tail.new_zeros(tail.shape[0], 1)], dim=-1).sum(0)  # [D + 1]
    return tail[ranks], x.square().sum()
