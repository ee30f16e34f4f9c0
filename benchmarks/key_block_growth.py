"""What growing a per-channel key block as tokens arrive costs (`quant.extend_channels`, the
cache's decode-time packing when it never evicts) against quantizing the block's tokens at once.

Runs the embedded SmolLM2-135M-Instruct over a shipped text, takes every third layer's keys
(Hadamard-rotated, as the cache stores them at 2 bits) for blocks of `--block` tokens at a few
places, and grows each block `--chunks` tokens at a time from empty. Prints the squared error
of the grown blocks over that of the blocks quantized at once, per scale format.

    python benchmarks/key_block_growth.py --tokens 1100 --block 64 --chunks 1 4 16
"""

from __future__ import annotations

import argparse
import logging

import torch
from transformers import DynamicCache

from hf_subtok.generate_args import cache_kwargs
from hf_subtok.model_loading import load_model_and_tokenizer
from hf_subtok.quant import extend_channels, quantize_channels
from hf_subtok.quant.rotation import hadamard, rotate_groups
from hf_subtok.tasks import build_ppl_case

logger = logging.getLogger("key_block_growth")


def grown(block: torch.Tensor, bits: int, chunk: int, log_scale: bool) -> torch.Tensor:
    """`[..., n, D]` keys quantized as one block grown `chunk` tokens at a time, read back."""
    size = block.shape[-2]
    held = quantize_channels(block[..., :chunk, :], bits, size, log_scale=log_scale)
    for start in range(chunk, size, chunk):
        part = block[..., start : start + chunk, :]
        held = extend_channels(held, part, start)
    return held.dequantize(torch.float32)


def error_ratios(keys: list[torch.Tensor], bits: int, chunks: list[int], log_scale: bool) -> dict[int, float]:
    """Chunk size -> squared error of the grown blocks / that of the blocks quantized at once,
    summed over `keys` (`[..., n, D]` blocks)."""
    once = sum(
        float((quantize_channels(b, bits, b.shape[-2], log_scale=log_scale).dequantize(torch.float32) - b).square().sum())
        for b in keys
    )
    return {
        chunk: sum(float((grown(b, bits, chunk, log_scale) - b).square().sum()) for b in keys) / once
        for chunk in chunks
    }


def model_key_blocks(tokens: int, block: int) -> list[torch.Tensor]:
    """Rotated `[1, Hkv, block, D]` keys of every third layer, at two places of a text."""
    model, tokenizer = load_model_and_tokenizer(None)
    case = build_ppl_case(tokenizer, tokens - 2, 2)
    ids = torch.tensor([case.prefix_ids + case.eval_ids])
    cache = DynamicCache()
    with torch.no_grad():
        model(ids, **cache_kwargs(cache), use_cache=True)
    starts = (tokens - 2 * block, tokens - block)
    blocks = []
    for layer in range(0, len(cache.layers), 3):
        keys = cache.layers[layer].keys.float()
        keys = rotate_groups(keys, hadamard(keys.shape[-1]))
        blocks += [keys[..., s : s + block, :] for s in starts]
    return blocks


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1100, help="tokens of text run through the model")
    parser.add_argument("--block", type=int, default=64, help="tokens per key block")
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 4, 16], help="tokens added at a time")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    blocks = model_key_blocks(args.tokens, args.block)
    for log_scale in (False, True):
        ratios = error_ratios(blocks, args.bits, args.chunks, log_scale)
        name = "log scales" if log_scale else "float16 scales"
        logger.info("%s: %s", name, ", ".join(f"{c} at a time {r:.2f}x" for c, r in ratios.items()))


if __name__ == "__main__":
    main()
