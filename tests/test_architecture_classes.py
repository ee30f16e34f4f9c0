"""A Llama's weights in the Llama, Mistral and Qwen2 classes (`hf_subtok.model_classes`): every
config field carried, what cannot be carried refused, and on the embedded SmolLM2-135M-Instruct
the same greedy tokens in every class, dense, lossless and compressed."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import DynamicCache, LlamaConfig

from hf_subtok import SubTokenCache, SubTokenConfig, install_attention, uninstall_attention
from hf_subtok.generate_args import cache_kwargs
from hf_subtok.model_classes import (
    ARCHITECTURES,
    CARRIED_FIELDS,
    as_architecture,
    target_config_for,
)
from tests.tiny_models import make_tiny_model, random_prompts

TARGETS = ("mistral", "qwen2")
CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 256}

# --------------------------------------------------------------------- tiny random Llamas (fast)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"tie_word_embeddings": True, "head_dim": 24, "rms_norm_eps": 1e-5, "max_position_embeddings": 512},
        {"rope_parameters": LLAMA3_ROPE, "pad_token_id": 2, "eos_token_id": [2, 3]},
    ],
    ids=["defaults", "tied-head_dim24", "llama3-rope"],
)
def test_every_field_is_carried_and_the_logits_are_the_llamas(target, overrides):
    llama = make_tiny_model("llama", **overrides)
    llama.generation_config.eos_token_id = [2, 3]
    llama.name_or_path = "tiny-llama"
    model = as_architecture(llama, target)
    assert type(model).__name__ == CLASSES[target] and model.config.model_type == target
    for name in CARRIED_FIELDS:
        assert getattr(model.config, name) == getattr(llama.config, name), name
    assert model.config._attn_implementation == "sdpa" and model.dtype == model.config.dtype == torch.float32
    assert model.config.get_text_config().sliding_window is None and not model.training
    assert model.generation_config.to_dict() == llama.generation_config.to_dict()
    assert model.name_or_path == "tiny-llama"
    assert model.model.layers[0].self_attn.o_proj.weight is llama.model.layers[0].self_attn.o_proj.weight  # shared
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == llama.config.tie_word_embeddings
    if target == "qwen2":
        biases = [getattr(layer.self_attn, p).bias for layer in model.model.layers for p in ("q_proj", "k_proj", "v_proj")]
        assert all(b is not None and not b.any() for b in biases)
    ids = random_prompts(2, 24)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, llama(ids).logits, rtol=1e-5, atol=1e-5)


def test_dtype_attention_implementation_and_mode_are_carried():
    llama = make_tiny_model("llama").to(torch.bfloat16).train()
    llama.set_attn_implementation("eager")
    model = as_architecture(llama, "qwen2")
    assert model.dtype == torch.bfloat16 and model.config.dtype == torch.bfloat16
    assert model.model.layers[1].self_attn.q_proj.bias.dtype == torch.bfloat16
    assert model.config._attn_implementation == "eager" and model.training


def test_hf_subtok_attention_installed_carries_the_dense_implementation():
    llama = make_tiny_model("llama")
    install_attention(llama)
    try:
        assert as_architecture(llama, "mistral").config._attn_implementation == "sdpa"
    finally:
        uninstall_attention(llama)


def test_same_class_is_returned_unchanged():
    llama = make_tiny_model("llama")
    assert as_architecture(llama, "llama") is llama
    qwen2 = make_tiny_model("qwen2")
    assert as_architecture(qwen2, "qwen2") is qwen2


@pytest.mark.parametrize(
    "make, architecture, match",
    [
        (lambda: make_tiny_model("llama"), "qwen3", "architecture must be one of llama, mistral, qwen2, got 'qwen3'"),
        (lambda: make_tiny_model("qwen3"), "mistral", "model_type='qwen3': only a Llama-class model"),
        (lambda: make_tiny_model("mistral"), "llama", "model_type='mistral': only a Llama-class model"),
        (lambda: make_tiny_model("llama", attention_bias=True), "mistral", "attention_bias=True: the mistral class"),
        (lambda: make_tiny_model("llama", attention_bias=True), "qwen2", "attention_bias=True: the qwen2 class has no o_proj"),
        (lambda: make_tiny_model("llama", mlp_bias=True), "qwen2", "mlp_bias=True: the qwen2 class has no MLP biases"),
    ],
    ids=["unknown-class", "qwen3-source", "mistral-source", "attention-bias", "o_proj-bias", "mlp-bias"],
)
def test_what_cannot_be_carried_is_a_value_error_naming_it(make, architecture, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(")):
        as_architecture(make(), architecture)


@pytest.mark.parametrize("target", TARGETS)
def test_a_field_the_target_class_rewrites_is_refused(target):
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=1)
    config.rope_parameters = {"rope_theta": 10000.0}  # the target's config adds rope_type="default"
    with pytest.raises(ValueError, match=rf"rope_parameters=\{{'rope_theta': 10000.0\}} cannot be carried into the {target}"):
        target_config_for(config, target, torch.float32)


def test_unknown_architecture_is_refused_before_loading():
    from hf_subtok.model_loading import load_model_and_tokenizer

    with pytest.raises(ValueError, match="architecture must be one of llama, mistral, qwen2 or None, got 'gemma'"):
        load_model_and_tokenizer("/no/such/model", architecture="gemma")


def test_bench_architecture_option_reaches_the_report(capsys, tmp_path, monkeypatch, tiny_chat_model, smollm_tokenizer):
    import hf_subtok.model_loading as loading
    from hf_subtok import cli

    loaded = {}

    def load(model=None, *, architecture=None, **kw):
        loaded["architecture"] = architecture
        return as_architecture(tiny_chat_model, architecture or "llama"), smollm_tokenizer

    monkeypatch.setattr(loading, "load_model_and_tokenizer", load)
    argv = ["bench", "--quick", "--methods", "dense", "--suite", "needle", "--lengths", "200", "--architecture",
            "qwen2", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    assert loaded["architecture"] == "qwen2" and "as Qwen2ForCausalLM (" in capsys.readouterr().out
    meta = json.loads((tmp_path / "results.json").read_text())["meta"]
    assert meta["model"]["model_class"] == "Qwen2ForCausalLM" and meta["config"]["architecture"] == "qwen2"
    assert cli.main(["bench", "--architecture", "gemma"]) == 2
    assert "argument --architecture: invalid choice: 'gemma'" in capsys.readouterr().err


# ---------------------------------------------------------------- the embedded real model (slow)


@pytest.fixture(scope="module")
def three_classes(smollm):
    """`{architecture: model}`: the session's Llama, the Mistral re-housed from it, and a Qwen2 loaded
    through `load_model_and_tokenizer(architecture="qwen2")`."""
    from hf_subtok.model_loading import load_model_and_tokenizer, model_fingerprint

    llama, tokenizer = smollm
    qwen2, _ = load_model_and_tokenizer(architecture="qwen2")
    assert model_fingerprint(qwen2)["model_class"] == "Qwen2ForCausalLM"
    return {"llama": llama, "mistral": as_architecture(llama, "mistral"), "qwen2": qwen2}, tokenizer


def _greedy(model, cache, inputs: dict, new_tokens: int, *, with_logits: bool = False):
    """The `new_tokens` greedy tokens `[N]` (and with `with_logits`, each step's logits `[N, V]`)."""
    with torch.no_grad():
        out = model.generate(**inputs, **cache_kwargs(cache), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, return_dict_in_generate=True, output_logits=with_logits)
    tokens = out.sequences[0, inputs["input_ids"].shape[1]:]
    return (tokens, torch.cat(out.logits)) if with_logits else tokens


@pytest.mark.slow
def test_real_model_same_tokens_in_every_class_dense_and_lossless(three_classes):
    models, tokenizer = three_classes
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    llama = models["llama"]
    dense, dense_logits = _greedy(llama, DynamicCache(config=llama.config), chat, 30, with_logits=True)
    assert tokenizer.decode(dense).startswith("The capital of France is Paris.")
    for arch in TARGETS:
        model = models[arch]
        tokens, logits = _greedy(model, DynamicCache(config=model.config), chat, 30, with_logits=True)
        assert torch.equal(tokens, dense), (arch, tokenizer.decode(tokens))
        torch.testing.assert_close(logits, dense_logits, rtol=1e-5, atol=1e-5)  # [30, V], float32
    for arch in ARCHITECTURES:  # every token and value group kept: the Llama's dense tokens
        assert torch.equal(_greedy(models[arch], SubTokenCache(models[arch], "lossless"), chat, 30), dense), arch


@pytest.mark.slow
def test_real_model_same_tokens_in_every_class_compressed(three_classes):
    from hf_subtok.tasks import as_input_ids, build_needle_case

    models, tokenizer = three_classes
    case = build_needle_case(tokenizer, 1024, 0.5, 0)
    ids = as_input_ids(case.prompt_ids)  # [1, T], T about 1000
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    tokens, ratios = {}, {}
    for arch in ARCHITECTURES:
        cache = SubTokenCache(models[arch], SubTokenConfig(budget=0.25))
        tokens[arch] = _greedy(models[arch], cache, inputs, 10)
        ratios[arch] = cache.memory_report()["ratio"]
    assert case.pass_key in tokenizer.decode(tokens["llama"])
    for arch in TARGETS:  # identical math: identical choices, bytes and tokens
        assert torch.equal(tokens[arch], tokens["llama"]), (arch, tokenizer.decode(tokens[arch]))
        assert ratios[arch] == ratios["llama"] <= 0.25
