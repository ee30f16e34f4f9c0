"""Keys before or after RoPE for the rank axis: held-out reconstruction error by position range.

Fits centred bases (keys before RoPE, keys after RoPE, values) of the embedded
SmolLM2-135M-Instruct on one `--window`-token window of the shipped haystack text, then measures
the relative error `sum ||x - x_r||^2 / sum ||x||^2` at r = D/8, D/4, D/2 on the first `--window`
tokens of the unseen ppl text, by position range; `--bases DIR` adds a saved artifact's keys
(e.g. one calibrated on shorter windows). The table behind `hf_subtok.rank.calibrate`'s choice.

    python benchmarks/rank_key_space.py --window 4096 --bases bases-1024
"""

from __future__ import annotations

import argparse
import time

import torch

from hf_subtok.model_loading import load_model_and_tokenizer
from hf_subtok.rank import RankBases
from hf_subtok.rank.capture import capture_kv
from hf_subtok.rank.statistics import MomentSums, principal_axes, truncation_errors
from hf_subtok.tasks import load_text

KINDS = ("keys before RoPE", "keys after RoPE", "values")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=int, default=4096, help="tokens fitted and measured (default 4096)")
    parser.add_argument("--bases", default=None, help="also measure this saved artifact's keys")
    args = parser.parse_args()
    model, tokenizer = load_model_and_tokenizer()
    fit = tokenizer(load_text("haystack"), add_special_tokens=False, verbose=False).input_ids[: args.window]
    held = tokenizer(load_text("ppl"), add_special_tokens=False, verbose=False).input_ids[: args.window]
    layers, heads, dim = model.config.num_hidden_layers, model.config.num_key_value_heads, model.config.head_dim
    moments = {kind: MomentSums(layers, heads, dim) for kind in KINDS}
    decoder = model.get_decoder()

    def fit_sink(i, pre, post, values):
        for kind, x in zip(KINDS, (pre, post, values), strict=True):
            moments[kind].add(i, x)

    start = time.perf_counter()
    with capture_kv(model, fit_sink), torch.inference_mode():
        decoder(input_ids=torch.tensor([fit]), use_cache=False)
    fitted = {kind: principal_axes(m, center=True)[:2] for kind, m in moments.items()}
    saved = RankBases.from_pretrained(args.bases) if args.bases else None
    ranks = [dim // 8, dim // 4, dim // 2]
    edges = [e for e in (0, 1024, 2048, 4096, 8192) if e < args.window] + [args.window]
    sums: dict[tuple[str, str], list] = {}

    def measure_sink(i, pre, post, values):
        rows = [(f"{kind} (fitted on {args.window})", x, *(t[i] for t in fitted[kind]))
                for kind, x in zip(KINDS, (pre, post, values), strict=True)]
        if saved is not None:
            rows.append((f"keys after RoPE ({args.bases})", post, saved.layer(i).key_basis, saved.layer(i).key_mean))
        for name, x, basis, mean in rows:
            for lo, hi in zip(edges, edges[1:], strict=False):
                error, energy = truncation_errors(x[:, :, lo:hi], basis, mean, ranks)
                total = sums.setdefault((name, f"{lo}-{hi - 1}"), [0.0, 0.0])
                total[0], total[1] = total[0] + error, total[1] + energy

    with capture_kv(model, measure_sink), torch.inference_mode():
        decoder(input_ids=torch.tensor([held]), use_cache=False)
    print(f"| tokens | positions | {' | '.join(f'r = {r}' for r in ranks)} |\n|---|---|{'---|' * len(ranks)}")
    for (name, span), (error, energy) in sums.items():
        print(f"| {name} | {span} | " + " | ".join(f"{float(e / energy):.4f}" for e in error) + " |")
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
