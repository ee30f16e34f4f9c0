"""How well could storage below 2 bits per element find the needle if every token were kept?

Issue 7 asks for 94% of dense needle accuracy at 6% of the float32 bytes: 30.7 bytes per
token and KV head of SmolLM2-135M-Instruct (`D = 64`), less than 2 bits per element for keys
and values together. Evicting tokens loses the needle when the question comes after
compression, so the question here is whether every token can stay in so few bits.

This script does not use the cache: it simulates layouts the package does not have. For each
needle case it runs the dense prefill, quantizes and dequantizes the keys and values (all but
the newest `window` tokens) in place, and decodes from a `DynamicCache` holding them. So the
accuracy it reports is a ceiling for such a layout (the real storage would add the rounding of
its scales), and the bytes it prints come from the layout's formula, not from stored tensors:

- keys: Hadamard-rotated, per channel over blocks of `block` tokens by the cache's own
  `quant.quantize_channels` (float16 tables), each block's range chosen among shrinks of its
  min/max range by least squared error (`c`: the cache's `key_clip`), or min/max; 1 bit
  as each channel's least-squares pair of levels over the block; `s{n}`: the first n tokens'
  keys (the attention sinks) left exact, their float32 bytes counted;
- values: Hadamard-rotated, per token and group of `group` channels; 1 bit as the
  least-squares pair of levels (a few Lloyd steps), 2 bits and more as
  `hf_subtok.quant.quantize(clip=True)`; or (`r{rank}`) exact coefficients on each head's
  `rank` principal directions of its centred values (the rank axis of DESIGN.md, with a basis
  fitted to the prompt itself, counted in the bytes); or (`q{dim}x{codes}`) vector-quantized:
  rotated, scaled to unit RMS per token (a float16 scale), pieces of `dim` channels coded by
  the nearest of `codes` codewords fitted per head by k-means on the prompt's own pieces
  (the float16 codebook counted in the bytes).

A layout is written `k{bits}b{block}[c][s{sinks}]-v{bits}g{group}-w{window}` (or `r{rank}` or
`q{dim}x{codes}` in place of `v{bits}g{group}`), e.g. `k2b256c-v1g64-w0` (bits 16: left exact):

    python benchmarks/keep_every_token_ceiling.py --layouts k2b256c-v1g64-w0,k2b256c-v16g64-w0
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import re
from dataclasses import dataclass

import torch

from hf_subtok.bench.decoding import continuation_nll, eos_ids, greedy_continue
from hf_subtok.bench.prefill import dense_prefill, dynamic_cache_from
from hf_subtok.model_loading import load_model_and_tokenizer
from hf_subtok.quant import quantize, quantize_channels, quantize_vectors
from hf_subtok.quant.rotation import hadamard
from hf_subtok.tasks import as_input_ids, build_needle_case, build_ppl_case

logger = logging.getLogger(__name__)

EXACT = 16  # bits meaning "left as it is"
LLOYD_STEPS = 4
SCALE_BYTES = 2  # a float16 scale or zero
LAYOUT = re.compile(r"k(\d+)b(\d+)(c?)(?:s(\d+))?-(?:v(\d+)g(\d+)|r(\d+)|q(\d+)x(\d+))-w(\d+)")


@dataclass(frozen=True)
class Layout:
    """One simulated layout, parsed from its text (see the module docstring)."""

    key_bits: int
    key_block: int
    key_clip: bool
    value_bits: int
    value_group: int
    window: int
    value_rank: int | None = None
    code_dim: int | None = None  # vector-quantized values: channels per code ...
    codes: int | None = None  # ... and codewords per codebook
    key_sinks: int = 0  # first tokens whose keys stay exact (the attention sinks)

    @classmethod
    def parse(cls, text: str) -> Layout:
        match = LAYOUT.fullmatch(text.strip())
        if not match:
            raise ValueError(
                f"layout must look like k2b256c-v1g64-w0, k16b1-r32-w0 or k2b128c-q4x32-w0, got {text!r}"
            )
        kb, block, clip, sinks, vb, group, rank, code_dim, codes, window = match.groups()
        if vb is None:  # exact coefficients on a rank-r basis, or codewords
            vb, group = EXACT, 1
        layout = cls(
            int(kb), int(block), clip == "c", int(vb), int(group), int(window),
            rank and int(rank), code_dim and int(code_dim), codes and int(codes), int(sinks or 0),
        )  # fmt: skip
        if layout.code_dim is not None and (layout.code_dim < 1 or not 2 <= layout.codes <= 256):
            raise ValueError(
                f"vector codes need positive channels and 2..256 codewords (`quant.quantize_vectors`), got {text!r}"
            )
        for name, bits in (("key bits", layout.key_bits), ("value bits", layout.value_bits)):
            if bits not in (1, 2, 4, 8, EXACT):
                raise ValueError(f"{name} must be 1, 2, 4, 8 or {EXACT}, got {bits} in {text!r}")
        if layout.key_block < 1 or layout.value_group < 1 or layout.value_rank == 0:
            raise ValueError(f"key block and value group must be positive, got {text!r}")
        return layout

    def packed_bytes(self, head_dim: int) -> float:
        """Formula bytes of one packed token and head: payloads and float16 scales and zeros
        (key tables shared by a full block), no index or score (nothing is evicted)."""
        key_tables = 2 * SCALE_BYTES * head_dim / self.key_block
        keys = _payload(head_dim, self.key_bits, key_tables)
        if self.value_rank is not None:  # float32 coefficients (the basis: `ratio`)
            return keys + self.value_rank * 4
        if self.code_dim is not None:  # a codeword index per `code_dim` channels, a float16 scale
            return (
                keys + head_dim / self.code_dim * math.ceil(math.log2(self.codes)) / 8 + SCALE_BYTES
            )
        return keys + _payload(
            head_dim, self.value_bits, 2 * SCALE_BYTES * head_dim / self.value_group
        )

    def ratio(self, head_dim: int, tokens: int) -> float:
        """Formula share of the float32 dense bytes over `tokens` tokens (window included)."""
        dense = 2 * head_dim * 4
        packed = max(tokens - self.window, 0)
        shared = 0  # per head: a float32 basis `[D, r]` and mean `[D]`, or a float16 codebook
        if self.value_rank is not None:
            shared = head_dim * (self.value_rank + 1) * 4
        elif self.code_dim is not None:
            shared = self.codes * self.code_dim * SCALE_BYTES
        shared += self.key_sinks * head_dim * 4  # exact sink keys, counted on top of their packing
        stored = packed * self.packed_bytes(head_dim) + shared + min(self.window, tokens) * dense
        return stored / (tokens * dense)


def _payload(channels: int, bits: int, scale_bytes: float) -> float:
    """Bytes of `channels` elements in `bits` bits with `scale_bytes` of scales (float32: exact)."""
    return channels * 4 if bits == EXACT else channels * bits / 8 + scale_bytes


def keys_per_channel(keys: torch.Tensor, bits: int, block: int, clip: bool) -> torch.Tensor:
    """`[B, Hkv, T, D]` keys round-tripped per channel over blocks of `block` tokens: the
    cache's own `quant.quantize_channels` (float16 tables, `clip`: its `key_clip`), or at 1 bit
    (which the cache does not have) each channel's least-squares pair of levels per block."""
    if bits > 1:
        return quantize_channels(keys, bits, block, torch.float16, clip=clip).dequantize(keys.dtype)
    out = torch.empty_like(keys)
    for start in range(0, keys.shape[-2], block):  # a handful of blocks per layer
        x = keys[..., start : start + block, :]  # [B, Hkv, b, D]
        out[..., start : start + block, :] = two_levels(x.transpose(-1, -2)).transpose(-1, -2)
    return out


def values_per_token(values: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """`[B, Hkv, T, D]` values round-tripped per token and group of `group` channels."""
    if bits > 1:
        return quantize(values, bits, group, clip=True).dequantize(values.dtype)
    *lead, channels = values.shape
    return two_levels(values.reshape(*lead, channels // group, group)).reshape(*lead, channels)


def two_levels(x: torch.Tensor) -> torch.Tensor:
    """`x` `[..., g]` with each row replaced by its least-squares pair of levels (1 bit)."""
    above = x >= x.mean(-1, keepdim=True)
    for _ in range(LLOYD_STEPS):  # levels: the means of each side; sides: nearest level
        high, low = _side_means(x, above)
        above = x >= (high + low) / 2
    high, low = _side_means(x, above)  # each level the mean of exactly the elements it codes
    return torch.where(above, high, low)


def low_rank(values: torch.Tensor, rank: int) -> torch.Tensor:
    """`[B, Hkv, T, D]` values projected on each head's `rank` principal directions (of its
    centred values) and back."""
    mean = values.mean(-2, keepdim=True)  # [B, Hkv, 1, D]
    centred = values - mean
    basis = torch.linalg.svd(centred, full_matrices=False).Vh[..., :rank, :]  # [B, Hkv, r, D]
    return centred @ basis.transpose(-1, -2) @ basis + mean


def vector_quantized(values: torch.Tensor, code_dim: int, codes: int) -> torch.Tensor:
    """`[B, Hkv, T, D]` values, each token scaled to unit RMS (float16 scale) and cut into
    `D / code_dim` pieces, each piece replaced by the nearest of `codes` float16 codewords
    fitted per head by k-means on the pieces themselves (`quant.quantize_vectors`)."""
    return quantize_vectors(values, codes, code_dim, scale_dtype=torch.float16).dequantize(values.dtype)


def _side_means(x: torch.Tensor, above: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`[..., 1]` means of the elements of `x` `[..., g]` above and not above a threshold."""
    high = (x * above).sum(-1, keepdim=True) / above.sum(-1, keepdim=True).clamp_min(1)
    low = (x * ~above).sum(-1, keepdim=True) / (~above).sum(-1, keepdim=True).clamp_min(1)
    return high, low


def round_trip(keys: list[torch.Tensor], values: list[torch.Tensor], layout: Layout):
    """Per layer `[B, Hkv, T, D]` keys and values as `layout` would give them back."""
    rotation = hadamard(keys[0].shape[-1])
    out_keys, out_values = [], []
    for k, v in zip(keys, values, strict=True):
        packed = max(k.shape[-2] - layout.window, 0)
        k, v = k.clone(), v.clone()
        if layout.key_bits != EXACT:
            sinks = min(layout.key_sinks, packed)
            # the rotation is orthonormal and symmetric: its own inverse
            rotated = k[..., sinks:packed, :] @ rotation
            k[..., sinks:packed, :] = (
                keys_per_channel(rotated, layout.key_bits, layout.key_block, layout.key_clip)
                @ rotation
            )
        if layout.value_rank is not None:
            v[..., :packed, :] = low_rank(v[..., :packed, :], layout.value_rank)
        elif layout.code_dim is not None:
            rotated = v[..., :packed, :] @ rotation
            v[..., :packed, :] = vector_quantized(rotated, layout.code_dim, layout.codes) @ rotation
        elif layout.value_bits != EXACT:
            rotated = v[..., :packed, :] @ rotation
            v[..., :packed, :] = (
                values_per_token(rotated, layout.value_bits, layout.value_group) @ rotation
            )
        out_keys.append(k)
        out_values.append(v)
    return out_keys, out_values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--layouts", required=True, help="comma-separated layouts, e.g. k2b256c-v1g64-w0"
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--ppl-prefix", type=int, default=None,
        help="also the perplexity of 512 tokens after this many (the bench's ppl case), or skip",
    )  # fmt: skip
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    texts = [text.strip() for text in args.layouts.split(",")]
    layouts = [Layout.parse(text) for text in texts]
    model, tokenizer = load_model_and_tokenizer(None)
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    cases = list(itertools.product(args.lengths, args.depths, args.seeds))
    with torch.no_grad():
        correct, ratios = needle_counts(
            model, tokenizer, layouts, cases, args.max_new_tokens, head_dim
        )
        ppl = (
            {}
            if args.ppl_prefix is None
            else perplexities(model, tokenizer, layouts, args.ppl_prefix)
        )
    header = (
        "| layout | bytes/token-head (formula) | share of fp32 (formula) | in prompt | withheld |"
    )
    print(header + (" ppl (Δ) |" if ppl else ""))
    print("|---|---:|---:|---:|---:|" + ("---:|" if ppl else ""))
    if ppl:
        print(f"| dense | 512.0 | 1.000 | | | {ppl[None]:.3f} |")
    for layout, text in zip(layouts, texts, strict=True):
        share = f"{min(ratios[layout]):.3f}-{max(ratios[layout]):.3f}"
        row = (
            f"| `{text}` | {layout.packed_bytes(head_dim):.1f} | {share} | "
            f"{correct[layout, 'in_prompt']}/{len(cases)} | {correct[layout, 'after']}/{len(cases)} |"
        )
        if ppl:
            row += f" {ppl[layout]:.3f} ({ppl[layout] / ppl[None] - 1:+.1%}) |"
        print(row)


def needle_counts(model, tokenizer, layouts, cases, max_new_tokens: int, head_dim: int):
    """Needles found per (layout, setting) over `cases` (length, depth, seed), and each
    layout's formula shares of the dense bytes."""
    stop_ids = eos_ids(model)
    correct = {(layout, setting): 0 for layout in layouts for setting in ("in_prompt", "after")}
    ratios = {layout: [] for layout in layouts}
    for length, depth, seed in cases:
        case = build_needle_case(tokenizer, length, depth, seed)
        prompt, context, question = (
            as_input_ids(ids) for ids in (case.prompt_ids, case.context_ids, case.question_ids)
        )
        common = {
            "max_new_tokens": max_new_tokens,
            "stop_ids": stop_ids,
            "stop": lambda t, case=case: case.is_correct(
                tokenizer.decode(t, skip_special_tokens=True)
            ),
        }
        for setting, ids in (("in_prompt", prompt), ("after", context)):
            prefill = dense_prefill(model, ids, capture_hidden=False)
            for layout in layouts:
                cache = dynamic_cache_from(*round_trip(prefill.keys, prefill.values, layout))
                ratios[layout].append(layout.ratio(head_dim, ids.shape[1]))
                if setting == "in_prompt":
                    gen = greedy_continue(
                        model, cache, ids.shape[1], first_logits=prefill.last_logits, **common
                    )
                else:
                    gen = greedy_continue(model, cache, ids.shape[1], input_ids=question, **common)
                correct[layout, setting] += case.is_correct(
                    tokenizer.decode(gen.token_ids, skip_special_tokens=True)
                )
        logger.info("case %d tok, depth %g, seed %d done", length, depth, seed)
    return correct, ratios


def perplexities(model, tokenizer, layouts, prefix_tokens: int, eval_tokens: int = 512) -> dict:
    """Perplexity of the bench's ppl case (`eval_tokens` after `prefix_tokens`) given each
    layout's round trip of the prefix's cache (key None: dense)."""
    case = build_ppl_case(tokenizer, prefix_tokens, eval_tokens)
    prefix, eval_ids = as_input_ids(case.prefix_ids), as_input_ids(case.eval_ids)
    prefill = dense_prefill(model, prefix, capture_hidden=False)
    out = {}
    for layout in [None, *layouts]:
        kv = (
            (prefill.keys, prefill.values)
            if layout is None
            else round_trip(prefill.keys, prefill.values, layout)
        )
        nll, count = continuation_nll(
            model, dynamic_cache_from(*kv), prefix.shape[1], eval_ids, prefill.last_logits
        )
        out[layout] = math.exp(nll / count)
    return out


if __name__ == "__main__":
    main()
