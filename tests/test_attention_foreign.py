"""A SubTokenCache read by an attention implementation other than hf-subtok's.

A layer's `update()` returns a `PrefillKV` (prompt of a layer that selects tokens) or a
`PackedKV` (packed storage), not key/value tensors. Code that takes either for a tensor gets a
`TypeError` naming the cause and the model's attention implementation.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from hf_subtok import SubTokenCache, SubTokenConfig
from hf_subtok.generate_args import cache_kwargs
from hf_subtok.views import PackedKV, PackedStorageError, PrefillKV
from tests.kernel_cases import Shape, make_packed
from tests.tiny_models import make_tiny_model, random_prompts

CUSTOM = "hf_subtok_test_custom"


def custom_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """A user's eager-style attention: `torch.matmul(query, key.transpose(2, 3))`."""
    repeat = module.num_key_value_groups  # query heads per KV head
    scores = torch.matmul(query, key.transpose(2, 3).repeat_interleave(repeat, 1)) * scaling
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask, float("-inf"))
    out = torch.matmul(scores.softmax(-1), value.repeat_interleave(repeat, 1))
    return out.transpose(1, 2).contiguous(), None


@pytest.fixture
def custom_registered():
    AttentionInterface.register(CUSTOM, custom_attention)
    yield CUSTOM
    ALL_ATTENTION_FUNCTIONS._global_mapping.pop(CUSTOM, None)


def _assert_names_the_cause(error: pytest.ExceptionInfo, implementation: str) -> None:
    message = str(error.value)
    assert isinstance(error.value, TypeError)
    assert "packed sub-token storage" in message
    assert "'hf_subtok' attention function" in message
    assert f"attention implementation is {implementation!r}" in message
    assert "install_attention(model)" in message and "DynamicCache" in message


@pytest.mark.parametrize(
    "config, kind",
    [(SubTokenConfig(budget=0.25, recipe=None), "PrefillKV"), ("groups-only", "PackedKV")],
    ids=["selects-tokens", "groups-only"],
)
def test_custom_attention_after_the_cache_gets_a_clear_error(custom_registered, config, kind):
    """The model switched to a custom implementation after the cache was built: `generate`
    fails at the first read of a layer's view (the prompt of a layer that selects tokens, the
    first decode step otherwise) with the cause named."""
    model = make_tiny_model("llama")
    cache = SubTokenCache(model, config)
    model.set_attn_implementation(custom_registered)
    with torch.no_grad(), pytest.raises(PackedStorageError) as error:
        model.generate(random_prompts(1, 300), past_key_values=cache, max_new_tokens=3, do_sample=False)
    _assert_names_the_cause(error, custom_registered)
    assert f"a {kind} " in str(error.value) and "(.transpose)" in str(error.value)


def test_sdpa_after_the_cache_gets_a_clear_error():
    model = make_tiny_model("llama")
    cache = SubTokenCache(model, "groups-only")
    model.set_attn_implementation("sdpa")
    with torch.no_grad(), pytest.raises(PackedStorageError) as error:
        model.generate(random_prompts(1, 300), past_key_values=cache, max_new_tokens=3, do_sample=False)
    _assert_names_the_cause(error, "sdpa")


def test_views_refuse_tensor_operations():
    """Outside a model: torch functions and tensor attributes on a view raise the error;
    ordinary attribute misses stay `AttributeError`s (`hasattr` keeps working)."""
    query, kv, keys, values = make_packed(Shape(stored=9, tail=3, head_dim=16, group=2, keep=2, groups=4), torch.float32)
    prefill = PrefillKV(keys, values, observer=lambda observation: None)
    for view in (kv, prefill):
        with pytest.raises(PackedStorageError, match="torch function matmul"):
            torch.matmul(query, view)
        with pytest.raises(PackedStorageError, match=r"\(\.shape\)"):
            view.shape  # noqa: B018
        with pytest.raises(PackedStorageError, match=type(view).__name__):
            sdpa_attention_forward(torch.nn.Module(), query, view, view, None)
        assert not hasattr(view, "no_such_attribute")
    assert isinstance(kv, PackedKV) and kv.num_tokens == 12  # its own attributes read as before


# --- another library wrapping hf-subtok's registered function (kvpress does on import) ----------


def _shape_reading_wrapper(function):
    """kvpress's `attention_patch`: reads `key.shape`, passes `dropout` by position."""

    def wrapper(module, query, key, value, attention_mask, dropout, **kwargs):
        if query.shape[2] == key.shape[2]:
            module.masked_key_indices = None
        return function(module, query, key, value, attention_mask, dropout, **kwargs)

    return wrapper


def _position_passing_wrapper(function):
    def wrapper(module, query, key, value, attention_mask, dropout, **kwargs):
        return function(module, query, key, value, attention_mask, dropout, **kwargs)

    return wrapper


@pytest.fixture
def restore_registered():
    """Wrappers are set as kvpress sets them (`ALL_ATTENTION_FUNCTIONS[name] = ...`, a local
    override of the global registration): dropped afterwards."""
    yield
    ALL_ATTENTION_FUNCTIONS._local_mapping.pop("hf_subtok", None)


def _greedy(model, cache, prompt):
    with torch.no_grad():
        return model.generate(prompt, **cache_kwargs(cache), max_new_tokens=4, do_sample=False)


def test_a_wrapper_over_the_registered_function_is_named_then_replaced_by_the_next_cache(restore_registered):
    """A wrapper registered after the cache was built that reads `key.shape` fails with the cause
    named; building the next cache registers hf-subtok's own function again, and the answer is the
    one the same cache gives with no wrapper ever registered."""
    model = make_tiny_model("llama")
    prompt = random_prompts(1, 300)
    unwrapped = _greedy(model, SubTokenCache(model, "groups-only"), prompt)
    cache = SubTokenCache(model, "groups-only")
    ALL_ATTENTION_FUNCTIONS["hf_subtok"] = _shape_reading_wrapper(ALL_ATTENTION_FUNCTIONS["hf_subtok"])
    with pytest.raises(PackedStorageError, match="other code replaced the function registered under that name"):
        _greedy(model, cache, prompt)
    assert torch.equal(_greedy(model, SubTokenCache(model, "groups-only"), prompt), unwrapped)


def test_a_wrapper_passing_dropout_by_position_gets_the_unwrapped_answer(restore_registered):
    """transformers' argument order (`dropout` before `scaling`): a wrapper that passes `dropout`
    by position reaches the function with both right, and the answer does not change."""
    model = make_tiny_model("llama")
    prompt = random_prompts(1, 300)
    unwrapped = _greedy(model, SubTokenCache(model, "groups-only"), prompt)
    cache = SubTokenCache(model, "groups-only")
    ALL_ATTENTION_FUNCTIONS["hf_subtok"] = _position_passing_wrapper(ALL_ATTENTION_FUNCTIONS["hf_subtok"])
    assert torch.equal(_greedy(model, cache, prompt), unwrapped)


def test_building_a_cache_after_importing_kvpress_works(restore_registered):
    """The real kvpress, imported after a cache was built in this process: the next cache answers as
    before the import."""
    model = make_tiny_model("llama")
    prompt = random_prompts(1, 300)
    before = _greedy(model, SubTokenCache(model, "groups-only"), prompt)
    pytest.importorskip("kvpress")
    from kvpress.attention_patch import attention_patch

    ALL_ATTENTION_FUNCTIONS["hf_subtok"] = attention_patch(ALL_ATTENTION_FUNCTIONS["hf_subtok"])  # `import kvpress`
    assert torch.equal(_greedy(model, SubTokenCache(model, "groups-only"), prompt), before)
