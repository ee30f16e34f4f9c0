"""`hf_subtok.bench`: method parsing, byte accounting, resume, kvpress rows, the quick grid.

Most tests run the whole pipeline on a tiny random Llama sized for the real tokenizer; one
slow test runs `hf-subtok bench --quick` on the embedded model.
"""

from __future__ import annotations

import json

import pytest
import torch

from hf_subtok import SubTokenCache, SubTokenConfig
from hf_subtok.bench import BenchConfig, MethodSpec, parse_budgets, parse_methods, run_bench
from hf_subtok.bench import apply as bench_apply
from hf_subtok.bench import evaluate as bench_evaluate
from hf_subtok.bench.methods import PRESSES, parse_ints
from hf_subtok.bench.prefill import dense_prefill
from hf_subtok.bench.resume import ResultStore
from hf_subtok.tasks import as_input_ids, build_needle_case

# --- parsing -------------------------------------------------------------------------------


def test_methods_expand_over_budgets_in_table_order():
    specs = parse_methods("kvpress:snapkv,subtok,dense", [0.5, 0.75], have_kvpress=True)
    assert [s.name for s in specs] == ["dense", "subtok@0.75", "subtok@0.5", "snapkv@0.75", "snapkv@0.5"]


def test_bare_kvpress_means_every_press_and_is_dropped_without_kvpress():
    assert len(parse_methods("kvpress", [0.5], have_kvpress=True)) == len(PRESSES)
    assert [s.name for s in parse_methods("dense,kvpress", [0.5], have_kvpress=False)] == ["dense"]


def test_press_names_accept_class_names_and_a_budget():
    specs = parse_methods("kvpress:SnapKVPress@0.25,kvpress:AdaKVPress", [0.5], have_kvpress=True)
    assert {(s.press, s.budget) for s in specs} == {("snapkv", 0.25), ("adakv_expected_attention", 0.5)}


@pytest.mark.parametrize(
    "text, match",
    [
        ("dense,foo", "method must be one of"),
        ("kvpress:nope", "kvpress press must be one of"),
        ("subtok@1.5", r"budget must be in \(0, 1\], got 1.5"),
        ("dense@0.5", "takes no budget"),
        ("", "at least one"),
    ],
)
def test_bad_methods_raise_value_error_naming_the_value(text, match):
    with pytest.raises(ValueError, match=match):
        parse_methods(text, [0.5], have_kvpress=True)


def test_named_press_without_kvpress_is_an_error():
    with pytest.raises(ValueError, match="needs kvpress"):
        parse_methods("kvpress:snapkv", [0.5], have_kvpress=False)


@pytest.mark.parametrize("text", ["0", "1.01", "-0.5", "half"])
def test_bad_budgets(text):
    with pytest.raises(ValueError, match="budget"):
        parse_budgets(text)


def test_lengths_accept_k_suffix():
    assert parse_ints("lengths", "1k,2k,300") == [1024, 2048, 300]


# --- resume store --------------------------------------------------------------------------


def test_store_skips_a_torn_last_line(tmp_path):
    store = ResultStore(tmp_path)
    store.add({"key": "a", "x": 1})
    with store.path.open("a") as f:
        f.write('{"key": "b", "x"')  # killed mid-write
    again = ResultStore(tmp_path)
    assert "a" in again and "b" not in again
    assert ResultStore(tmp_path, restart=True).rows == {}


# --- the pipeline on a tiny model ---------------------------------------------------------


def _tiny_config(tmp_path, methods, suites=("needle", "ppl")) -> BenchConfig:
    return BenchConfig(
        suites=list(suites),
        methods=methods,
        budgets=[0.75],
        needle_lengths=[256],
        needle_depths=[0.5],
        ppl_prefix_lengths=[160],
        ppl_eval_tokens=24,
        speed_lengths=[160],
        speed_new_tokens=3,
        max_new_tokens=4,
        out_dir=str(tmp_path),
    )


@pytest.fixture
def tiny_run(tmp_path, tiny_chat_model, smollm_tokenizer, monkeypatch):
    # budgets on the value-group axis alone: 0.125 is then out of reach (whole keys)
    monkeypatch.setattr(
        bench_apply, "subtok_config", lambda b, w, options=(): SubTokenConfig(budget=b, window=64 if w is None else w, axes="groups", recipe=None)
    )
    methods = [MethodSpec("dense"), MethodSpec("subtok", 0.75), MethodSpec("subtok", 0.125)]
    config = _tiny_config(tmp_path, methods, suites=("needle", "ppl", "speed"))
    return config, run_bench(config, tiny_chat_model, smollm_tokenizer, command="test")


def test_tiny_run_writes_json_plot_and_tables(tiny_run, tmp_path):
    config, result = tiny_run
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["rows"]) == len(result["rows"]) == 2 * 3 + 3 + 2  # needle x2 settings, ppl, speed (1st budget)
    assert (tmp_path / "quality_vs_ratio.png").read_bytes()[:4] == b"\x89PNG"
    markdown = result["markdown"]
    for title in ("question inside the compressed prompt", "question withheld", "### ppl", "### speed"):
        assert title in markdown
    assert "| subtok@0.125 | 0.125 | not reachable without token eviction |" in markdown


def test_unreachable_budget_is_a_row_not_a_crash(tiny_run):
    _, result = tiny_run
    rows = [r for r in result["rows"] if r["method"] == "subtok@0.125"]
    assert len(rows) == 3 and all(r["status"] == "unreachable" and "token eviction" in r["reason"] for r in rows)
    assert all(r["status"] == "ok" for r in result["rows"] if r["method"] != "subtok@0.125")


def test_reported_ratio_is_stored_over_dense_from_the_tensors(tiny_run):
    _, result = tiny_run
    for row in result["rows"]:
        if row["status"] == "ok":
            assert row["ratio"] == pytest.approx(row["stored_bytes"] / row["dense_bytes"])
            dense_row = next(
                r for r in result["rows"]
                if r["method"] == "dense" and r["suite"] == row["suite"] and r.get("setting") == row.get("setting")
                and r.get("context_tokens") == row.get("context_tokens")
            )
            assert row["dense_bytes"] == dense_row["stored_bytes"]


def _held_bytes(cache) -> int:
    """Every tensor any layer of `cache` holds, summed over storages (independent of memory_report)."""
    held = [vars(layer) for layer in cache.layers] + [vars(layer.window) for layer in cache.layers]  # the dense window's buffers
    return sum(value.untyped_storage().nbytes() for owner in held for value in owner.values() if torch.is_tensor(value))


@pytest.mark.parametrize("budget", [0.75, 0.3, 0.1])
def test_shared_prefill_gives_the_cache_of_a_real_prefill(tiny_chat_model, smollm_tokenizer, budget):
    ids = as_input_ids(build_needle_case(smollm_tokenizer, 300, 0.5, 0).prompt_ids)
    plain = (("recipe", None),)  # plain storage: _held_bytes reads the layers' own tensors
    config = bench_apply.subtok_config(budget, 64, plain)
    real = SubTokenCache(tiny_chat_model, config)
    with torch.no_grad():
        tiny_chat_model(input_ids=ids, past_key_values=real, use_cache=True)
    prefill = dense_prefill(tiny_chat_model, ids, capture_hidden=False)
    shared = bench_apply.build_cache(MethodSpec("subtok", budget, options=plain), tiny_chat_model, prefill, window=64)
    for ours, theirs in zip(shared.cache.layers, real.layers, strict=True):
        for name, tensor in theirs.stored_tensors().items():
            assert torch.equal(ours.stored_tensors()[name], tensor), name
    assert shared.stored_bytes == _held_bytes(real) == real.memory_report()["stored_bytes"]
    cfg = tiny_chat_model.config
    assert shared.dense_bytes == 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * ids.shape[1] * cfg.head_dim * 4


def test_resume_skips_finished_cases(tmp_path, tiny_chat_model, smollm_tokenizer, monkeypatch):
    methods = [MethodSpec("dense"), MethodSpec("subtok", 0.75)]
    config = _tiny_config(tmp_path, methods)
    first = run_bench(config, tiny_chat_model, smollm_tokenizer)
    assert len(first["rows"]) == 2 * 2 + 2

    calls = []
    real = bench_evaluate.build_cache
    monkeypatch.setattr(bench_evaluate, "build_cache", lambda spec, *a, **k: calls.append(spec.name) or real(spec, *a, **k))
    again = run_bench(config, tiny_chat_model, smollm_tokenizer)
    assert calls == [] and again["rows"] == first["rows"]

    # an interrupted run: drop the last two finished rows, only those are recomputed
    lines = (tmp_path / "cases.jsonl").read_text().splitlines()
    (tmp_path / "cases.jsonl").write_text("\n".join(lines[:-2]) + "\n")
    resumed = run_bench(config, tiny_chat_model, smollm_tokenizer)
    assert calls == ["dense", "subtok@0.75"]
    assert [r["key"] for r in resumed["rows"]] == [r["key"] for r in first["rows"]]


# --- kvpress --------------------------------------------------------------------------------


def test_kvpress_rows_at_matched_bytes(tmp_path, tiny_chat_model, smollm_tokenizer):
    pytest.importorskip("kvpress")
    # AdaKV's masking needs a key no query attends to; random tiny queries admit none
    # (kvpress raises), so AdaKV is covered on the real model in the slow test instead
    presses = [p for p in PRESSES if p != "adakv_expected_attention"]
    methods = parse_methods("dense,subtok," + ",".join(f"kvpress:{p}" for p in presses), [0.75], have_kvpress=True)
    result = run_bench(_tiny_config(tmp_path, methods, suites=("needle",)), tiny_chat_model, smollm_tokenizer)
    rows = result["rows"]
    for setting in ("in_prompt", "after"):
        ours = next(r for r in rows if r["method"] == "subtok@0.75" and r["setting"] == setting)
        press_rows = [r for r in rows if r["family"] == "kvpress" and r["setting"] == setting]
        assert {r["press"] for r in press_rows} == set(presses)
        tokens = ours["dense_bytes"] / (2 * 2 * 2 * 16 * 4)  # layers x K/V x heads x head_dim x fp32
        for row in press_rows:
            assert row["status"] == "ok", row.get("reason")
            assert row["compression_ratio"] == pytest.approx(1 - ours["ratio"], abs=1e-6)
            assert row["matched_to"].startswith("subtok@0.75 measured")
            if row["masked"]:  # AdaKV holds every token plus its mask indices
                assert row["ratio"] > 1.0 and row["effective_ratio"] == pytest.approx(ours["ratio"], abs=2 / tokens)
            else:
                assert row["ratio"] == pytest.approx(ours["ratio"], abs=2 / tokens)
    checks = result["meta"]["shared_prefill_check"]
    assert set(checks) == {"in_prompt", "after"}
    assert all(r["identical"] for per in checks.values() for r in per.values())
    assert "matching: kvpress presses evict whole tokens" in result["markdown"]


# --- the real model -------------------------------------------------------------------------


@pytest.mark.slow
def test_bench_quick_on_the_embedded_model(tmp_path, capsys):
    from hf_subtok.cli import main

    try:
        import kvpress  # noqa: F401
    except ImportError:
        have_kvpress = False
    else:
        have_kvpress = True
    # every other press runs on a tiny model (test_kvpress_rows_at_matched_bytes); AdaKV needs real weights
    methods = "dense,subtok,kvpress:adakv_expected_attention" if have_kvpress else "dense,subtok"
    assert main(["--threads", "1", "bench", "--quick", "--budgets", "0.75", "--methods", methods, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "### needle: question inside the compressed prompt" in out and "### speed" in out
    saved = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "quality_vs_ratio.png").stat().st_size > 10_000
    rows = saved["rows"]
    for row in rows:
        assert row["status"] == "ok", row
        assert row["ratio"] == pytest.approx(row["stored_bytes"] / row["dense_bytes"])
    dense = [r for r in rows if r["suite"] == "needle" and r["method"] == "dense"]
    assert all(r["correct"] for r in dense)
    presses = {r["press"] for r in rows if r["family"] == "kvpress"}
    assert presses == ({"adakv_expected_attention"} if have_kvpress else set())
