"""Re-house a loaded Llama-class model's weights in another supported class (Mistral, Qwen2).

A Llama checkpoint without biases is, weight for weight, a Mistral model with no sliding window
and a Qwen2 model whose q/k/v biases are zero: same projections, RoPE, RMSNorm and SwiGLU. So
the embedded SmolLM2-135M-Instruct (a Llama) exercises hf-subtok's Mistral and Qwen2 code paths
on real weights. Qwen3 is not offered: its per-head q/k RMSNorm has no identity setting.

`as_architecture(model, "mistral")` builds the target config from the Llama config (every field
the forward reads, checked after the target class has read it) and hands the Llama's parameters
and buffers to the new model; a config the target cannot carry (biases on the output or MLP
projections, rope parameters the target rewrites) raises `ValueError` naming the field.
"""

from __future__ import annotations

import copy
import logging

import torch

logger = logging.getLogger(__name__)

ARCHITECTURES = ("llama", "mistral", "qwen2")
# Fields every target config takes from the Llama config under the same name and meaning.
CARRIED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "rope_parameters",
    "attention_dropout",
    "tie_word_embeddings",
    "use_cache",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)
# Fields the target classes set so their forward is Llama's: no sliding window anywhere.
_TARGET_FIELDS = {
    "mistral": {"sliding_window": None},
    "qwen2": {"use_sliding_window": False, "sliding_window": None},
}
_ZERO_BIASES = {"qwen2": ("q_proj", "k_proj", "v_proj")}  # projections the target always gives a bias


def as_architecture(model, architecture: str):
    """`model` (a Llama-class causal LM) as an equivalent model of the `architecture` class.

    Args:
        model: a loaded `LlamaForCausalLM` without attention or MLP biases (or any model whose
            `model_type` already is `architecture`, returned unchanged).
        architecture: one of `ARCHITECTURES`.

    Returns:
        A model of the target class in `model`'s dtype, device, attention implementation and
        train/eval mode, with its generation config and name. It shares `model`'s parameter
        tensors (no copy): changing the weights of one changes the other's. Qwen2's q/k/v
        biases are new zero tensors.

    Raises:
        ValueError: `architecture` is not one of `ARCHITECTURES`, `model` is not a Llama, or
            a field of its config cannot be carried over (the message names field and value).
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {', '.join(ARCHITECTURES)}, got {architecture!r}")
    source = model.config
    if source.model_type == architecture:
        return model
    if source.model_type != "llama":
        raise ValueError(
            f"model_type={source.model_type!r}: only a Llama-class model can be re-housed as {architecture!r}"
        )
    target_config = target_config_for(source, architecture, model.dtype, _attention_implementation(model))
    target = _empty_model(target_config)
    _move_weights(model, target, architecture)
    target.generation_config = copy.deepcopy(model.generation_config)
    target.name_or_path = target.config.name_or_path = model.name_or_path
    logger.info("Re-housed %s's weights in %s", model.name_or_path, type(target).__name__)
    return target.train(model.training)


def target_config_for(source, architecture: str, dtype: torch.dtype, attn_implementation: str = "sdpa"):
    """The `architecture` config equivalent to the Llama config `source` of a model running in
    `dtype` with `attn_implementation` (see `as_architecture`)."""
    from transformers import MistralConfig, Qwen2Config

    _check_carriable(source, architecture)
    config_class = {"mistral": MistralConfig, "qwen2": Qwen2Config}[architecture]
    fields = {name: copy.deepcopy(getattr(source, name)) for name in CARRIED_FIELDS}
    # Qwen2Config has no head_dim field; its attention reads one set as an extra attribute.
    config = config_class(**fields, **_TARGET_FIELDS[architecture])
    config.dtype = dtype
    config._attn_implementation = attn_implementation
    for name in CARRIED_FIELDS:  # the target class may rewrite a value it cannot express
        if getattr(config, name, None) != getattr(source, name):
            raise ValueError(
                f"{name}={getattr(source, name)!r} cannot be carried into the {architecture} class "
                f"(its config made it {getattr(config, name, None)!r})"
            )
    return config


def _check_carriable(source, architecture: str) -> None:
    """Raise `ValueError` for a Llama config field the `architecture` class has no place for."""
    if getattr(source, "attention_bias", False):
        where = "o_proj" if architecture == "qwen2" else "q/k/v/o_proj"
        raise ValueError(
            f"attention_bias={source.attention_bias!r}: the {architecture} class has no {where} bias"
        )
    if getattr(source, "mlp_bias", False):
        raise ValueError(f"mlp_bias={source.mlp_bias!r}: the {architecture} class has no MLP biases")
    missing = [name for name in CARRIED_FIELDS if not hasattr(source, name)]
    if missing:
        raise ValueError(f"the Llama config has no {missing[0]!r} field (model_type={source.model_type!r})")


def _attention_implementation(model) -> str:
    """The implementation `model` runs dense attention with (the one it had before hf-subtok's)."""
    from hf_subtok.attention import ATTENTION_NAME, dense_implementation

    current = model.config._attn_implementation
    return dense_implementation(model.config)[0] if current == ATTENTION_NAME else current


def _empty_model(config):
    """The target model with its tensors on the meta device: nothing allocated or initialised."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, attn_implementation=config._attn_implementation)


def _move_weights(source_model, target, architecture: str) -> None:
    """Give `target` the parameters and buffers of `source_model` (shared), plus zero biases."""
    state = source_model.state_dict(keep_vars=True)  # the Parameters themselves: ties stay ties
    for name, _ in target.named_modules():
        if name.rsplit(".", 1)[-1] in _ZERO_BIASES.get(architecture, ()):
            weight = state[f"{name}.weight"]  # [out, in]
            state[f"{name}.bias"] = torch.nn.Parameter(
                torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device),
                requires_grad=weight.requires_grad,
            )
    target.load_state_dict(state, strict=True, assign=True)
    source_buffers = dict(source_model.named_buffers())
    for name, _ in list(target.named_buffers()):  # non-persistent ones too (rotary inv_freq)
        if name not in source_buffers:
            raise ValueError(f"buffer {name!r} of the {architecture} class has no Llama counterpart")
        owner, _, leaf = name.rpartition(".")
        setattr(target.get_submodule(owner), leaf, source_buffers[name])
    if target.config.tie_word_embeddings:
        target.tie_weights()
