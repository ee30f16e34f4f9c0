"""On the embedded SmolLM2-135M-Instruct: short chat prompts answered as dense answers them,
in float32 and bfloat16, and each row of a padded batch answered as its prompt alone."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from hf_subtok import PRESETS, SubTokenCache, SubTokenConfig

pytestmark = pytest.mark.slow

QUESTIONS = ("What is the capital of France?", "Name three colors.")
NEW_TOKENS = 12


def _chat(tokenizer, question: str) -> dict:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )


def _greedy(model, cache, inputs, new_tokens=NEW_TOKENS):
    with torch.no_grad():
        out = model.generate(**inputs, past_key_values=cache, max_new_tokens=new_tokens, do_sample=False)
    return out[:, inputs["input_ids"].shape[1] :]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_short_chat_prompts_get_the_dense_answer(smollm, dtype):
    model, tokenizer = smollm
    model = model.to(dtype)
    try:
        for question in QUESTIONS:
            inputs = _chat(tokenizer, question)
            dense = _greedy(model, DynamicCache(config=model.config), inputs)
            for config in [*PRESETS, SubTokenConfig(budget=0.25, recipe=None), SubTokenConfig(budget=0.1, recipe=None)]:
                got = _greedy(model, SubTokenCache(model, config), inputs)
                assert torch.equal(got, dense), (question, config, tokenizer.decode(got[0]))
    finally:
        model.to(torch.float32)


def test_padded_batch_rows_answer_as_alone(smollm):
    from hf_subtok.tasks import load_text

    model, tokenizer = smollm
    book = load_text("haystack")[:1400]
    questions = [
        f"Read this passage.\n\n{book}\n\nWho is the narrator's family servant?",  # ~350 tokens
        "What is the capital of France?",  # below the floor
        f"{book[:700]}\n\nSummarize the passage in one sentence.",  # ~200 tokens
    ]
    chats = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        for q in questions
    ]
    batch = tokenizer(chats, return_tensors="pt", padding=True, add_special_tokens=False)
    for config in ("balanced",):
        rows = _greedy(model, SubTokenCache(model, config), batch)
        for row, chat in enumerate(chats):
            alone = tokenizer(chat, return_tensors="pt", add_special_tokens=False)
            expected = _greedy(model, SubTokenCache(model, config), alone)[0]
            assert torch.equal(rows[row, : len(expected)], expected), (row, config)
