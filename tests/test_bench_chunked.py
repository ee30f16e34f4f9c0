"""Benchmark rows that prefill their prompt in chunks (`prefill_chunk=N`): the cache grows as
`generate(prefill_chunk_size=N)` grows it, so the quality cost of chunked against one-shot
compression is measured on the same cases as every other row."""

from __future__ import annotations

import csv

import pytest
import torch
from transformers import DynamicCache, GenerationConfig

from hf_subtok import SubTokenCache, cache_kwargs
from hf_subtok.bench import BenchConfig, method_run, parse_methods, run_bench
from hf_subtok.bench import apply as bench_apply
from hf_subtok.bench.prefill import dense_prefill
from hf_subtok.tasks import as_input_ids, build_needle_case
from tests.chunked_generate import skip_unless_chunk_positions_right

CHUNK = 64


def test_prefill_chunk_is_a_pair_of_subtok_and_dense_rows():
    by_chunk = {s.prefill_chunk: s for s in parse_methods("subtok:balanced+prefill_chunk=128,subtok:balanced", [0.5])}
    plain, chunked = by_chunk[None], by_chunk[128]
    assert chunked.options == plain.options  # not a SubTokenConfig field
    assert chunked.name == "subtok[balanced+prefill_chunk=128]@0.25" != plain.name
    [alone] = parse_methods("subtok:prefill_chunk=256@0.1", [0.5])
    assert (alone.name, alone.budget, alone.options) == ("subtok[prefill_chunk=256]@0.1", 0.1, ())
    dense, dense_chunked = parse_methods("dense,dense:prefill_chunk=32", [0.5])
    assert (dense.name, dense.prefill_chunk) == ("dense", None)
    assert (dense_chunked.name, dense_chunked.prefill_chunk) == ("dense[prefill_chunk=32]", 32)


@pytest.mark.parametrize(
    "text, match",
    [
        ("subtok:prefill_chunk=0", "prefill_chunk must be >= 1, got 0"),
        ("subtok:prefill_chunk=big", "prefill_chunk must be int, got 'big'"),
        ("subtok:prefill_chunk=8+prefill_chunk=16", "prefill_chunk is set twice"),
        ("dense:prefill_chunk=-4", "prefill_chunk must be >= 1, got -4"),
        ("dense:window=4", "method 'dense' takes no budget or press"),
    ],
)
def test_bad_prefill_chunks_raise_naming_the_value(text, match):
    with pytest.raises(ValueError, match=match):
        parse_methods(text, [0.5])


def _rows(result, method):
    return {(r["suite"], r.get("setting")): r for r in result["rows"] if r["method"] == method}


def test_chunked_rows_of_storage_that_drops_nothing_equal_dense(tmp_path, tiny_chat_model, smollm_tokenizer):
    """Dense and lossless storage filled in chunks answer as the one-shot dense row does."""
    methods = parse_methods(f"dense,dense:prefill_chunk={CHUNK},subtok:lossless+prefill_chunk={CHUNK}", [0.5])
    config = BenchConfig(suites=["needle", "ppl"], methods=methods, budgets=[0.5], needle_lengths=[256],
                         needle_depths=[0.5], ppl_prefix_lengths=[200], ppl_eval_tokens=24, max_new_tokens=6,
                         out_dir=str(tmp_path))
    result = run_bench(config, tiny_chat_model, smollm_tokenizer, command="test")
    dense = _rows(result, "dense")
    assert set(dense) == {("needle", "in_prompt"), ("needle", "after"), ("ppl", None)}
    for name in (f"dense[prefill_chunk={CHUNK}]", f"subtok[lossless+prefill_chunk={CHUNK}]"):
        rows = _rows(result, name)
        assert set(rows) == set(dense) and all(r["status"] == "ok" and r["prefill_chunk"] == CHUNK for r in rows.values())
        for setting in ("in_prompt", "after"):
            assert rows["needle", setting]["answer"] == dense["needle", setting]["answer"], (name, setting)
        assert rows["ppl", None]["nll"] == pytest.approx(dense["ppl", None]["nll"], rel=1e-4), name


def test_a_chunked_subtok_row_holds_what_generate_leaves_in_chunks(tiny_chat_model, smollm_tokenizer):
    """The oracle is transformers' own chunked prefill (`prefill_chunk_size`) through a fresh
    cache: the same stored tensors, and the same first token from the row's own logits."""
    skip_unless_chunk_positions_right()
    model = tiny_chat_model
    ids = as_input_ids(build_needle_case(smollm_tokenizer, 400, 0.5, 0).prompt_ids)
    [spec] = parse_methods(f"subtok:recipe=none+prefill_chunk={CHUNK}@0.3", [0.5])
    built = bench_apply.build_cache(spec, model, dense_prefill(model, ids, capture_hidden=False), window=64, input_ids=ids)

    reference = SubTokenCache(model, bench_apply.subtok_config(spec.budget, 64, spec.options))
    generation = GenerationConfig(max_new_tokens=1, do_sample=False, prefill_chunk_size=CHUNK, pad_token_id=0)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=generation,
                             **cache_kwargs(reference))
    assert int(built.last_logits.argmax(-1)) == int(out[0, -1])
    for ours, theirs in zip(built.cache.layers, reference.layers, strict=True):
        for name, tensor in theirs.stored_tensors().items():
            assert torch.equal(ours.stored_tensors()[name], tensor), name
    assert built.stored_bytes == reference.memory_report()["stored_bytes"] < built.dense_bytes / 2


def test_build_cache_refuses_a_chunked_row_without_its_tokens(tiny_chat_model, smollm_tokenizer):
    ids = as_input_ids(build_needle_case(smollm_tokenizer, 200, 0.5, 0).prompt_ids)
    [spec] = parse_methods(f"dense:prefill_chunk={CHUNK}", [0.5])
    with pytest.raises(ValueError, match="prefills in chunks: build_cache needs input_ids"):
        bench_apply.build_cache(spec, tiny_chat_model, dense_prefill(tiny_chat_model, ids, capture_hidden=False), window=None)


def test_memory_suite_prefills_chunked_rows_a_chunk_at_a_time(tiny_chat_model, smollm_tokenizer, monkeypatch):
    """`method_run.prefill` (the memory and throughput suites) feeds every row of a batch in
    chunks: the cache sees each chunk, and the logits are the one-shot dense logits."""
    ids = torch.randint(0, len(smollm_tokenizer), (2, 3 * CHUNK + 5), generator=torch.Generator().manual_seed(0))
    [spec] = parse_methods(f"dense:prefill_chunk={CHUNK}", [0.5])
    seen = []
    original = DynamicCache.update

    def counting(self, keys, values, layer_idx, *args, **kwargs):
        if layer_idx == 0:
            seen.append(keys.shape[-2])  # [B, Hkv, chunk, D]
        return original(self, keys, values, layer_idx, *args, **kwargs)

    monkeypatch.setattr(DynamicCache, "update", counting)
    cache, logits, _, info = method_run.prefill(tiny_chat_model, spec, ids, None, None)
    monkeypatch.undo()
    assert seen == [CHUNK, CHUNK, CHUNK, 5] and info == {}
    with torch.no_grad():
        one_shot = tiny_chat_model(input_ids=ids, use_cache=False).logits[:, -1]  # [B, V]
    torch.testing.assert_close(logits, one_shot, rtol=1e-4, atol=1e-4)
    assert cache.get_seq_length() == ids.shape[1]


def test_memory_suite_compares_chunked_rows_with_dense_in_the_same_chunks(tmp_path, tiny_chat_model, smollm_tokenizer):
    """A chunked row's ratios are against dense prefilled in the same chunks, a one-shot row's
    against one-shot dense. (Whether chunking lowers the peak is measured on the real model in
    BENCHMARKS.md: on this tiny model fixed per-layer transients outweigh its KV.)"""
    methods = parse_methods(f"dense,dense:prefill_chunk={CHUNK},subtok@0.5,subtok:prefill_chunk={CHUNK}@0.5", [0.5],
                            have_kvpress=False)
    config = BenchConfig(suites=["memory"], methods=methods, memory_contexts=[512], memory_batch=None,
                         memory_repeats=1, memory_new_tokens=2, out_dir=str(tmp_path), window=8)
    result = run_bench(config, tiny_chat_model, smollm_tokenizer)
    peak = {r["method"]: r["peak_alloc_bytes"] for r in result["rows"] if r["status"] == "ok"}
    assert len(peak) == 4, result["rows"]
    with open(result["paths"]["footprint_csv"]) as f:
        summary = {s["method"]: s for s in csv.DictReader(f)}
    chunked = summary[f"subtok[prefill_chunk={CHUNK}]@0.5"]
    assert float(chunked["peak_vs_dense"]) == pytest.approx(peak[f"subtok[prefill_chunk={CHUNK}]@0.5"] / peak[f"dense[prefill_chunk={CHUNK}]"], rel=1e-3)
    assert float(summary["subtok@0.5"]["peak_vs_dense"]) == pytest.approx(peak["subtok@0.5"] / peak["dense"], rel=1e-3)
