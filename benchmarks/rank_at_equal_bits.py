"""The rank axis against quantization at equal bits per key element: perplexity of the real model.

Does storing keys as their first r coefficients in a calibrated basis (the rank axis, DynaKV)
beat quantizing every channel, at the same number of stored bits per key element? This answers
it before any storage is built, by simulation: every key of every layer (values stay exact) goes
through one compression and back inside the attention call, and the perplexity of the whole
window is measured on the shipped book and on the legal text (neither was fitted on).

Compressions (bits per element count the codes and the fp16/bf16 scale and zero of each channel
and block of 32 tokens, i.e. `(b + 1) * r / D`; the bases and means are per model, not per token):

- `channel-b`: the package's key layout, per-channel b-bit codes over blocks of 32 tokens,
  Hadamard-rotated (`quant.channel`, as `rotate=True` stores them);
- `post-r-b`: post-RoPE keys projected on their calibrated centred basis, the first r
  coefficients kept, per-channel b-bit codes over blocks of 32 tokens;
- `pre-r-b`: the same before RoPE (the key is un-rotated at its position, projected, rebuilt
  and rotated back: what a cache storing pre-RoPE coefficients would attend over);
- `prechannel-b`: pre-RoPE keys in their own channels (no basis), per-channel b-bit codes;
- `v...`: values instead, keys exact (`compress_values`): per token in groups of 32 channels
  (the package's value groups), per channel, or in their calibrated basis.

Bases are fitted per layer and KV head on the first `--fit` tokens of the haystack text
(`hf_subtok.rank.calibrate_bases`, keys before and after RoPE). A simulation: no byte is stored; the rows tell which
composition a storage format should implement.

    python benchmarks/rank_at_equal_bits.py --tokens 2048 --fit 4096
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.llama.modeling_llama import rotate_half

from hf_subtok.model_loading import load_model_and_tokenizer
from hf_subtok.quant import quantize, quantize_channels
from hf_subtok.quant.rotation import rotate_groups, shared_hadamard
from hf_subtok.rank import calibrate_bases
from hf_subtok.rank.projection import reconstruct_tokens
from hf_subtok.tasks import load_text

ATTENTION = "rank_at_equal_bits"
BLOCK = 32
METHODS = (
    "exact", "channel-4", "channel-2", "post-32-4", "pre-32-4", "post-32-2", "pre-32-2",
    "pre-16-4", "post-16-4", "pre-24-4", "pre-48-2", "prechannel-2", "pre-64-2", "pre-40-2", "post-64-2",
    "vtoken-2", "vchannel-2", "vbasis-2", "vtoken-4", "vbasis-4", "vbasis-48-2", "vbasis-32-4",
)


def bits_per_element(method: str, head_dim: int) -> float:
    """Stored bits per key element of `method` (codes plus a 16-bit scale and zero per channel and block)."""
    if method == "exact":
        return 16.0
    parts = method.split("-")
    rank = int(parts[1]) if len(parts) == 3 else head_dim
    bits = int(parts[-1])
    return (bits + 32 / BLOCK) * rank / head_dim


def per_channel(x: torch.Tensor, bits: int) -> torch.Tensor:
    """`[B, H, T, N]` through per-channel `bits`-bit codes over blocks of `BLOCK` tokens and back."""
    return quantize_channels(x.float(), bits, BLOCK).dequantize(torch.float32)


def through_basis(x: torch.Tensor, basis: torch.Tensor, mean: torch.Tensor, rank: int, bits: int) -> torch.Tensor:
    """`[B, Hkv, T, D]` tokens as their first `rank` coefficients in `basis` `[Hkv, D, D]` around
    `mean` `[Hkv, D]`, per-channel `bits`-bit codes, rebuilt (float32)."""
    coeffs = (x.float() - mean.unsqueeze(1)) @ basis[..., :rank]  # [B, Hkv, T, r]
    return reconstruct_tokens(per_channel(coeffs, bits), basis, mean, rank)  # [B, Hkv, T, D]


class KeyCompression:
    """The compression applied to every layer's keys, inside the attention call."""

    def __init__(self, bases: dict[str, tuple[torch.Tensor, torch.Tensor]], cos_sin, exact_first: int):
        self.bases = bases  # "pre"/"post" -> (basis [L, Hkv, D, D], mean [L, Hkv, D])
        self.cos_sin = cos_sin  # (cos, sin) `[1, T, D]` at positions 0..T-1
        self.exact_first = exact_first  # the first tokens (attention sinks) stay exact, as a cache keeps them
        self.method = "exact"

    def __call__(self, layer: int, keys: torch.Tensor) -> torch.Tensor:  # keys [B, Hkv, T, D], after RoPE
        out = self.compress(layer, keys)
        out[..., : self.exact_first, :] = keys[..., : self.exact_first, :]
        return out

    def compress(self, layer: int, keys: torch.Tensor) -> torch.Tensor:
        if self.method == "exact":
            return keys.clone()
        kind, *rest = self.method.split("-")
        if kind == "channel":
            rotation = shared_hadamard(keys.shape[-1], keys.device)
            stored = per_channel(rotate_groups(keys.float(), rotation), int(rest[0]))
            return rotate_groups(stored, rotation.T).to(keys.dtype)
        cos, sin = (t[:, None, : keys.shape[-2]].to(torch.float32) for t in self.cos_sin)  # [1, 1, T, D]
        x = keys.float()
        if kind.startswith("pre"):
            x = x * cos - rotate_half(x) * sin  # undo RoPE at each position
        if kind == "prechannel":
            x = per_channel(x, int(rest[0]))
            return (x * cos + rotate_half(x) * sin).to(keys.dtype)
        basis, mean = (t[layer] for t in self.bases[kind])  # [Hkv, D, D], [Hkv, D]
        x = through_basis(x, basis, mean, int(rest[0]), int(rest[1]))
        if kind == "pre":
            x = x * cos + rotate_half(x) * sin
        return x.to(keys.dtype)


def compress_values(method: str, values: torch.Tensor, basis: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """`[B, Hkv, T, D]` values through `method` and back: `vtoken-b` per token, b-bit per group of 32
    channels, Hadamard-rotated (the package's value groups); `vchannel-b` per channel over blocks
    of 32 tokens; `vbasis[-r]-b` in the calibrated basis (`basis` `[Hkv, D, D]`, `mean` `[Hkv, D]`),
    the first r coefficients, per channel."""
    kind, *rest = method.split("-")
    x = values.float()
    if kind == "vtoken":
        rotation = shared_hadamard(BLOCK, values.device)
        stored = quantize(rotate_groups(x, rotation), int(rest[0]), BLOCK).dequantize(torch.float32)
        return rotate_groups(stored, rotation.T).to(values.dtype)
    if kind == "vchannel":
        return per_channel(x, int(rest[0])).to(values.dtype)
    rank, bits = (int(rest[0]), int(rest[1])) if len(rest) == 2 else (x.shape[-1], int(rest[0]))
    return through_basis(x, basis, mean, rank, bits).to(values.dtype)


def fit_bases(model, tokenizer, text: str, tokens: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """"pre"/"post"/"values" -> (basis [L, Hkv, D, D], mean [L, Hkv, D]), fitted on one window."""
    fitted = {}
    for kind in ("pre", "post"):
        bases = calibrate_bases(
            model, tokenizer, text, tokens=tokens, window=tokens, held_out=0, key_space=f"{kind}_rope", progress=False
        )
        fitted[kind] = (bases.tensors["key_basis"], bases.tensors["key_mean"])
    fitted["values"] = (bases.tensors["value_basis"], bases.tensors["value_mean"])
    return fitted


def mean_nll(model, ids: torch.Tensor) -> float:
    with torch.inference_mode():
        logits = model(input_ids=ids, use_cache=False).logits.float()
    return torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048, help="tokens of each text scored (default 2048)")
    parser.add_argument("--fit", type=int, default=4096, help="haystack tokens the bases are fitted on")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--exact-first", type=int, default=4, help="first tokens kept exact (attention sinks)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    model, tokenizer = load_model_and_tokenizer(dtype=getattr(torch, args.dtype))

    def ids_of(name: str, count: int) -> list[int]:
        return tokenizer(load_text(name), add_special_tokens=False, verbose=False).input_ids[:count]

    start = time.perf_counter()
    bases = fit_bases(model, tokenizer, load_text("haystack"), args.fit)
    positions = torch.arange(args.tokens)[None]
    dummy = torch.zeros(1, args.tokens, model.config.hidden_size, dtype=model.dtype)
    compress = KeyCompression(bases, model.model.rotary_emb(dummy, positions), args.exact_first)

    def attention(module, query, key, value, attention_mask, **kwargs):
        i = module.layer_idx
        if compress.method.startswith("v"):
            kept = value[..., : args.exact_first, :]
            value = compress_values(compress.method, value, *(t[i] for t in bases["values"]))
            value[..., : args.exact_first, :] = kept
        else:
            key = compress(i, key)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(ATTENTION, attention)
    model.config._attn_implementation = ATTENTION
    for layer in model.model.layers:
        layer.self_attn.config._attn_implementation = ATTENTION
    texts = {name: torch.tensor([ids_of(name, args.tokens)]) for name in ("ppl", "legal")}
    rows = {}
    for method in args.methods:
        compress.method = method
        rows[method] = {name: math.exp(mean_nll(model, ids)) for name, ids in texts.items()}
    dim = model.config.head_dim
    print(f"SmolLM2-135M-Instruct, {args.dtype}, keys or values (v...) compressed, the other exact, {args.tokens} tokens per text, "
          f"the first {args.exact_first} exact, bases fitted on {args.fit} haystack tokens ({time.perf_counter() - start:.0f} s)\n")
    print("| compressed | bits per element | ppl book | vs exact | ppl legal | vs exact |\n|---|---:|---:|---:|---:|---:|")
    exact = rows.get("exact")
    for method, ppl in rows.items():
        change = {n: f"{ppl[n] / exact[n] - 1:+.1%}" if exact else "-" for n in ppl}
        print(f"| {method} | {bits_per_element(method, dim):.2f} | {ppl['ppl']:.3f} | {change['ppl']} | "
              f"{ppl['legal']:.3f} | {change['legal']} |")


if __name__ == "__main__":
    main()
