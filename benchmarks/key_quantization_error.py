"""How much of attention survives quantized keys: per token vs per channel, with and without the
attention sink in a block of its own (the measurement behind `key_quantization`).

Runs the embedded SmolLM2-135M-Instruct once over a shipped text (`--prefix` tokens, then
`--queries` more), capturing every layer's post-RoPE queries, keys and values. For each layer,
the last `--queries` queries attend causally over the prefix's keys (quantized one way or
another) and their own exact keys; the relative error of the attention output against exact
keys is averaged over the layers. Values stay exact except in the `values per token` row, which
quantizes the prefix's values instead of its keys (for scale).

    python benchmarks/key_quantization_error.py --prefix 1792 --queries 256 --bits 4 2
"""

from __future__ import annotations

import argparse
import math

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from hf_subtok.model_loading import load_model_and_tokenizer
from hf_subtok.quant import quantize, quantize_channels
from hf_subtok.tasks import build_ppl_case

CAPTURE = "hf_subtok_capture_kv"


def capture_layers(prefix: int, queries: int) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per layer: `[1, Hq, T, D]` queries, `[1, Hkv, T, D]` keys and values of one forward."""
    model, tokenizer = load_model_and_tokenizer(None)
    captured = {}

    def capture(module, query, key, value, attention_mask, **kwargs):
        captured[module.layer_idx] = (query.detach(), key.detach(), value.detach())
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(CAPTURE, capture)
    model.set_attn_implementation(CAPTURE)
    case = build_ppl_case(tokenizer, prefix, queries)
    ids = torch.tensor([case.prefix_ids + case.eval_ids])
    with torch.no_grad():
        model(ids)
    return captured


def attention(query, keys, values) -> torch.Tensor:
    """Causal attention of the last Q queries `[1, Hq, Q, D]` over `[1, Hkv, T, D]`."""
    repeat = query.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(repeat, 1), values.repeat_interleave(repeat, 1)
    q_len, total = query.shape[2], keys.shape[2]
    scores = query @ keys.transpose(-1, -2) / math.sqrt(query.shape[-1])  # [1, Hq, Q, T]
    causal = torch.arange(total).view(1, -1) <= torch.arange(total - q_len, total).view(-1, 1)
    return scores.masked_fill(~causal, float("-inf")).softmax(-1) @ values


def key_layouts(bits: int) -> dict[str, callable]:
    """Name -> `[1, Hkv, T, D]` keys -> the keys as stored and read back."""
    return {
        "keys per token (32 channels)": lambda k: quantize(k, bits, 32).dequantize(torch.float32),
        "keys per channel (32 tokens)": lambda k: quantize_channels(k, bits, 32).dequantize(torch.float32),
        "keys per channel, sink alone": lambda k: quantize_channels(k, bits, 32, solo=1).dequantize(torch.float32),
        "keys per channel, sink alone, 8-bit log scales": lambda k: quantize_channels(
            k, bits, 32, solo=1, log_scale=True
        ).dequantize(torch.float32),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefix", type=int, default=1792, help="tokens whose keys are quantized")
    parser.add_argument("--queries", type=int, default=256, help="later tokens whose attention is measured")
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 2])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    layers = capture_layers(args.prefix, args.queries)
    print(f"relative error of the attention output, mean over {len(layers)} layers")
    print("| stored | " + " | ".join(f"{b} bits" for b in args.bits) + " |")
    print("|---|" + "---:|" * len(args.bits))
    errors: dict[str, list[float]] = {}
    for bits in args.bits:
        rows = {**key_layouts(bits), "values per token (32 channels)": None}
        for name, layout in rows.items():
            total = 0.0
            for query, keys, values in layers.values():
                split = keys.shape[2] - args.queries
                late = query[:, :, split:]
                exact = attention(late, keys, values)
                if layout is None:
                    stored = quantize(values[:, :, :split], bits, 32).dequantize(torch.float32)
                    got = attention(late, keys, torch.cat([stored, values[:, :, split:]], 2))
                else:
                    got = attention(late, torch.cat([layout(keys[:, :, :split]), keys[:, :, split:]], 2), values)
                total += ((got - exact).norm() / exact.norm()).item()
            errors.setdefault(name, []).append(total / len(layers))
    for name, row in errors.items():
        print(f"| {name} | " + " | ".join(f"{e:.3f}" for e in row) + " |")


if __name__ == "__main__":
    main()
