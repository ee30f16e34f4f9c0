"""Evaluation tasks on the shipped texts: pass-key retrieval and perplexity.

Pure functions: they only tokenize, never run a model. Token ids are plain ``list[int]``;
``as_input_ids`` turns one into the ``[1, T]`` tensor that ``generate`` takes.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from importlib import resources

import torch

TEXTS = ("haystack", "ppl", "legal")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? Answer with the number only."
INTRO = (
    "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the pass key."
)
# A sentence ends at . ! or ? (possibly closed by quotes or brackets) followed by whitespace.
# Each piece keeps the whitespace before it, so that it tokenizes alone as it does in the text
# (byte-level BPE glues a space to the word after it).
_SENTENCE = re.compile(r"\s*.+?(?:[.!?]+[\"')\]]*(?=\s)|\S$)", re.S)


def load_text(name: str) -> str:
    """Return a shipped text: ``"haystack"`` (needle filler), ``"ppl"`` (perplexity, the same
    book) or ``"legal"`` (perplexity, the US Constitution)."""
    if name not in TEXTS:
        raise ValueError(f"name={name!r} is not a shipped text; choose one of {TEXTS}")
    return (resources.files("hf_subtok") / "data" / f"{name}.txt").read_text(encoding="utf-8")


def as_input_ids(ids: list[int]) -> torch.Tensor:
    """``[T]`` list of token ids -> ``[1, T]`` long tensor."""
    return torch.tensor([ids], dtype=torch.long)


@dataclass(frozen=True)
class NeedleCase:
    """One pass-key retrieval prompt, tokenized two ways.

    ``prompt_ids`` (``[T]``) is the whole chat prompt: intro, haystack with the needle, question,
    and the assistant header; generate from it to compress the question with the context.
    ``context_ids + question_ids == prompt_ids`` token for token: compress ``context_ids`` first
    and feed ``question_ids`` afterwards (the question withheld, as in kvpress's pipeline).
    """

    prompt_ids: list[int]
    context_ids: list[int]
    question_ids: list[int]
    pass_key: str
    depth: float  # requested relative depth of the needle in the haystack, in [0, 1]
    needle_span: tuple[int, int]  # [start, end) of the needle's tokens in prompt_ids
    haystack_span: tuple[int, int]  # [start, end) of haystack + needle in prompt_ids
    question: str = QUESTION

    @property
    def answer(self) -> str:
        return self.pass_key

    @property
    def actual_depth(self) -> float:
        """Where the needle really sits: haystack tokens before it / all haystack tokens."""
        start, end = self.haystack_span
        needle_start, needle_end = self.needle_span
        return (needle_start - start) / max(end - start - (needle_end - needle_start), 1)

    def is_correct(self, generated_text: str) -> bool:
        """True when the five digits of the pass key appear as one number."""
        return re.search(rf"(?<!\d){self.pass_key}(?!\d)", generated_text) is not None


@dataclass(frozen=True)
class PplCase:
    """Perplexity input: ``prefix_ids`` (``[P]``) conditions, ``eval_ids`` (``[E]``) is scored."""

    prefix_ids: list[int]
    eval_ids: list[int]


def build_needle_case(tokenizer, context_tokens: int, depth: float, seed: int) -> NeedleCase:
    """Build a pass-key prompt of about ``context_tokens`` tokens.

    Args:
        tokenizer: a fast tokenizer (offsets are used to split context and question).
        context_tokens: target length of the whole prompt, ``len(prompt_ids)``; the haystack is
            cut on a sentence boundary, so the prompt is at most this long and shorter by less
            than one sentence (measured: 992 for 1000, 1993 for 2000, 7978 for 8000).
        depth: relative position of the needle in the haystack, 0 = start, 1 = end.
        seed: picks the 5-digit pass key.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth!r} must be in [0, 1]")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"tokenizer={type(tokenizer).__name__} must be a fast tokenizer")
    pass_key = str(random.Random(seed).randint(10_000, 99_999))
    needle = NEEDLE.format(key=pass_key)
    sentences = _SENTENCE.findall(load_text("haystack").strip())
    lengths = [len(ids) for ids in tokenizer(sentences, add_special_tokens=False).input_ids]

    overhead = len(_render(tokenizer, needle)[0].input_ids)
    budget = context_tokens - overhead
    if budget < 16:
        raise ValueError(
            f"context_tokens={context_tokens} is too short: the prompt without haystack "
            f"already takes {overhead} tokens"
        )
    if budget > sum(lengths):
        raise ValueError(
            f"context_tokens={context_tokens} is longer than the shipped haystack allows "
            f"(at most about {sum(lengths) + overhead})"
        )
    n = _count_within(lengths, budget)
    while True:
        at = _count_within(lengths[:n], depth * sum(lengths[:n]), nearest=True)
        # The needle stands as its own paragraph between two sentences of the prose.
        before, after = "".join(sentences[:at]), "".join(sentences[at:n]).lstrip()
        haystack = "\n\n".join(part for part in (before, needle, after) if part)
        full, split, spans = _render(tokenizer, haystack, needle_at=len(before) + 2 * bool(before))
        if len(full.input_ids) <= context_tokens or n == 0:
            break
        n -= 1  # rare: sentences joined may tokenize a little longer than their sum

    ids = full.input_ids
    offsets = full.offset_mapping
    k = _token_at(offsets, split)
    if offsets[k][0] != split:
        raise ValueError(
            f"tokenizer={type(tokenizer).__name__} merges the context's end with the question; "
            "cannot split the prompt into context and question"
        )
    hay_start, needle_char, hay_end = spans
    needle_end = needle_char + len(needle)
    return NeedleCase(
        prompt_ids=list(ids),
        context_ids=list(ids[:k]),
        question_ids=list(ids[k:]),
        pass_key=pass_key,
        depth=depth,
        needle_span=(_token_at(offsets, needle_char), _token_at(offsets, needle_end)),
        haystack_span=(_token_at(offsets, hay_start), _token_at(offsets, hay_end)),
    )


def build_ppl_case(tokenizer, prefix_tokens: int, eval_tokens: int, text: str = "ppl") -> PplCase:
    """Cut ``prefix_tokens + eval_tokens`` consecutive tokens from the start of ``text``: a
    shipped text (``"ppl"`` or its alias ``"book"``, ``"legal"``) or the path of a UTF-8 file."""
    if prefix_tokens < 0:
        raise ValueError(f"prefix_tokens={prefix_tokens!r} must be >= 0")
    if eval_tokens < 2:
        raise ValueError(f"eval_tokens={eval_tokens!r} must be >= 2")
    ids = tokenizer(_ppl_text(text), add_special_tokens=False, verbose=False).input_ids
    if prefix_tokens + eval_tokens > len(ids):
        raise ValueError(
            f"prefix_tokens + eval_tokens = {prefix_tokens + eval_tokens} exceeds the "
            f"{len(ids)} tokens of the ppl text {text!r}"
        )
    return PplCase(
        prefix_ids=list(ids[:prefix_tokens]),
        eval_ids=list(ids[prefix_tokens : prefix_tokens + eval_tokens]),
    )


def _ppl_text(text: str) -> str:
    name = "ppl" if text == "book" else text
    if name in TEXTS:
        return load_text(name)
    try:
        with open(text, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"text={text!r} is neither a shipped text ({', '.join(TEXTS)}, book) nor a readable "
                         f"file: {e.strerror}") from None


def _render(tokenizer, haystack: str, needle_at: int = 0):
    """Tokenize the chat prompt around ``haystack``.

    Returns the encoding (with offsets), the character where the question starts, and the
    characters where the haystack starts, the needle starts and the haystack ends.
    """
    context = f"{INTRO}\n\n{haystack}\n\n"
    user = context + QUESTION
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], add_generation_prompt=True, tokenize=False
        )
    else:
        text = user + "\nAnswer:"
    begin = text.index(user)
    hay_start = begin + len(INTRO) + 2
    spans = (hay_start, hay_start + needle_at, hay_start + len(haystack))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    return enc, begin + len(context), spans


def _count_within(lengths: list[int], limit: float, nearest: bool = False) -> int:
    """How many leading items fit in ``limit`` (or whose running sum lands nearest to it)."""
    total = 0
    for i, n in enumerate(lengths):
        if total + n > limit:
            if nearest and (limit - total) > (total + n - limit):
                return i + 1
            return i
        total += n
    return len(lengths)


def _token_at(offsets, char: int) -> int:
    """Index of the first token that ends after ``char`` (the token holding it)."""
    for i, (_, end) in enumerate(offsets):
        if end > char:
            return i
    return len(offsets)
