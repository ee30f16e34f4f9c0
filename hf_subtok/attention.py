"""One attention function for every supported architecture, registered with transformers.

`install_attention(model)` registers the function under `ATTENTION_NAME` with transformers'
`AttentionInterface` (and a mask function under the same name with `AttentionMaskInterface`)
and switches the model to it; `uninstall_attention(model)` switches back. Both are
idempotent. Nothing is registered at import time.

The function computes attention over packed storage when a `SubTokenLayer` hands it a
`PackedKV`, and otherwise (dense prefill, or any other cache) hands the call to the
implementation the model used before: `sdpa`, `eager` (the model's own
`eager_attention_forward`, which returns attention weights for `output_attentions=True`), or
another registered implementation whose masks are sdpa's or eager's. The mask function builds
the mask that implementation expects; the packed path reads either format. An implementation
whose masks the packed path cannot read (flash attention, flex attention, a custom one without
a mask) is replaced by `sdpa` for the dense calls, with a warning at install.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import weakref

import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from hf_subtok.kernels import packed_attention
from hf_subtok.kernels.masks import causal_allowed
from hf_subtok.quant.rotation import rotate_groups
from hf_subtok.scorers import Observation
from hf_subtok.views import BatchRowsKV, PackedKV, PrefillKV

logger = logging.getLogger(__name__)

ATTENTION_NAME = "hf_subtok"
QUERY_BLOCK_BYTES = 8 * 2**20  # float32 scores and probabilities of the queries attended at once
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_FALLBACK_DEFAULT = "sdpa"
# masks the packed path reads: sdpa's (bool or None) and eager's (additive float)
_READABLE_MASKS = ("sdpa", "eager")
# id(model.config) -> (implementation before `install_attention`, the one dense calls go to, its mask)
_previous_implementation: dict[int, tuple[str, str, str]] = {}


def check_supported(model) -> None:
    """Raise `ValueError` unless `model` is one of `SUPPORTED_MODEL_TYPES`."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model_type {model_type!r} is not supported by hf-subtok; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def subtok_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention signature: `query` `[B, Hq, Q, D]` -> (`[B, Q, Hq, D]`, weights).

    The parameters are in the order of transformers' own functions (`dropout` before `scaling`),
    so a wrapper that passes `dropout` by position (kvpress's) calls it correctly.

    Over packed storage the weights are None, and `output_attentions=True` raises
    `ValueError` (no attention weights are computed over packed tokens); dense calls return
    what the model's previous implementation returns (eager's weights, sdpa's None).
    """
    if isinstance(key, BatchRowsKV):
        return _rows_attention(module, query, key, attention_mask, scaling, dropout, **kwargs)
    if isinstance(key, PackedKV):
        if kwargs.get("output_attentions"):
            raise ValueError(
                "output_attentions=True is not supported over hf-subtok's packed cache: a SubTokenCache "
                "computes no attention weights once its tokens are packed (the prompt's forward, run by the "
                "model's own attention implementation, returns them). Use a DynamicCache for attention weights."
            )
        kv, rotation = key, key.rotation
        if rotation is not None:  # attend in the space the packed tokens are stored in
            query, kv = rotated_attention_inputs(query, key)
        if kv.observer is None:
            out = _blocked_attention(query, kv, attention_mask, scaling)  # [B, Hq, Q, D]
        else:  # the layer re-allocates by the attention mass each token got
            out, mass = _attention_and_mass(query, kv, attention_mask, scaling)
            kv.observer(mass.detach())  # a score for the cache, never differentiated
        if rotation is not None:
            out = rotate_groups(out, rotation[1].T)  # each value group back from its rotation
        return out.transpose(1, 2).contiguous(), None
    fallback = dense_attention_function(module)
    if isinstance(key, PrefillKV):
        result = fallback(
            module, query, key.keys, key.values, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
        key.observer(_observe(query, attention_mask, scaling, key.obs_window))
        return result
    return fallback(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def _query_block(query: torch.Tensor, kv: PackedKV) -> int:
    """Queries attended at once: their float32 scores and probabilities over every key stay
    within `QUERY_BLOCK_BYTES` (a prompt chunk's transients, not a chunk times the context)."""
    per_query = query.shape[0] * query.shape[1] * kv.num_tokens * 8
    return max(1, QUERY_BLOCK_BYTES // max(per_query, 1))


def _blocked_attention(query, kv: PackedKV, attention_mask, scaling):
    """`[B, Hq, Q, D]` attention of `query` over `kv`, a block of queries at a time."""
    q_len = query.shape[2]
    block = _query_block(query, kv)
    if q_len <= block:
        return packed_attention(query, kv, attention_mask, scaling)
    mask = attention_mask if attention_mask is not None else causal_allowed(kv, q_len, query.device)
    outs = [
        packed_attention(query[:, :, start : start + block], kv, mask[..., start : start + block, :], scaling)
        for start in range(0, q_len, block)
    ]
    return torch.cat(outs, dim=2)


def _attention_and_mass(query, kv: PackedKV, attention_mask, scaling):
    """The attention output and the `_mass` each key got: one call when every query is
    attended at once and counts (a decode step)."""
    q_len = query.shape[2]
    if q_len <= _query_block(query, kv) and (kv.mass_queries is None or kv.mass_queries >= q_len):
        return packed_attention(query, kv, attention_mask, scaling, return_mass=True)
    return _blocked_attention(query, kv, attention_mask, scaling), _mass(query, kv, attention_mask, scaling)


def _mass(query, kv: PackedKV, attention_mask, scaling) -> torch.Tensor:
    """`[B, Hkv, T]` attention mass each key got from the last `kv.mass_queries` queries (every
    query when None), averaged over them and the query heads. A prompt chunk's tokens are scored
    by its last queries, as a whole prompt is: its earlier queries cannot see its later tokens,
    so a mean over every query would rank a chunk's newest tokens low. Computed a block of
    queries at a time, like the output (decode steps: one query, one block)."""
    q_len = query.shape[2]
    last = q_len if kv.mass_queries is None else min(kv.mass_queries, q_len)
    mask = attention_mask
    if mask is None and last < q_len:
        mask = causal_allowed(kv, q_len, query.device)
    block = _query_block(query, kv)
    total = None
    for start in range(q_len - last, q_len, block):
        stop = min(start + block, q_len)
        rows = None if mask is None else mask[..., start:stop, :]
        _, mass = packed_attention(query[:, :, start:stop], kv, rows, scaling, return_mass=True)
        mass = mass * (stop - start)
        total = mass if total is None else total + mass
    return total / last


def _rows_attention(module, query, rows: BatchRowsKV, attention_mask, scaling, dropout, **kwargs):
    """A batch stored by rows or groups of rows: each layer's query rows `[n, Hq, Q, D]` against
    its view, with the last columns of their mask rows (their own tokens; left padding is not
    stored). One layer holding the whole batch reads the query and mask as they are."""
    if kwargs.get("output_attentions"):
        raise ValueError(
            "output_attentions=True is not supported for a batch in a SubTokenCache: its rows hold different "
            "numbers of tokens. Use a DynamicCache for attention weights."
        )
    if len(rows.keys) == 1:  # every row in one layer, in batch order
        key = rows.keys[0]
        mask = None if attention_mask is None else attention_mask[..., -BatchRowsKV.tokens(key) :]
        return subtok_attention(module, query, key, rows.values[0], mask, dropout, scaling=scaling, **kwargs)
    output = None
    for index, key, value in zip(rows.index, rows.keys, rows.values, strict=True):
        mask = None
        if attention_mask is not None:
            mask = attention_mask.index_select(0, index)[..., -BatchRowsKV.tokens(key) :]
        out, _ = subtok_attention(module, query.index_select(0, index), key, value, mask, dropout, scaling=scaling, **kwargs)
        if output is None:
            output = out.new_empty(query.shape[0], *out.shape[1:])  # [B, Q, Hq, D]
        output.index_copy_(0, index, out)
    return output, None


def dense_implementation(config) -> tuple[str, str]:
    """`(attention, mask)` implementation names the hf-subtok function hands dense calls of a
    model with this config to, and builds their masks with (`install_attention` chose them)."""
    return _previous_implementation.get(id(config), (_FALLBACK_DEFAULT,) * 3)[1:]


def dense_attention_function(module):
    """The attention function dense calls of `module` go to: the registered one, or for
    `eager` the `eager_attention_forward` of the module's own modeling file."""
    name = dense_implementation(module.config)[0]
    if name != "eager":
        return ALL_ATTENTION_FUNCTIONS[name]
    for cls in type(module).__mro__:  # a subclass defined elsewhere: its base's modeling file
        eager = getattr(sys.modules.get(cls.__module__), "eager_attention_forward", None)
        if eager is not None:
            return eager
    raise ValueError(
        f"the model's attention implementation was 'eager', but no eager_attention_forward was found in the "
        f"modeling file of {type(module).__name__}; load the model with attn_implementation='sdpa'"
    )


def subtok_mask(*args, config=None, **kwargs):
    """transformers mask interface: the mask of the implementation dense calls go to (sdpa's
    bool mask or None, eager's additive float mask); the packed path reads either."""
    mask_function = ALL_MASK_ATTENTION_FUNCTIONS[dense_implementation(config)[1]]
    return mask_function(*args, config=config, **kwargs)


def rotated_attention_inputs(query: torch.Tensor, kv: PackedKV) -> tuple[torch.Tensor, PackedKV]:
    """Query `[B, Hq, Q, D]` and a `PackedKV` whose packed part is stored rotated, moved to the
    rotated space: the query and tail keys times the key rotation (scores unchanged; none when
    the keys are stored before RoPE), each tail value group times the value rotation (the
    output comes out rotated, per group)."""
    keys_rotation, values_rotation = kv.rotation
    if keys_rotation is None:  # keys stored before RoPE: rebuilt after RoPE, attended as they are
        return query, dataclasses.replace(kv, tail_values=rotate_groups(kv.tail_values, values_rotation), rotation=None)
    rotated = dataclasses.replace(
        kv,
        tail_keys=rotate_groups(kv.tail_keys, keys_rotation),  # [B, Hkv, Tt, D]
        tail_values=rotate_groups(kv.tail_values, values_rotation),
        rotation=None,
    )
    return rotate_groups(query, keys_rotation), rotated


def _observe(query, attention_mask, scaling, window: int) -> Observation:
    """The prompt's last `window` queries `[B, Hq, W, D]` and which keys they may attend."""
    key_valid = None
    if attention_mask is not None:
        last_row = attention_mask[:, 0, -1, :]  # [B, T]: the last query sees every valid key
        key_valid = last_row if last_row.dtype == torch.bool else last_row > torch.finfo(last_row.dtype).min / 2
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    # the layer scores tokens with the queries: no gradient flows into the cache's choices
    return Observation(query[:, :, -window:].detach(), key_valid, scale)


def register_attention() -> None:
    """Register the attention and mask functions under `ATTENTION_NAME`, replacing what another
    library put there: kvpress wraps every registered attention function on import, and its
    wrapper reads `key.shape`, which the views hf-subtok hands its function refuse."""
    registered = ALL_ATTENTION_FUNCTIONS.get(ATTENTION_NAME)
    if registered is not subtok_attention:
        if registered is not None:
            logger.info(
                "hf-subtok: %r was registered as %r by other code (kvpress wraps every attention function on "
                "import); registering hf-subtok's function again",
                ATTENTION_NAME,
                getattr(registered, "__qualname__", registered),
            )
        AttentionInterface.register(ATTENTION_NAME, subtok_attention)
        if ALL_ATTENTION_FUNCTIONS.get(ATTENTION_NAME) is not subtok_attention:
            del ALL_ATTENTION_FUNCTIONS[ATTENTION_NAME]  # the wrapper was a local override of the global entry
    if ALL_MASK_ATTENTION_FUNCTIONS.get(ATTENTION_NAME) is not subtok_mask:
        AttentionMaskInterface.register(ATTENTION_NAME, subtok_mask)


def _dense_choice(current: str) -> tuple[str, str]:
    """`(attention, mask)` for the dense calls of a model whose implementation is `current`: kept
    when the packed path reads its masks (sdpa's or eager's), else sdpa, with a warning."""
    if current in _READABLE_MASKS:
        return current, current
    mask = ALL_MASK_ATTENTION_FUNCTIONS.get(current)
    if current in ALL_ATTENTION_FUNCTIONS:
        for name in _READABLE_MASKS:
            if mask is ALL_MASK_ATTENTION_FUNCTIONS[name]:
                return current, name
    logger.warning(
        "hf-subtok: the model's attention implementation %r builds masks the packed cache cannot read; while "
        "hf-subtok's attention is installed, dense calls (prompts, other caches) run with %r instead "
        "(uninstall_attention(model) gives %r back)",
        current,
        _FALLBACK_DEFAULT,
        current,
    )
    return _FALLBACK_DEFAULT, _FALLBACK_DEFAULT


def install_attention(model) -> None:
    """Switch `model` to the hf-subtok attention function (idempotent).

    Dense calls (the prompt, any cache other than a `SubTokenCache`) keep the model's own
    implementation (`sdpa`, `eager`, or a registered one with sdpa's or eager's masks), with
    its mask format; any other implementation is replaced by `sdpa` for them, with a warning.
    """
    check_supported(model)
    register_attention()
    current = model.config._attn_implementation
    if current == ATTENTION_NAME:
        return
    key = id(model.config)
    _previous_implementation[key] = (current, *_dense_choice(current))
    weakref.finalize(model.config, _previous_implementation.pop, key, None)  # no stale ids
    model.set_attn_implementation(ATTENTION_NAME)


def uninstall_attention(model) -> None:
    """Give `model` back the attention implementation it had before `install_attention`."""
    previous = _previous_implementation.pop(id(model.config), None)
    if previous is not None and model.config._attn_implementation == ATTENTION_NAME:
        model.set_attn_implementation(previous[0])
