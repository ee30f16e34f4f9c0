"""`PackedKV`, `PrefillKV` and `BatchRowsKV`: what a `SubTokenLayer` hands to attention instead
of dense keys and values (the kernels' and attention's view of storage).

Only the attention function `hf_subtok.attention` registers reads them. Any other code that
takes one for a tensor (another attention implementation: `sdpa` called directly, a function
registered with `AttentionInterface`) gets a `TypeError` naming the cause at its first tensor
operation (`torch.*` functions through `__torch_function__`, tensor attributes and methods such
as `.shape` or `.transpose` through `__getattr__`), instead of an obscure failure further in.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from hf_subtok.quant import QuantizedTensor

_TENSOR_ATTRIBUTES = frozenset(name for name in dir(torch.Tensor) if not name.startswith("__"))
_ATTENTION_NAME = "hf_subtok"  # `hf_subtok.attention.ATTENTION_NAME` (that module imports this one)


class PackedStorageError(TypeError):
    """A `SubtokView` (`PackedKV`, `PrefillKV`) was used as a tensor by code other than hf-subtok's attention."""


def _model_attention_implementation() -> str | None:
    """The `config._attn_implementation` of the attention module whose forward is on the call
    stack (the one that handed a view to a foreign implementation), or None if none is found.
    Read only to word an error message."""
    frame = sys._getframe(3)  # the caller of `__getattr__` / `__torch_function__`
    for _ in range(32):
        if frame is None:
            return None
        for local in ("module", "self"):
            owner = frame.f_locals.get(local)
            if isinstance(owner, torch.nn.Module):
                name = getattr(getattr(owner, "config", None), "_attn_implementation", None)
                if isinstance(name, str):
                    return name
        frame = frame.f_back
    return None


def _wrapped_by_other_code() -> bool:
    """Whether the function registered under hf-subtok's name is no longer hf-subtok's own
    (another library wrapped it after the cache was built: kvpress does on import)."""
    attention = sys.modules.get("hf_subtok.attention")
    if attention is None:
        return False
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS.get(_ATTENTION_NAME, attention.subtok_attention) is not attention.subtok_attention


def _foreign_read(kind: str, operation: str) -> PackedStorageError:
    implementation = _model_attention_implementation()
    found = f"is {implementation!r}" if implementation else f"is not {_ATTENTION_NAME!r}"
    if implementation == _ATTENTION_NAME and _wrapped_by_other_code():
        found += (
            ", but other code replaced the function registered under that name (kvpress wraps every attention "
            "function when it is imported): import it before building the SubTokenCache, or call "
            "hf_subtok.install_attention(model) again, which registers hf-subtok's own function"
        )
    return PackedStorageError(
        f"hf-subtok: this layer's keys and values are packed sub-token storage (a {kind} from a SubTokenCache "
        f"layer), readable only by the {_ATTENTION_NAME!r} attention function, but were read as a tensor "
        f"({operation}); the model's attention implementation {found}. Call hf_subtok.install_attention(model) "
        f"(building a SubTokenCache does it) and keep the model on it, or use a DynamicCache. A SubTokenCache "
        f"serves the model it was built for: build one cache per model."
    )


class SubtokView:
    """Base of what a layer hands to attention in place of key/value tensors: raises a clear
    `PackedStorageError` when the object is used as a `torch.Tensor`."""

    __slots__ = ()

    def __getattr__(self, name: str):  # only for attributes the object lacks
        if name in _TENSOR_ATTRIBUTES:
            raise _foreign_read(type(self).__name__, f".{name}")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", repr(func))
        raise _foreign_read(cls.__name__, f"torch function {name}")


@dataclass(frozen=True)
class PackedKV(SubtokView):
    """A read-only view of one layer's cache for one attention call.

    Stored (packed) tokens come first, then the dense tail (recent window plus the tokens of
    the current forward), in position order.

    Attributes:
        keys: `[B, Hkv, Ts, D]` whole keys of the packed tokens, in the query's dtype or a
            `QuantizedTensor` of that logical shape (quantized along D).
        values: `[B, Hkv, K, Ts, C]` kept value groups, slot-major, `C = D / G`, in the
            query's dtype or a `QuantizedTensor` of that logical shape (quantized along C).
        group_idx: `[B, Hkv, K, Ts]` uint8, the group each slot holds, ascending over slots.
        num_groups: G.
        tail_keys: `[B, Hkv, Tt, D]` dense keys of the window and the current tokens.
        tail_values: `[B, Hkv, Tt, D]` dense values of the window and the current tokens.
        backend: which kernels attention uses ("auto", "torch" or "triton").
        stored_valid: `[B, Hkv, Ts]` bool when packed tokens were selected per head (their
            positions no longer line up with the attention mask, whose last Tt columns still
            cover the tail); None when every token is stored in position order.
        observer: called by attention with the `[B, Hkv, T]` attention mass each token got
            (mean over the query heads and the last `mass_queries` queries), when the layer
            re-allocates by it.
        rotation: `(keys [D, D], values [C, C])` float32 orthonormal matrices the packed keys and
            each packed value group were multiplied by before quantizing, or None. Attention
            then runs in the rotated space (`rotated_attention_inputs`).
        wide_values: `[B, Hkv, G-K, W, C]` the other value groups of the first W packed tokens
            (adaptive span, `hf_subtok.storage.wide`), plain or quantized like `values`, or None.
        wide_group_idx: `[B, Hkv, G-K, W]` uint8 their groups, ascending over slots, or None.

    With per-head budgets the packed tokens of all KV heads share one row: `keys` is
    `[B, 1, Ts, D]` (values, indices, wide parts likewise with 1 for Hkv) while the tail keeps
    its `Hkv` heads, and `stored_valid` `[B, Hkv, Ts]` says which tokens each head owns.
    """

    keys: torch.Tensor | QuantizedTensor
    values: torch.Tensor | QuantizedTensor
    group_idx: torch.Tensor
    num_groups: int
    tail_keys: torch.Tensor
    tail_values: torch.Tensor
    backend: str = "auto"
    stored_valid: torch.Tensor | None = None
    observer: Callable[[torch.Tensor], None] | None = None
    rotation: tuple[torch.Tensor, torch.Tensor] | None = None
    wide_values: torch.Tensor | QuantizedTensor | None = None
    wide_group_idx: torch.Tensor | None = None
    # the observer's mass averages the last `mass_queries` queries (a prompt chunk's last ones,
    # as the prompt is scored: every token of the chunk is visible to them); None: every query
    mass_queries: int | None = None

    @property
    def kv_heads(self) -> int:
        """Hkv, the KV heads (of the tail; packed tokens may share one row, `shares_rows`)."""
        return self.tail_keys.shape[1]

    @property
    def shares_rows(self) -> bool:
        """Whether the packed tokens of several KV heads share one row (`[B, 1, Ts, ...]`)."""
        return self.keys.shape[1] == 1 and self.kv_heads > 1

    @property
    def num_tokens(self) -> int:
        return self.keys.shape[-2] + self.tail_keys.shape[-2]

    @property
    def implied_groups(self) -> bool:
        """Whether every group is kept and `group_idx` is the zero-stride view of 0..G-1 the
        cache passes then (slot k holds group k; the indices are never read)."""
        return self.values.shape[2] == self.num_groups and self.group_idx.stride(-1) == 0


@dataclass(frozen=True)
class PrefillKV(SubtokView):
    """The dense prompt of a layer that selects tokens from the prompt's queries.

    Attention runs exactly on `keys`/`values` (`[B, Hkv, T, D]`), then calls
    `observer(observation)` with the last queries so the layer can score and pack.
    """

    keys: torch.Tensor
    values: torch.Tensor
    observer: Callable
    obs_window: int = 32


@dataclass(frozen=True)
class BatchRowsKV(SubtokView):
    """One attention call's view of a batch whose rows are stored separately.

    A batch of several prompts is stored row by row, each row holding only its own tokens
    (left padding dropped), budgeted, scored and packed exactly as if its prompt ran alone.
    Rows that made the same choices are stacked into one layer (`storage.row_groups`). Attention
    runs once per layer: layer `i` holds the batch rows `index[i]` (`[n_i]` int64, ascending) and
    reads `keys[i]` / `values[i]` (dense `[n_i, Hkv, T_i, D]` tensors, a `PrefillKV` or a
    `PackedKV`, as that layer returned them) with those query rows and the last `T_i` columns of
    their rows of the attention mask (their real tokens).
    """

    keys: tuple
    values: tuple
    index: tuple

    @staticmethod
    def tokens(kv) -> int:
        """Tokens of one row's view (keys of a dense tensor, `PrefillKV` or `PackedKV`)."""
        if torch.is_tensor(kv):
            return kv.shape[-2]
        if hasattr(kv, "num_tokens"):
            return kv.num_tokens
        return kv.keys.shape[-2]


@dataclass(frozen=True)
class RankKV(SubtokView):
    """A read-only view of one layer's cache whose stored tokens are held in calibrated bases.

    Stored tokens come first, then the dense tail, in position order (as in `PackedKV`). A stored
    token `t` of KV head `h` keeps its first `key_rank[b, h, t]` key coefficients and
    `value_rank[b, h, t]` value coefficients (`hf_subtok.rank.project_tokens`): its key is
    `key_mean[h] + key_basis[h] @ c_k` and its value `value_mean[h] + value_basis[h] @ c_v`,
    coefficients past a token's rank counting as zero whatever is stored there. Attention never
    rebuilds them (`hf_subtok.kernels.rank_attention`).

    Attributes:
        key_coeffs: `[B, Hkv, Ts, Rk]` key coefficients, plain (any float dtype) or a
            `QuantizedTensor` of that logical shape (quantized along Rk).
        value_coeffs: `[B, Hkv, Ts, Rv]` value coefficients, likewise.
        key_rank: `[B, Hkv, Ts]` integer, coefficients used per token (0..Rk).
        value_rank: `[B, Hkv, Ts]` integer (0..Rv); may be the same tensor as `key_rank`.
        key_basis: `[Hkv, D, Rk]` orthonormal columns, most important first (e.g. the first Rk
            columns of a `[Hkv, D, D]` basis: a view).
        value_basis: `[Hkv, D, Rv]`.
        key_mean: `[Hkv, D]` the mean the key coefficients were taken around, or None (zero).
        value_mean: `[Hkv, D]`, or None.
        tail_keys: `[B, Hkv, Tt, D]` dense keys of the window and the current tokens.
        tail_values: `[B, Hkv, Tt, D]`.
        backend: which kernels attention uses ("auto", "torch" or "triton").
        stored_valid: `[B, Hkv, Ts]` bool when stored tokens were selected per head (the
            attention mask then covers only the tail), else None.
    """

    key_coeffs: torch.Tensor | QuantizedTensor
    value_coeffs: torch.Tensor | QuantizedTensor
    key_rank: torch.Tensor
    value_rank: torch.Tensor
    key_basis: torch.Tensor
    value_basis: torch.Tensor
    key_mean: torch.Tensor | None
    value_mean: torch.Tensor | None
    tail_keys: torch.Tensor
    tail_values: torch.Tensor
    backend: str = "auto"
    stored_valid: torch.Tensor | None = None

    @property
    def kv_heads(self) -> int:
        """Hkv, the KV heads."""
        return self.tail_keys.shape[1]

    @property
    def num_stored(self) -> int:
        """Ts, the tokens held as coefficients."""
        return self.key_coeffs.shape[-2]

    @property
    def num_tokens(self) -> int:
        return self.num_stored + self.tail_keys.shape[-2]
