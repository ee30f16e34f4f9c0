"""The learned routers as `nn.Module`s: a value-group router and a query-aware token selector.

Both start as the training-free scorer they refine (their last layer is zero at init), so an
untrained router decides exactly as `value_norm` / `snapkv` do.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-6
POOL = 15  # neighbours max-pooled in the selector's attention feature (as SnapKV)
SELECTOR_FEATURES = 6


class GroupRouter(nn.Module):
    """One layer's query-independent router: log-score of each value group of each token.

    `log_scores(v) = log ||v_g|| + f_h(v / rms(v))` where `f_h` is a per-KV-head two-layer MLP
    `D -> hidden -> G`. With `f_h = 0` (the initial state) this is the value-norm router.

    Args:
        num_kv_heads: Hkv.
        head_dim: D.
        num_groups: G (divides D).
        hidden: width of the MLP.
    """

    def __init__(self, num_kv_heads: int, head_dim: int, num_groups: int, hidden: int):
        super().__init__()
        self.num_groups = num_groups
        self.w1 = nn.Parameter(torch.randn(num_kv_heads, head_dim, hidden) / math.sqrt(head_dim))
        self.b1 = nn.Parameter(torch.zeros(num_kv_heads, hidden))
        self.w2 = nn.Parameter(torch.zeros(num_kv_heads, hidden, num_groups))
        self.b2 = nn.Parameter(torch.zeros(num_kv_heads, num_groups))

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        """`[B, Hkv, T, D]` values -> `[B, Hkv, T, G]` float32 log-scores (higher = keep)."""
        batch, heads, tokens, head_dim = values.shape
        v = values.float()
        grouped = v.view(
            batch, heads, tokens, self.num_groups, head_dim // self.num_groups
        )  # [B, Hkv, T, G, C]
        log_norm = torch.linalg.vector_norm(grouped, dim=-1).clamp_min(EPS).log()  # [B, Hkv, T, G]
        unit = v * torch.rsqrt(v.square().mean(-1, keepdim=True) + EPS)  # [B, Hkv, T, D]
        hidden = F.gelu(
            torch.einsum("bhtd,hdk->bhtk", unit, self.w1) + self.b1[:, None]
        )  # [B, Hkv, T, hidden]
        correction = (
            torch.einsum("bhtk,hkg->bhtg", hidden, self.w2) + self.b2[:, None]
        )  # [B, Hkv, T, G]
        return log_norm + correction


class TokenSelector(nn.Module):
    """One layer's query-aware selector: relevance of each token to future queries.

    Features per (head, token), from the prompt's last queries `[B, Hq, W, D]`: the attention
    they pay the token (mean over window and the query heads of the KV head) and its
    neighbourhood max-pool, both times T (length-free), the log norms of key and value, the
    relative position and the log distance to the end. The logit is the SnapKV score
    `log(T * (probs + pooled) / 2)` plus an MLP of the features (zero at init).
    """

    def __init__(self, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(SELECTOR_FEATURES, hidden), nn.GELU(), nn.Linear(hidden, 1)
        )
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        queries: torch.Tensor,
        scaling: float,
        key_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`[B, Hkv, T, D]` keys/values, `[B, Hq, W, D]` last queries -> `[B, Hkv, T]` logits."""
        features, base = selector_features(keys, values, queries, scaling, key_valid)
        return base + self.mlp(features).squeeze(-1)


def selector_features(
    keys: torch.Tensor,
    values: torch.Tensor,
    queries: torch.Tensor,
    scaling: float,
    key_valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`[B, Hkv, T, F]` features and the `[B, Hkv, T]` SnapKV log-score they refine."""
    batch, kv_heads, tokens, head_dim = keys.shape
    window = queries.shape[2]
    group = queries.shape[1] // kv_heads
    k = keys.float()
    q = queries.float().reshape(batch, kv_heads, group * window, head_dim)  # [B, Hkv, R*W, D]
    logits = (q @ k.transpose(-1, -2)) * scaling  # [B, Hkv, R*W, T]
    q_pos = torch.arange(tokens - window, tokens, device=keys.device).repeat(group)
    allowed = (torch.arange(tokens, device=keys.device).view(1, tokens) <= q_pos.view(-1, 1)).view(
        1, 1, -1, tokens
    )
    if key_valid is not None:
        allowed = allowed & key_valid.view(batch, 1, 1, tokens)
    probs = (
        logits.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0).mean(2)
    )  # [B, Hkv, T]
    pooled = F.max_pool1d(
        probs.reshape(batch * kv_heads, 1, tokens), POOL, stride=1, padding=POOL // 2
    )
    pooled = pooled.view(batch, kv_heads, tokens)
    position = torch.arange(tokens, device=keys.device, dtype=torch.float32)
    features = torch.stack(
        [
            (probs * tokens + EPS).log(),
            (pooled * tokens + EPS).log(),
            torch.linalg.vector_norm(k, dim=-1).clamp_min(EPS).log(),
            torch.linalg.vector_norm(values.float(), dim=-1).clamp_min(EPS).log(),
            (position / max(tokens - 1, 1)).expand(batch, kv_heads, tokens),
            (torch.log1p(tokens - 1 - position) / math.log1p(tokens)).expand(
                batch, kv_heads, tokens
            ),
        ],
        dim=-1,
    )  # [B, Hkv, T, F]
    base = (0.5 * (probs + pooled) * tokens + EPS).log()  # [B, Hkv, T]
    return features, base


class RouterModules(nn.Module):
    """Every layer's `GroupRouter` and (optionally) `TokenSelector`, as one state dict."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_groups: int,
        router_hidden: int,
        selector_hidden: int | None,
    ):
        super().__init__()
        self.groups = nn.ModuleList(
            GroupRouter(num_kv_heads, head_dim, num_groups, router_hidden)
            for _ in range(num_layers)
        )
        self.selectors = (
            nn.ModuleList(TokenSelector(selector_hidden) for _ in range(num_layers))
            if selector_hidden
            else None
        )

    @classmethod
    def from_config(cls, config) -> RouterModules:
        """Modules shaped by a `RouterConfig`."""
        return cls(
            config.num_layers,
            config.num_kv_heads,
            config.head_dim,
            config.num_groups,
            config.router_hidden,
            config.selector_hidden if config.selector else None,
        )
