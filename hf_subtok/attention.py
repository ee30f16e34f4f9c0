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

import logging

from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from hf_subtok.kernels import packed_attention
from hf_subtok.packed import PackedKV

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
        out = packed_attention(query, key, attention_mask, scaling)  # [B, Hq, Q, D]
        return out.transpose(1, 2).contiguous(), None
    name = _previous_implementation.get(id(module.config), _FALLBACK_DEFAULT)
    fallback = ALL_ATTENTION_FUNCTIONS[name]
    return fallback(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


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
