"""One attention function for every supported architecture, registered with transformers.

`install_attention(model)` registers the function under `ATTENTION_NAME` with transformers'
`AttentionInterface` (and the sdpa mask under the same name with `AttentionMaskInterface`)
and switches the model to it; `uninstall_attention(model)` switches back. Both are
idempotent. Nothing is registered at import time.

The function computes attention over packed storage when a `SubTokenLayer` hands it a
`PackedKV`, and otherwise (dense prefill, or any other cache) defers to the implementation
the model used before.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from hf_subtok.kernels import packed_attention
from hf_subtok.packed import PackedKV, PrefillKV
from hf_subtok.quant.rotation import rotate_groups
from hf_subtok.scorers import Observation

logger = logging.getLogger(__name__)

ATTENTION_NAME = "hf_subtok"
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_FALLBACK_DEFAULT = "sdpa"
# id(model.config) -> implementation the model used before `install_attention`
_previous_implementation: dict[int, str] = {}


def check_supported(model) -> None:
    """Raise `ValueError` unless `model` is one of `SUPPORTED_MODEL_TYPES`."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model_type {model_type!r} is not supported by hf-subtok; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def subtok_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention signature: `query` `[B, Hq, Q, D]` -> (`[B, Q, Hq, D]`, None)."""
    if isinstance(key, PackedKV):
        kv, rotation = key, key.rotation
        if rotation is not None:  # attend in the space the packed tokens are stored in
            query, kv = rotated_attention_inputs(query, key)
        if kv.observer is None:
            out = packed_attention(query, kv, attention_mask, scaling)  # [B, Hq, Q, D]
        else:  # the layer re-allocates by the attention mass each token got
            out, mass = packed_attention(query, kv, attention_mask, scaling, return_mass=True)
            kv.observer(mass)
        if rotation is not None:
            out = rotate_groups(out, rotation[1].T)  # each value group back from its rotation
        return out.transpose(1, 2).contiguous(), None
    name = _previous_implementation.get(id(module.config), _FALLBACK_DEFAULT)
    fallback = ALL_ATTENTION_FUNCTIONS[name]
    if isinstance(key, PrefillKV):
        result = fallback(
            module, query, key.keys, key.values, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
        key.observer(_observe(query, attention_mask, scaling, key.obs_window))
        return result
    return fallback(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def rotated_attention_inputs(query: torch.Tensor, kv: PackedKV) -> tuple[torch.Tensor, PackedKV]:
    """Query `[B, Hq, Q, D]` and a `PackedKV` whose packed part is stored rotated, moved to the
    rotated space: the query and tail keys times the key rotation (scores unchanged), each tail
    value group times the value rotation (the output comes out rotated, per group)."""
    keys_rotation, values_rotation = kv.rotation
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
    return Observation(query[:, :, -window:], key_valid, scale)


def _register() -> None:
    if ATTENTION_NAME not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(ATTENTION_NAME, subtok_attention)
    if ATTENTION_NAME not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(ATTENTION_NAME, ALL_MASK_ATTENTION_FUNCTIONS[_FALLBACK_DEFAULT])


def install_attention(model) -> None:
    """Switch `model` to the hf-subtok attention function (idempotent)."""
    check_supported(model)
    _register()
    current = model.config._attn_implementation
    if current == ATTENTION_NAME:
        return
    if current not in ALL_ATTENTION_FUNCTIONS:
        logger.info("attention %r is not in transformers' registry; dense calls will use %s", current, _FALLBACK_DEFAULT)
        current = _FALLBACK_DEFAULT
    _previous_implementation[id(model.config)] = current
    model.set_attn_implementation(ATTENTION_NAME)


def uninstall_attention(model) -> None:
    """Give `model` back the attention implementation it had before `install_attention`."""
    previous = _previous_implementation.pop(id(model.config), None)
    if previous is not None and model.config._attn_implementation == ATTENTION_NAME:
        model.set_attn_implementation(previous)
