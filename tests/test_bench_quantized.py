"""transformers' `QuantizedCache` rows: bytes measured from its tensors, the shared prefill fed
through `update`, `--dtype`, and ablation rows, on tiny in-process models (plus one slow run
on the embedded model)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import QuantizedCache

from hf_subtok.bench import BenchConfig, MethodSpec, parse_methods, run_bench
from hf_subtok.bench import apply as bench_apply
from hf_subtok.bench import quantized_methods as qm
from hf_subtok.bench.prefill import dense_prefill
from hf_subtok.bench.quantized_bytes import leaf_tensors, quantized_cache_bytes
from hf_subtok.tasks import as_input_ids, build_needle_case
from tests.tiny_models import make_tiny_model

GROUP = 16  # the tiny models' head_dim; QuantizedCache's default 64 needs Hkv * T * D % 64 == 0


def _backends():
    return [pytest.param(b, marks=pytest.mark.skipif(qm.backend_problem(b) is not None, reason=f"{b} cannot run"))
            for b in qm.BACKENDS]


def _filled(model, backend, bits, tokens, decode_steps, residual_length=8):
    cache = QuantizedCache(backend=backend, config=model.config, nbits=bits, q_group_size=GROUP,
                           residual_length=residual_length)
    ids = torch.randint(3, 200, (1, tokens), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        for step in range(decode_steps):
            model(input_ids=ids[:, step : step + 1], past_key_values=cache, use_cache=True)
    return cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("backend", _backends())
def test_measured_bytes_are_codes_scales_zeros_and_residual(backend, bits, dtype):
    model = make_tiny_model("llama", dtype=dtype, head_dim=16)
    cfg = model.config
    tokens, steps = 40, 3
    cache = _filled(model, backend, bits, tokens, steps)
    held = quantized_cache_bytes(cache)
    item = dtype.itemsize
    per_layer_kv = 2 * cfg.num_hidden_layers  # keys and values of every layer
    values = cfg.num_key_value_heads * tokens * cfg.head_dim  # quantized elements per tensor
    assert held["codes"] == per_layer_kv * values * bits // 8
    assert held["metadata"] == per_layer_kv * (values // GROUP) * 2 * item  # one scale + one zero per group
    assert held["residual"] == per_layer_kv * cfg.num_key_value_heads * steps * cfg.head_dim * item
    assert held["other"] == 0
    assert held["total"] == held["codes"] + held["metadata"] + held["residual"]
    # the counted tensors are the plain ones inside the backend's objects (no wrapper counted)
    leaves = list(leaf_tensors(cache.layers[0]._quantized_keys))
    assert leaves and all(type(t) is torch.Tensor for t in leaves)


def test_a_view_is_counted_at_its_storage_once():
    class Layer:
        pass

    base = torch.zeros(10, dtype=torch.float32)
    layer = Layer()
    layer._quantized_keys = (torch.zeros(4, dtype=torch.uint8), {"scale": base[:2], "zero": base[2:4]})
    layer._quantized_values = None
    layer.keys, layer.values = torch.zeros(3), torch.tensor([])
    layer.pending = base
    held = quantized_cache_bytes(type("C", (), {"layers": [layer]})())
    assert held == {"codes": 4, "metadata": 40, "residual": 12, "other": 0, "total": 56}


@pytest.mark.parametrize("backend", _backends())
def test_shared_prefill_through_update_equals_a_prefill_through_the_cache(tiny_chat_model, smollm_tokenizer, backend):
    ids = as_input_ids(build_needle_case(smollm_tokenizer, 300, 0.5, 0).prompt_ids)
    options = {"q_group_size": GROUP}
    real = qm.make_cache(tiny_chat_model, backend, 4, options)
    with torch.no_grad():
        tiny_chat_model(input_ids=ids, past_key_values=real, use_cache=True)
    prefill = dense_prefill(tiny_chat_model, ids, capture_hidden=False)
    dense_keys = [k.clone() for k in prefill.keys]
    spec = MethodSpec("quantized", backend=backend, bits=4, options=tuple(options.items()))
    shared = bench_apply.build_cache(spec, tiny_chat_model, prefill, window=64)
    for ours, theirs, dense in zip(shared.cache.layers, real.layers, dense_keys, strict=True):
        for name in ("_quantized_keys", "_quantized_values"):
            assert torch.equal(ours._dequantize(getattr(ours, name)), theirs._dequantize(getattr(theirs, name))), name
        # the evaluation reads quantized keys: no prompt token is left in full precision
        assert ours.keys.numel() == 0 and not torch.equal(ours._dequantize(ours._quantized_keys), dense)
    assert torch.equal(prefill.keys[0], dense_keys[0])  # the shared prefill is not modified
    assert shared.stored_bytes == quantized_cache_bytes(real)["total"]
    assert shared.info["quantized_tokens"] == ids.shape[1] and shared.info["residual_tokens"] == 0
    assert shared.info["nbits"] == 4 and shared.info["q_group_size"] == GROUP and shared.info["residual_length"] == 128
    assert shared.dense_bytes == prefill.dense_bytes


def _config(tmp_path, methods, dtype="float32", suites=("needle", "ppl")) -> BenchConfig:
    return BenchConfig(suites=list(suites), methods=methods, budgets=[0.5], needle_lengths=[256], needle_depths=[0.5],
                       ppl_prefix_lengths=[160], ppl_eval_tokens=24, speed_lengths=[160], speed_new_tokens=3,
                       max_new_tokens=4, out_dir=str(tmp_path), dtype=dtype)


@pytest.fixture(scope="module")
def tiny_bf16(smollm_tokenizer):
    model = make_tiny_model("llama", vocab_size=len(smollm_tokenizer), head_dim=16, dtype=torch.bfloat16)
    model.generation_config.eos_token_id = smollm_tokenizer.eos_token_id
    return model


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_quantized_rows_in_the_bench_report_measured_ratio_and_dtype(tmp_path, request, smollm_tokenizer, dtype):
    if qm.backend_problem("quanto") is not None:
        pytest.skip("quanto cannot run here")
    model = request.getfixturevalue("tiny_chat_model" if dtype == "float32" else "tiny_bf16")
    methods = parse_methods(f"dense,quantized:quanto+q_group_size={GROUP}", [0.5], have_kvpress=False,
                            quant_problems={"quanto": None})
    suites = ("needle", "ppl", "speed") if dtype == "float32" else ("ppl",)
    result = run_bench(_config(tmp_path, methods, dtype, suites), model, smollm_tokenizer, command="test")
    item = torch.tensor([], dtype=getattr(torch, dtype)).element_size()
    rows = [r for r in result["rows"] if r["family"] == "quantized"]
    assert {r["method"] for r in rows} == {"quantized[quanto+q_group_size=16]@4bit", "quantized[quanto+q_group_size=16]@2bit"}
    for row in rows:
        assert row["status"] == "ok", row.get("reason")
        assert row["ratio"] == pytest.approx(row["stored_bytes"] / row["dense_bytes"])
        dense_row = next(r for r in result["rows"] if r["method"] == "dense" and r["key"].rsplit("|", 1)[0] == row["key"].rsplit("|", 1)[0])
        assert row["dense_bytes"] == dense_row["stored_bytes"]
        if row["suite"] != "speed":  # codes + one scale and one zero per group of 16, nothing in full precision
            # (within 1%: quanto pads its packed codes to whole bytes along its packing axis)
            assert row["ratio"] == pytest.approx((GROUP * row["bits"] / 8 + 2 * item) / (GROUP * item), rel=0.01)
            assert row["residual_tokens"] == 0 and row["backend"] == "quanto"
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["meta"]["dtype"] == dtype and saved["meta"]["model"]["dtype"] == dtype
    assert f"in {dtype}, the dtype the model ran in" in result["markdown"]
    assert "| quantized[quanto+q_group_size=16]@2bit | 2 bit |" in result["markdown"]
    assert "quantized: quantized[BACKEND]@Nbit rows are transformers' own QuantizedCache" in result["markdown"]


def test_cli_loads_the_model_in_the_dtype_asked_for(monkeypatch, tmp_path, capsys, tiny_bf16, smollm_tokenizer):
    import hf_subtok.model_loading as loading
    from hf_subtok.cli import main

    asked = []
    monkeypatch.setattr(loading, "load_model_and_tokenizer",
                        lambda model=None, dtype=torch.float32, **kw: asked.append(dtype) or (tiny_bf16, smollm_tokenizer))
    methods = "dense,quantized:quanto+q_group_size=16@4" if qm.backend_problem("quanto") is None else "dense"
    argv = ["bench", "--suite", "ppl", "--methods", methods, "--ppl-prefix", "160", "--dtype", "bfloat16",
            "--out", str(tmp_path)]
    assert main(argv) == 0
    assert asked == [torch.bfloat16]
    out = capsys.readouterr().out
    assert "in bfloat16, the dtype the model ran in" in out and "head_dim 16, bfloat16)" in out


def test_dtype_must_match_a_given_model(tmp_path, tiny_chat_model, smollm_tokenizer):
    with pytest.raises(ValueError, match="dtype='bfloat16' but the model given runs in float32"):
        run_bench(_config(tmp_path, [MethodSpec("dense")], "bfloat16"), tiny_chat_model, smollm_tokenizer)
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, float16, got 'float64'"):
        _config(tmp_path, [MethodSpec("dense")], "float64")


def test_ablation_rows_run_beside_plain_subtok(tmp_path, tiny_chat_model, smollm_tokenizer):
    methods = parse_methods("dense,subtok@0.5,subtok:axes=tokens@0.5,subtok:lossless", [0.5], have_kvpress=False)
    result = run_bench(_config(tmp_path, methods, suites=("ppl",)), tiny_chat_model, smollm_tokenizer)
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"dense", "subtok@0.5", "subtok[axes=tokens]@0.5", "subtok[lossless]"}
    assert all(r["status"] == "ok" for r in rows.values()), rows
    assert rows["subtok[axes=tokens]@0.5"]["overrides"] == {"axes": "tokens"}
    assert rows["subtok[axes=tokens]@0.5"]["variant"] == "axes=tokens"
    assert rows["subtok[lossless]"]["budget"] is None and set(rows["subtok[lossless]"]["keep_groups"]) == {8}
    assert "| subtok[axes=tokens]@0.5 | 0.5 |" in result["markdown"]


def test_presses_match_plain_subtok_not_its_ablations(tmp_path, tiny_chat_model, smollm_tokenizer):
    pytest.importorskip("kvpress")
    methods = parse_methods("subtok:axes=groups@0.75,subtok@0.75,kvpress:knorm", [0.75], have_kvpress=True)
    result = run_bench(_config(tmp_path, methods, suites=("ppl",)), tiny_chat_model, smollm_tokenizer)
    rows = {r["method"]: r for r in result["rows"]}
    assert rows["knorm@0.75"]["compression_ratio"] == pytest.approx(1 - rows["subtok@0.75"]["ratio"], abs=1e-6)
    assert rows["knorm@0.75"]["matched_to"].startswith("subtok@0.75 measured")


@pytest.mark.slow
def test_quantized_rows_on_the_embedded_model(tmp_path, capsys):
    from hf_subtok.cli import main

    methods = ",".join(f"quantized:{b}@4" for b in qm.BACKENDS if qm.backend_problem(b) is None)
    if not methods:
        pytest.skip("no QuantizedCache backend runs here")
    argv = ["--threads", "1", "bench", "--suite", "needle", "--methods", f"dense,{methods}", "--lengths", "1k",
            "--depths", "0.5", "--out", str(tmp_path)]
    assert main(argv) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    for row in rows:
        assert row["status"] == "ok", row
        if row["family"] == "quantized":
            # SmolLM2: 64-value groups = one head's vector of one token; 32 B of codes + fp32 scale and zero
            assert row["ratio"] == pytest.approx((32 + 8) / 256)
            assert row["residual_tokens"] == 0  # the whole compressed context is read back dequantized
            if row["setting"] == "in_prompt":
                assert row["quantized_tokens"] == row["prompt_tokens"]
    assert all(r["correct"] for r in rows if r["method"] == "dense")
    assert "quantized[quanto]@4bit" in capsys.readouterr().out or "quanto" not in methods
