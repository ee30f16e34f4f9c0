"""Shipped texts, pass-key cases and perplexity cases (tokenizer only, except one slow test)."""

from __future__ import annotations

import pytest
import torch

from hf_subtok.tasks import (
    NEEDLE,
    NeedleCase,
    as_input_ids,
    build_needle_case,
    build_ppl_case,
    load_text,
)


@pytest.mark.parametrize("name", ["haystack", "ppl"])
def test_shipped_texts_are_clean_prose(name):
    text = load_text(name)
    assert len(text.split()) > 7000
    for junk in ("Gutenberg", "[Footnote", "CHAPTER", "\r"):
        assert junk not in text
    assert text.isascii()


def test_texts_are_disjoint():
    haystack = set(load_text("haystack").split("\n\n"))
    assert not haystack & set(load_text("ppl").split("\n\n"))


def test_unknown_text_is_a_value_error():
    with pytest.raises(ValueError, match="name='wiki'"):
        load_text("wiki")


@pytest.mark.parametrize("length", [500, 1000, 2000, 8000])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_needle_case_invariants(smollm_tokenizer, length, depth):
    tok = smollm_tokenizer
    case = build_needle_case(tok, length, depth, seed=7)
    assert case.context_ids + case.question_ids == case.prompt_ids
    assert 0.97 * length <= len(case.prompt_ids) <= length
    assert abs(case.actual_depth - depth) < 0.05
    key = case.pass_key
    assert len(key) == 5 and key.isdigit() and case.answer == key
    start, end = case.needle_span
    assert tok.decode(case.prompt_ids[start:end]) == NEEDLE.format(key=key)
    # the question is withheld from the context; the key is only in the context
    context, question = tok.decode(case.context_ids), tok.decode(case.question_ids)
    assert key in context and key not in question
    assert question.startswith(case.question) and question.endswith("<|im_start|>assistant\n")
    assert tok.decode(case.prompt_ids).startswith("<|im_start|>system")


def test_needle_cases_are_deterministic_and_seeded(smollm_tokenizer):
    a = build_needle_case(smollm_tokenizer, 1000, 0.5, seed=1)
    assert a == build_needle_case(smollm_tokenizer, 1000, 0.5, seed=1)
    assert a.pass_key != build_needle_case(smollm_tokenizer, 1000, 0.5, seed=2).pass_key


def test_needle_is_correct():
    c = NeedleCase([1], [1], [], "48213", 0.5, (0, 1), (0, 1))
    assert c.is_correct("The pass key is 48213.")
    assert c.is_correct("48213")
    assert not c.is_correct("The pass key is 4821.")
    assert not c.is_correct("The pass key is 148213.")


@pytest.mark.parametrize(
    ("length", "depth", "match"),
    [
        (1000, 1.5, "depth=1.5"),
        (1000, -0.1, "depth=-0.1"),
        (40, 0.5, "context_tokens=40"),
        (10**6, 0.5, "context_tokens=1000000"),
    ],
)
def test_needle_bad_arguments(smollm_tokenizer, length, depth, match):
    with pytest.raises(ValueError, match=match):
        build_needle_case(smollm_tokenizer, length, depth, seed=0)


def test_ppl_case(smollm_tokenizer):
    tok = smollm_tokenizer
    case = build_ppl_case(tok, 1024, 512)
    assert len(case.prefix_ids) == 1024 and len(case.eval_ids) == 512
    whole = tok(load_text("ppl"), add_special_tokens=False, verbose=False).input_ids
    assert case.prefix_ids + case.eval_ids == whole[:1536]
    assert build_ppl_case(tok, 0, 16).eval_ids == whole[:16]
    for args, match in [
        ((-1, 16), "prefix_tokens=-1"),
        ((0, 1), "eval_tokens=1"),
        ((10**6, 16), "exceeds"),
    ]:
        with pytest.raises(ValueError, match=match):
            build_ppl_case(tok, *args)


def test_as_input_ids():
    ids = as_input_ids([3, 4, 5])
    assert ids.shape == (1, 3) and ids.dtype == torch.long


@pytest.mark.slow
@pytest.mark.newest_only  # a DynamicCache and transformers' generate: no hf_subtok code but the task
def test_dense_needle_accuracy_1k(smollm):
    """The uncompressed model finds the pass key in >= 9 of 10 prompts of 1k tokens."""
    model, tok = smollm
    correct = []
    for i in range(10):
        case = build_needle_case(tok, 1000, depth=i / 9, seed=i)
        ids = as_input_ids(case.prompt_ids)
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False
        )
        correct.append(
            case.is_correct(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
        )
    assert sum(correct) >= 9, correct
