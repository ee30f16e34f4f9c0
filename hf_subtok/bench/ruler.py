"""RULER-style long-context tasks generated locally from the shipped book, and their scorers.

Eight families after RULER (Hsieh et al., 2024, arXiv 2404.06654; templates and metrics as in
NVIDIA/RULER `scripts/data/synthetic` and `scripts/eval/synthetic/constants.py`):

- `niah_single`, `niah_multikey` (4 keys, one asked), `niah_multivalue` (one key, 4 values,
  all asked), `niah_multiquery` (4 keys, all asked): "One of the special magic numbers for
  {key} is: {value}." sentences hidden in the book (`haystack.txt`) at sentence boundaries.
- `vt`: one chain `VAR A = 12345`, `VAR B = VAR A`, ... (4 hops) in RULER's repeated noise;
  asks every variable holding the value.
- `cwe`: a numbered list of the book's words (5-10 letters); 10 appear 30 times (6 below 4k tokens, 3 below
  1k), the others 3 times (1 below 4k); asks the 10 most common.
- `fwe`: random 6-letter coded words with Zipf (alpha 2) counts, the top one replaced by
  `...` noise; asks the 3 most frequent.
- `qa`: RULER's document QA with the book's paragraphs as documents and a cloze question
  whose answer is one word of the gold paragraph (how it is built: `ruler_qa`).

Each case is a pure function of (family, context_tokens, index, seed) and the tokenizer.
Scoring: RULER's `string_match_all` (fraction of expected strings found in the answer,
case-insensitive) for every family but `qa`, which uses `string_match_part` (1 when any
accepted answer is found). RULER's one-shot examples (vt, cwe) are left out.
"""

from __future__ import annotations

import math
import random
import re
import string
from dataclasses import dataclass
from functools import lru_cache

from hf_subtok.bench.ruler_qa import qa_task
from hf_subtok.tasks import _SENTENCE, load_text

FAMILIES = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa")
# RULER's tokens_to_generate per family
MAX_NEW_TOKENS = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50, "qa": 32}
NIAH_SHAPES = {  # family -> (keys, values per key, keys asked)
    "niah_single": (1, 1, 1), "niah_multikey": (4, 1, 1), "niah_multivalue": (1, 4, 1), "niah_multiquery": (4, 1, 4),
}
NEEDLE = "One of the special magic numbers for {key} is: {value}."
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
_ADJECTIVES = ("ancient bitter brave calm clever crooked curious eager fancy fierce gentle glossy grumpy hollow humble "
               "jolly lazy lively lucky misty narrow noisy polite quiet rapid silent sleepy sturdy tender vivid wicked "
               "witty").split()
_NOUNS = ("anchor badger banjo beacon blossom canyon cobweb comet cricket dagger falcon ferret garden harbor kettle "
          "lantern lemon marble meadow needle orchard otter pebble pepper puzzle raven saddle spider thimble tulip "
          "walnut willow").split()


@dataclass(frozen=True)
class RulerCase:
    """One task prompt, tokenized two ways (as `tasks.NeedleCase`).

    `prompt_ids` (`[T]`) is the chat prompt ending in the assistant header and RULER's answer
    prefix; `context_ids + question_ids == prompt_ids`, the split falling where the question
    starts (compress `context_ids` first, then feed `question_ids`: the withheld setting).
    """

    family: str
    context_tokens: int  # the target; len(prompt_ids) is at most this
    index: int
    seed: int
    prompt_ids: list[int]
    context_ids: list[int]
    question_ids: list[int]
    question: str
    answer_prefix: str
    expected: tuple[str, ...]

    @property
    def metric(self) -> str:
        return "string_match_part" if self.family == "qa" else "string_match_all"

    @property
    def max_new_tokens(self) -> int:
        return MAX_NEW_TOKENS[self.family.split("_")[0]]

    def score(self, answer: str) -> float:
        """RULER's score of one generated answer (the text after the answer prefix), in [0, 1]."""
        fn = string_match_part if self.family == "qa" else string_match_all
        return fn(answer, self.expected)


def postprocess(answer: str) -> str:
    """RULER's `postprocess_pred`: strip, control characters become newlines."""
    return re.sub(r"[\x00-\x1f]", "\n", answer.strip()).strip()


def string_match_all(answer: str, refs) -> float:
    """Fraction of `refs` found in `answer` (case-insensitive): RULER's metric for all but QA."""
    answer = postprocess(answer).lower()
    return sum(r.lower() in answer for r in refs) / len(refs)


def string_match_part(answer: str, refs) -> float:
    """1.0 when any of `refs` is in `answer` (case-insensitive), else 0.0: RULER's QA metric."""
    answer = postprocess(answer).lower()
    return float(any(r.lower() in answer for r in refs))


def build_ruler_case(tokenizer, family: str, context_tokens: int, index: int = 0, seed: int = 0) -> RulerCase:
    """Build case `index` of `family` with a prompt of at most `context_tokens` tokens.

    The filler (book words, noise lines, list entries, coded words, document words) is the
    largest amount that fits, found by bisection on the real tokenization; the prompt ends
    within about 1% of the target from 2k tokens up.
    """
    if family not in FAMILIES:
        raise ValueError(f"family={family!r} must be one of {', '.join(FAMILIES)}")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"tokenizer={type(tokenizer).__name__} must be a fast tokenizer")
    rng = random.Random(f"ruler|{family}|{context_tokens}|{index}|{seed}")
    task = {"vt": _vt, "cwe": _cwe, "fwe": _fwe, "qa": _qa}.get(family, _niah)(family, rng, context_tokens)
    if _encode(tokenizer, *task.render(0))[0] > context_tokens:
        raise ValueError(f"context_tokens={context_tokens} is too short for {family}: the prompt without filler is longer")
    lo, hi = 0, min(context_tokens, task.limit or context_tokens)
    while lo < hi:  # the largest filler amount whose prompt fits
        mid = (lo + hi + 1) // 2
        if _encode(tokenizer, *task.render(mid))[0] <= context_tokens:
            lo = mid
        else:
            hi = mid - 1
    context, question, prefix = task.render(lo)
    length, enc, split = _encode(tokenizer, context, question, prefix, offsets=True)
    if lo == task.limit and length < 0.98 * context_tokens:
        raise ValueError(f"context_tokens={context_tokens} is longer than the shipped book allows for {family} "
                         f"(at most about {length})")
    if task.check:
        task.check(lo)
    ids = list(enc.input_ids)
    k = next((i for i, (_, end) in enumerate(enc.offset_mapping) if end > split), len(ids))
    if enc.offset_mapping[k][0] != split:
        raise ValueError(f"tokenizer={type(tokenizer).__name__} merges the context's end with the question")
    return RulerCase(family, context_tokens, index, seed, ids, ids[:k], ids[k:], question, prefix, tuple(task.expected))


def _encode(tokenizer, context: str, question: str, prefix: str, offsets: bool = False):
    """(tokens, encoding, character where the question starts) of the chat prompt."""
    user = context + question
    if getattr(tokenizer, "chat_template", None):
        head = tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True, tokenize=False)
        text = head + prefix
    else:
        text = user + "\n\n" + prefix
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=offsets, verbose=False)
    return len(enc.input_ids), enc, text.index(user) + len(context)


# --- the shipped book -------------------------------------------------------------------


@lru_cache(maxsize=1)
def _book_sentences() -> tuple[str, ...]:
    text = load_text("haystack")
    return tuple(" ".join(s.split()) for s in _SENTENCE.findall(text.strip()))


def _book_words(start: int, n: int) -> list[str]:
    """`n` words of the book from sentence `start` on (cycling), as sentences; the last may be cut."""
    sentences, out, left = _book_sentences(), [], n
    i = start
    while left > 0:
        words = sentences[i % len(sentences)].split()
        out.append(" ".join(words[:left]))
        left -= len(words)
        i += 1
    return out


def _insert(pieces: list[str], items: list[str], depths: list[float]) -> list[str]:
    """`items` placed between `pieces` at relative `depths` (sorted pairs keep their order)."""
    out = list(pieces)
    for item, depth in sorted(zip(items, depths, strict=True), key=lambda p: p[1], reverse=True):
        out.insert(round(depth * len(pieces)), item)
    return out


# --- families -----------------------------------------------------------------------------


def _niah(family, rng, target):
    n_keys, n_values, n_asked = NIAH_SHAPES[family]
    keys = rng.sample([f"{a}-{b}" for a in _ADJECTIVES for b in _NOUNS], n_keys)
    values = [[str(rng.randint(10**6, 10**7 - 1)) for _ in range(n_values)] for _ in keys]
    needles = [NEEDLE.format(key=k, value=v) for k, vs in zip(keys, values, strict=True) for v in vs]
    rng.shuffle(needles)
    depths = [d / 39 for d in rng.sample(range(40), len(needles))]  # RULER: 40 depths from 0 to 100%
    start = rng.randrange(len(_book_sentences()))
    asked = rng.sample(range(n_keys), n_asked)
    query = keys[asked[0]] if n_asked == 1 else ", ".join(keys[i] for i in asked[:-1]) + ", and " + keys[asked[-1]]
    one = n_asked * n_values == 1
    kind, are = ("number", "is") if one else ("numbers", "are")
    intro = (f"{'A' if one else 'Some'} special magic {kind} {are} hidden within the following text. "
             f"Make sure to memorize it. I will quiz you about the {kind} afterwards.\n")
    question = f"What {'is the' if one else 'are all the'} special magic {kind} for {query} mentioned in the provided text?"
    prefix = f"The special magic {kind} for {query} mentioned in the provided text {are}"

    def render(n):
        return intro + " ".join(_insert(_book_words(start, n), needles, depths)) + "\n", question, prefix

    return _Task(render, [v for i in asked for v in values[i]])


def _vt(family, rng, target, hops: int = 4):
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        names += [name] if name not in names else []
    value = str(rng.randint(10_000, 99_999))
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]}" for j in range(hops)]
    depths = sorted(rng.random() for _ in chain)
    intro = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    question = f"Question: Find all variables that are assigned the value {value} in the text above."
    prefix = (f"Answer: According to the chain(s) of variable assignment in the text above, {hops + 1} variables "
              f"are assigned the value {value}, they are:")

    def render(n):
        return intro + "\n".join(_insert([NOISE] * n, chain, depths)) + "\n", question, prefix

    return _Task(render, names)


@lru_cache(maxsize=1)
def _book_vocabulary() -> tuple[str, ...]:
    """The book's lowercase words of 5-10 letters, less those inside another (so matching one
    listed word can never credit another)."""
    words = sorted({w for w in re.findall(r"\b[a-z]+\b", load_text("haystack")) if 5 <= len(w) <= 10})
    joined = "|".join(words)
    return tuple(w for w in words if joined.count(w) == 1)


def _cwe(family, rng, target, n_common: int = 10):
    common_repeats, rare_repeats = (30, 3) if target >= 4096 else (6, 1) if target >= 1024 else (3, 1)
    intro = ("Below is a numbered list of words. In these words, some appear more often than others. "
             "Memorize the ones that appear most often.\n")
    question = f"Question: What are the {n_common} most common words in the above list?"
    prefix = f"Answer: The top {n_common} words that appear most often in the list are:"
    words = [w for w in _book_vocabulary() if w not in (intro + question + prefix).lower()]  # echoes never score
    rng.shuffle(words)
    common, rare = words[:n_common], words[n_common:]
    shuffle_seed = rng.random()

    def render(n):
        items = common * common_repeats + rare[:n] * rare_repeats
        random.Random(f"{shuffle_seed}|{n}").shuffle(items)
        return intro + " ".join(f"{i + 1}. {w}" for i, w in enumerate(items)) + "\n", question, prefix

    return _Task(render, common, limit=len(rare))


def _fwe(family, rng, target, alpha: int = 2):
    size = max(target // 50, 8)  # RULER: a vocabulary of max_seq_length // 50 coded words
    vocab: list[str] = []
    while len(vocab) < size:
        word = "".join(rng.choices(string.ascii_lowercase, k=6))
        vocab += [word] if word not in vocab else []
    vocab[0] = "..."  # the most frequent "word" is noise
    zeta = math.pi**2 / 6  # zeta(alpha = 2)
    shuffle_seed = rng.random()
    intro = ("Read the following coded text and track the frequency of each coded word. "
             "Find the three most frequently appeared coded words. ")
    question = ("Question: Do not provide any explanation. Please ignore the dots '....'. "
                "What are the three most frequently appeared words in the above coded text?")
    prefix = "Answer: According to the coded text above, the three most frequently appeared words are:"

    def counts(n):
        return [int(n * k**-alpha / zeta) for k in range(1, size + 1)]

    def render(n):
        items = [w for w, c in zip(vocab, counts(n), strict=True) for _ in range(c)]
        random.Random(f"{shuffle_seed}|{n}").shuffle(items)
        return intro + " ".join(items) + "\n", question, prefix

    def check(n):
        c = counts(n)
        if not c[3] > c[4] > 0:  # the 3 answers (ranks 2-4) must beat every other coded word
            raise ValueError(f"context_tokens={target} is too short for fwe: its top 3 words are not distinct")

    return _Task(render, vocab[1:4], check=check)


def _qa(family, rng, target):
    render, expected, limit = qa_task(rng, target)
    return _Task(render, expected, limit=limit)


@dataclass(frozen=True)
class _Task:
    """A family's prompt as a function of the filler amount `n` (`render(n) -> (context,
    question, answer prefix)`), its expected answers, the largest `n` the shipped text allows,
    and a check of the chosen `n`."""

    render: object
    expected: list[str]
    limit: int | None = None
    check: object = None
