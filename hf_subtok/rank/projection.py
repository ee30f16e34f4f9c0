"""Tokens to coefficients in a layer's calibrated bases and back: pure functions of tensors.

`LayerBases` holds one layer's per-KV-head orthonormal bases (columns ordered by the variance
they carry on the calibration text) and the means the coefficients are taken around.
`project_tokens` turns dense `[B, Hkv, T, D]` keys and values into the first r coefficients of
each token (r per token), `reconstruct_tokens` rebuilds dense tensors from them (for tests and
for a storage path that needs dense keys; attention never does: `hf_subtok.kernels.rank_attention`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hf_subtok.views import RankKV


@dataclass(frozen=True)
class LayerBases:
    """One layer's bases (`[Hkv, D, D]`, column j of head h the j-th most important direction).

    Attributes:
        key_basis: `[Hkv, D, D]` orthonormal columns for keys (after RoPE).
        value_basis: `[Hkv, D, D]` orthonormal columns for values.
        key_mean: `[Hkv, D]` mean of the calibration keys, or None (coefficients around zero).
        value_mean: `[Hkv, D]`, or None.
        key_variance: `[Hkv, D]` variance of each key coefficient on the calibration text,
            descending (the expected squared error of a rank-r key is `key_variance[h, r:].sum()`).
        value_variance: `[Hkv, D]`, likewise.
    """

    key_basis: torch.Tensor
    value_basis: torch.Tensor
    key_mean: torch.Tensor | None
    value_mean: torch.Tensor | None
    key_variance: torch.Tensor
    value_variance: torch.Tensor

    @property
    def kv_heads(self) -> int:
        return self.key_basis.shape[0]

    @property
    def head_dim(self) -> int:
        return self.key_basis.shape[1]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors attention reads (bases and means), by name: what a cache holds."""
        held = {"key_basis": self.key_basis, "value_basis": self.value_basis}
        held.update({name: getattr(self, name) for name in ("key_mean", "value_mean") if getattr(self, name) is not None})
        return held

    def nbytes(self, dtype: torch.dtype | None = None, key_width: int | None = None, value_width: int | None = None) -> int:
        """Bytes of the bases and means attention reads, in `dtype` (default: as held), with only
        the first `key_width` / `value_width` columns (default all D): what a cache holding this
        layer's bases adds to its stored bytes."""
        key_width = self.head_dim if key_width is None else _width("key_width", key_width, self.head_dim)
        value_width = self.head_dim if value_width is None else _width("value_width", value_width, self.head_dim)
        elements = self.kv_heads * self.head_dim * (key_width + value_width)
        elements += sum(self.kv_heads * self.head_dim for m in (self.key_mean, self.value_mean) if m is not None)
        size = (self.key_basis.dtype if dtype is None else dtype).itemsize
        return elements * size

    def to(self, dtype: torch.dtype | None = None, device=None) -> LayerBases:
        """These bases on `device` in `dtype` (default: unchanged)."""

        def move(t):
            return None if t is None else t.to(device=device, dtype=dtype)

        return LayerBases(*(move(getattr(self, name)) for name in self.__dataclass_fields__))


def project_tokens(
    keys: torch.Tensor,
    values: torch.Tensor,
    bases: LayerBases,
    key_rank: int | torch.Tensor,
    value_rank: int | torch.Tensor | None = None,
    *,
    key_width: int | None = None,
    value_width: int | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first r coefficients of every token in `bases`, r per token.

    Args:
        keys: `[B, Hkv, T, D]` keys (after RoPE, as the cache receives them).
        values: `[B, Hkv, T, D]` values.
        bases: the layer's `LayerBases`.
        key_rank: coefficients kept per key, an int or an integer `[B, Hkv, T]` tensor.
        value_rank: likewise for values (default: `key_rank`).
        key_width: coefficients stored per key, `Rk` (default: `key_rank` if an int, else its
            largest value); coefficients past a token's rank are stored as zero.
        value_width: likewise `Rv`.
        dtype: of the coefficients (default: the keys' dtype); computed in float32.

    Returns:
        `(key_coeffs [B, Hkv, T, Rk], value_coeffs [B, Hkv, T, Rv])`.
    """
    value_rank = key_rank if value_rank is None else value_rank
    dtype = keys.dtype if dtype is None else dtype
    out = []
    for name, x, basis, mean, rank, width in (
        ("key", keys, bases.key_basis, bases.key_mean, key_rank, key_width),
        ("value", values, bases.value_basis, bases.value_mean, value_rank, value_width),
    ):
        _check_tokens(name + "s", x, bases)
        width = _width(f"{name}_width", _default_width(rank) if width is None else width, bases.head_dim)
        centred = x.float() if mean is None else x.float() - mean.float().unsqueeze(1)  # [B, Hkv, T, D]
        coeffs = centred @ basis[..., :width].float()  # [B, Hkv, T, R]
        out.append(_truncate(coeffs, rank, f"{name}_rank", x.shape[:3]).to(dtype))
    return out[0], out[1]


def reconstruct_tokens(
    coeffs: torch.Tensor, basis: torch.Tensor, mean: torch.Tensor | None, rank: int | torch.Tensor
) -> torch.Tensor:
    """Dense `[B, Hkv, T, D]` tokens from `[B, Hkv, T, R]` coefficients in `basis` `[Hkv, D, >=R]`
    around `mean` `[Hkv, D]` (or None), using the first `rank` coefficients of each token (int
    or `[B, Hkv, T]`); float32."""
    width = coeffs.shape[-1]
    used = _truncate(coeffs.float(), rank, "rank", coeffs.shape[:3])  # [B, Hkv, T, R]
    dense = used @ basis[..., :width].float().transpose(-1, -2)  # [B, Hkv, T, D]
    return dense if mean is None else dense + mean.float().unsqueeze(1)


def rank_view(
    key_coeffs,
    value_coeffs,
    key_rank: torch.Tensor,
    value_rank: torch.Tensor,
    bases: LayerBases,
    tail_keys: torch.Tensor,
    tail_values: torch.Tensor,
    **options,
) -> RankKV:
    """The `RankKV` attention reads: the coefficients with the first `Rk` / `Rv` columns of the
    layer's bases (views, no copy). `options`: `backend`, `stored_valid`."""
    return RankKV(
        key_coeffs,
        value_coeffs,
        key_rank,
        value_rank,
        bases.key_basis[..., : key_coeffs.shape[-1]],
        bases.value_basis[..., : value_coeffs.shape[-1]],
        bases.key_mean,
        bases.value_mean,
        tail_keys,
        tail_values,
        **options,
    )


def _truncate(coeffs: torch.Tensor, rank, name: str, lead: torch.Size) -> torch.Tensor:
    """`coeffs` `[B, Hkv, T, R]` with every coefficient at or past the token's rank zeroed."""
    width = coeffs.shape[-1]
    if isinstance(rank, torch.Tensor):
        if rank.is_floating_point() or rank.dtype == torch.bool or rank.shape != lead:
            raise ValueError(f"{name} must be an int or an integer [B, Hkv, T] = {tuple(lead)} tensor, got {rank.dtype} {tuple(rank.shape)}")
        used = torch.arange(width, device=coeffs.device) < rank.to(coeffs.device).long().unsqueeze(-1)  # [B, Hkv, T, R]
        return torch.where(used, coeffs, 0.0)
    _width(name, rank, width, low=0)
    return torch.cat([coeffs[..., :rank], coeffs.new_zeros(*coeffs.shape[:-1], width - rank)], dim=-1)


def _default_width(rank) -> int:
    return int(rank.max()) if isinstance(rank, torch.Tensor) and rank.numel() else (rank if isinstance(rank, int) else 1)


def _width(name: str, value, most: int, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= most:
        raise ValueError(f"{name} must be an int in {low}..{most}, got {value!r}")
    return value


def _check_tokens(name: str, x: torch.Tensor, bases: LayerBases) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != bases.kv_heads or x.shape[3] != bases.head_dim:
        raise ValueError(
            f"{name} must be [B, Hkv={bases.kv_heads}, T, D={bases.head_dim}], got {tuple(getattr(x, 'shape', ()))}"
        )
