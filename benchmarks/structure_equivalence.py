"""Greedy tokens and stored bytes of SubTokenCache on a tiny random Llama, as JSON (issue 20).

Run on two commits and compare the outputs: a refactor that changes no behaviour prints the
same JSON (same tokens, same `memory_report()["stored_bytes"]`, after prefill and at the end).

    python benchmarks/structure_equivalence.py > before.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_subtok import SubTokenCache, SubTokenConfig  # noqa: E402
from hf_subtok.presets import PRESETS  # noqa: E402
from tests.tiny_models import make_tiny_model  # noqa: E402

CONFIGS = {
    **{f"preset:{name}": name for name in PRESETS},
    "budget=0.25": {"budget": 0.25, "floor_tokens": 0},
    "budget=0.25+head_budgets": {"budget": 0.25, "head_budgets": "adaptive", "floor_tokens": 0},
    "budget=0.375+span": {"budget": 0.375, "span": "adaptive", "floor_tokens": 0},
    "budget=0.75+groups": {"budget": 0.75, "axes": "groups", "floor_tokens": 0},
    "budget=0.2+value_codes": {"budget": 0.2, "value_codes": 16, "bits": 4, "num_groups": 2, "floor_tokens": 0},
    "keep_groups=4+bits=4": {"keep_groups": 4, "bits": 4, "floor_tokens": 0},
    "budget=0.25+bits=4": {"budget": 0.25, "bits": 4, "floor_tokens": 0},
    "budget=0.25+batch": {"budget": 0.25, "floor_tokens": 0, "batch": True},
}


def run(spec, prompt_tokens: int, steps: int) -> dict:
    model = make_tiny_model("llama", num_hidden_layers=3)
    batch = False
    if isinstance(spec, dict):
        spec = dict(spec)
        batch = spec.pop("batch", False)
        if "recipe" in {f.name for f in dataclasses.fields(SubTokenConfig)}:
            spec["recipe"] = None  # the mechanism as written, not the budget's recipe (absent before it)
        config = SubTokenConfig(**spec)
    else:
        config = spec
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 256, (2 if batch else 1, prompt_tokens), generator=generator)
    mask = torch.ones_like(ids)
    if batch:
        ids[1, : prompt_tokens // 3] = 0  # a left-padded second row
        mask[1, : prompt_tokens // 3] = 0
    cache = SubTokenCache(model, config)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=steps,
            do_sample=False,
        )
    report = cache.memory_report()
    return {"tokens": out[:, prompt_tokens:].tolist(), "stored_bytes": int(report["stored_bytes"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=300)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    rows = {}
    for name, spec in CONFIGS.items():
        try:
            rows[name] = run(spec, args.prompt_tokens, args.steps)
        except Exception as error:  # recorded, so a config that fails on both commits still compares
            rows[name] = {"error": f"{type(error).__name__}: {error}"}
    print(json.dumps(rows, sort_keys=True).replace("}, ", "},\n"))


if __name__ == "__main__":
    main()
