"""The cache keyword: `cache=` on transformers >= 5.25, `past_key_values=` before (issue 21.6).

On the newest version both names generate the same tokens (the old one with a FutureWarning),
and the package's own generate/forward calls (demo, bench) raise no FutureWarning.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from packaging.version import Version

from hf_subtok import CACHE_ARGUMENT, SubTokenCache, SubTokenConfig, cache_kwargs
from hf_subtok.bench.method_run import run_method
from hf_subtok.bench.methods import MethodSpec
from hf_subtok.bench.prefill import dense_prefill
from hf_subtok.demo import run_generate
from tests.tiny_models import make_tiny_model, random_prompts

COMPRESSING = SubTokenConfig(num_groups=8, keep_groups=4, window=8, pack_chunk=4, floor_tokens=0)
NEW_TOKENS = 24
RENAMED = Version(transformers.__version__) >= Version("5.25.0.dev0")
needs_rename = pytest.mark.skipif(not RENAMED, reason="transformers < 5.25 has no `cache=` keyword")


def _generate(model, ids, **cache_kwarg):
    with torch.no_grad():
        return model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS, do_sample=False, **cache_kwarg,
        )


def test_cache_argument_is_the_installed_versions_name():
    assert CACHE_ARGUMENT == ("cache" if RENAMED else "past_key_values")
    cache = object()
    assert cache_kwargs(cache) == {CACHE_ARGUMENT: cache}


@needs_rename
def test_new_and_old_names_generate_the_same_tokens():
    model = make_tiny_model("llama")
    ids = random_prompts(1, 40)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        new = _generate(model, ids, cache=(new_cache := SubTokenCache(model, COMPRESSING)))
    with pytest.warns(FutureWarning, match="past_key_values"):
        old = _generate(model, ids, past_key_values=(old_cache := SubTokenCache(model, COMPRESSING)))
    assert torch.equal(new, old)
    assert new_cache.get_seq_length() == old_cache.get_seq_length() == 40 + NEW_TOKENS - 1
    assert new_cache.memory_report()["ratio"] < 1.0, "the cache must have compressed"


def test_past_key_values_still_generates():
    """The only name on 5.2; still accepted (with a FutureWarning) on the newest version."""
    model = make_tiny_model("llama")
    ids = random_prompts(1, 40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        old = _generate(model, ids, past_key_values=SubTokenCache(model, COMPRESSING))
    assert old.shape == (1, 40 + NEW_TOKENS)
    assert torch.equal(old, _generate(model, ids, **cache_kwargs(SubTokenCache(model, COMPRESSING))))


class _Tokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(int(i)) for i in ids)


def test_package_generate_and_forward_calls_raise_no_future_warning():
    model = make_tiny_model("llama")
    ids = random_prompts(1, 40)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        result = run_generate(model, _Tokenizer(), ids, SubTokenCache(model, COMPRESSING), "subtok", 8)
        dense_prefill(model, ids, capture_hidden=False)
        for spec in (MethodSpec("dense"), MethodSpec("subtok", 0.5)):
            row = run_method(model, spec, ids, None, window=8, new_tokens=8)
            assert row["decode_tokens"] == 8
    assert len(result.answer.split()) == 8
