"""The `qa` family of the RULER-style suite: questions built from the shipped book.

RULER's QA tasks take SQuAD/HotpotQA questions and hide the gold paragraph among
distractor documents. No such data set ships here, so the questions are cloze questions on
the book (`haystack.txt`), built by rule, with no judgement involved:

- documents are the book's paragraphs (whitespace collapsed);
- a sentence is eligible when it has 8 to 40 words and occurs once in the book;
- in it, a word is eligible when it has at least five letters, is not part of a hyphenated or
  apostrophe compound, occurs at most three times in the whole book (so it is a content word
  the model cannot guess from frequency, and a short common word cannot match a rambling
  answer by accident), occurs once in the sentence, and does not occur inside the rest of
  the sentence (copying the question cannot score);
- the question quotes the sentence with that word replaced by `_____` and asks for it; the
  expected answer is the word (a span of the gold document), scored with RULER's
  `string_match_part`.

The case's random generator picks one (paragraph, sentence, word) among those whose
paragraph fits in a quarter of the target length, a depth for the gold document, and the
order of the other paragraphs; the last distractor is cut at a word to fill the length.
"""

from __future__ import annotations

import re
from collections import Counter
from functools import lru_cache

from hf_subtok.tasks import _SENTENCE, load_text

QA_INSTRUCTION = "Answer the question based on the given documents. Only give me the answer and do not output any other words."
BLANK = "_____"
MAX_BOOK_COUNT = 3
_WORD = re.compile(r"(?<![\w'-])[A-Za-z]{5,}(?![\w'-])")


@lru_cache(maxsize=1)
def paragraphs() -> tuple[str, ...]:
    """The book's paragraphs, whitespace collapsed."""
    return tuple(" ".join(p.split()) for p in load_text("haystack").split("\n\n") if p.strip())


@lru_cache(maxsize=1)
def cloze_candidates() -> tuple[tuple[int, str, str], ...]:
    """Every eligible `(paragraph index, blanked sentence, missing word)`, in book order."""
    book = "\n".join(paragraphs())
    counts = Counter(re.findall(r"[a-z]+", book.lower()))
    out = []
    for p, paragraph in enumerate(paragraphs()):
        for sentence in (" ".join(s.split()) for s in _SENTENCE.findall(paragraph)):
            if not 8 <= len(sentence.split()) <= 40 or book.count(sentence) != 1:
                continue
            for word in dict.fromkeys(_WORD.findall(sentence)):
                if counts[word.lower()] > MAX_BOOK_COUNT:
                    continue
                blanked = re.sub(rf"(?<![\w'-]){word}(?![\w'-])", BLANK, sentence, count=1)
                if word.lower() not in blanked.lower():
                    out.append((p, blanked, word))
    return tuple(out)


def qa_task(rng, target: int):
    """`(render, expected, limit)` of one QA case (see `ruler.build_ruler_case`).

    `render(n)` gives `(context, question, answer prefix)` with `n` words of distractor
    documents; `limit` is the number of distractor words the book holds.
    """
    docs_all = paragraphs()
    candidates = [c for c in cloze_candidates() if len(docs_all[c[0]].split()) <= target // 4]
    if not candidates:
        raise ValueError(f"context_tokens={target} is too short for qa: no paragraph of the book fits")
    gold, blanked, word = rng.choice(candidates)
    others = [p for i, p in enumerate(docs_all) if i != gold]
    rng.shuffle(others)
    depth = rng.random()
    intro = f"{QA_INSTRUCTION}\n\nThe following are given documents.\n\n"
    query = f'What is the missing word, shown as {BLANK}, in this sentence from one of the documents: "{blanked}"'
    question = f"{QA_INSTRUCTION}\n\nQuestion: {query}"

    def render(n: int):
        docs, left = [], n
        for paragraph in others:
            if left <= 0:
                break
            words = paragraph.split()
            docs.append(" ".join(words[:left]))
            left -= len(words)
        docs.insert(round(depth * len(docs)), docs_all[gold])
        context = "\n\n".join(f"Document {i + 1}:\n{d}" for i, d in enumerate(docs))
        return intro + context + "\n\n", question, "Answer:"

    return render, [word], sum(len(p.split()) for p in others)
