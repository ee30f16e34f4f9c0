"""The pre-RoPE key bases a `SubTokenCache` holds, one `KeyBasis` per layer, from the
`key_bases` folder or Hub id of its config (`quant.basis_keys`)."""

from __future__ import annotations

import torch

from hf_subtok.quant.basis_keys import KeyBasis
from hf_subtok.rank.artifact import RankBases


def layer_key_bases(source: str, model, rope) -> list[KeyBasis]:
    """Each layer's `KeyBasis` from the bases at `source`, in `model`'s dtype on its device, with
    `rope` (`scorers.token_base.RopeInfo`) the model's rotary frequencies.

    Raises `ValueError` when the bases were calibrated on another model, after RoPE, or the model
    has no rotary embedding.
    """
    bases = RankBases.from_pretrained(source)
    bases.check_model(model)
    if bases.config.key_space != "pre_rope":
        raise ValueError(
            f"key_bases={source!r} were calibrated with key_space={bases.config.key_space!r}; the cache stores keys "
            "before RoPE: calibrate with `hf-subtok calibrate --key-space pre_rope`"
        )
    if rope is None:
        raise ValueError(f"key_bases={source!r} need a model with a rotary embedding; {type(model).__name__} has none")
    device = next(model.parameters()).device
    inv_freq = rope.frequencies(device)
    layers = []
    for i in range(bases.config.num_layers):
        layer = bases.layer(i)
        mean = None if layer.key_mean is None else layer.key_mean.to(device=device, dtype=model.dtype).clone()
        with torch.inference_mode(False):  # read by every decode step, built outside inference mode
            layers.append(KeyBasis(layer.key_basis.to(device=device, dtype=model.dtype).clone(), mean, inv_freq, rope.attention_scaling))
    return layers
