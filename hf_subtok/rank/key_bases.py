"""How each layer of a `SubTokenCache` with `key_space='pre_rope'` stores keys: one `KeyBasis`
per layer, in the keys' own channels or in the calibrated bases its config's `key_bases` names
(`quant.pre_rope_keys`)."""

from __future__ import annotations

import torch

from hf_subtok.quant.pre_rope_keys import KeyBasis
from hf_subtok.rank.artifact import RankBases


def pre_rope_key_spaces(key_bases: str | None, model, rope, num_layers: int) -> list[KeyBasis]:
    """Each layer's `KeyBasis`: own channels (`key_bases` None: one shared by every layer), or
    the bases at `key_bases` in `model`'s dtype on its device; `rope`
    (`scorers.token_base.RopeInfo`) gives the model's rotary frequencies.

    Raises `ValueError` when the model has no rotary embedding, or the bases were calibrated on
    another model or after RoPE.
    """
    if rope is None:
        raise ValueError(f"key_space='pre_rope' needs a model with a rotary embedding; {type(model).__name__} has none")
    device = next(model.parameters()).device
    with torch.inference_mode(False):  # read by every decode step: built outside inference mode
        inv_freq = rope.frequencies(device)
    if key_bases is None:
        return [KeyBasis(None, None, inv_freq, rope.attention_scaling)] * num_layers
    bases = RankBases.from_pretrained(key_bases)
    bases.check_model(model)
    if bases.config.key_space != "pre_rope":
        raise ValueError(
            f"key_bases={key_bases!r} were calibrated with key_space={bases.config.key_space!r}; the cache stores keys "
            "before RoPE: calibrate with `hf-subtok calibrate --key-space pre_rope`"
        )
    spaces = []
    for i in range(num_layers):
        layer = bases.layer(i)

        def own(t: torch.Tensor | None) -> torch.Tensor | None:  # a copy: not a view of every layer's tensor
            return None if t is None else t.to(device=device, dtype=model.dtype).clone()

        with torch.inference_mode(False):
            spaces.append(KeyBasis(own(layer.key_basis), own(layer.key_mean), inv_freq, rope.attention_scaling))
    return spaces
