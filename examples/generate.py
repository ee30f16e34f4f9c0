"""Generate with a SubTokenCache and compare with DynamicCache on the embedded model.

    python examples/generate.py --keep-groups 3
"""

from __future__ import annotations

import argparse

import torch
from transformers import DynamicCache

from hf_subtok import SubTokenCache, SubTokenConfig, cache_kwargs
from hf_subtok.model_loading import load_model_and_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="Hub id or folder (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--keep-groups", type=int, default=4)
    parser.add_argument("--prompt", default="Explain in two sentences why the sky is blue.")
    args = parser.parse_args()

    model, tokenizer = load_model_and_tokenizer(args.model)
    messages = [{"role": "user", "content": args.prompt}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    prompt_len = inputs["input_ids"].shape[1]
    caches = {
        "DynamicCache": DynamicCache(),
        f"SubTokenCache K={args.keep_groups}/8": SubTokenCache(model, SubTokenConfig(keep_groups=args.keep_groups)),
    }
    for name, cache in caches.items():
        with torch.no_grad():
            out = model.generate(**inputs, **cache_kwargs(cache), max_new_tokens=64, do_sample=False)
        print(f"--- {name}")
        print(tokenizer.decode(out[0, prompt_len:], skip_special_tokens=True))
        if isinstance(cache, SubTokenCache):
            report = cache.memory_report()
            print(f"stored {report['stored_bytes']:,} of {report['dense_bytes']:,} bytes (ratio {report['ratio']:.3f})")


if __name__ == "__main__":
    main()
