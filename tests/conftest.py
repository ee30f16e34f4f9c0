import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    """Under pytest-xdist each worker process runs torch on one thread: the workers already
    share the cores, and more threads than cores only make them wait for each other."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


# Test files that call no transformers code (no model, no cache, no generation): kernels,
# quantization, selection arithmetic, scorers on plain tensors, the import rules. They run in
# the first CI leg only (newest transformers); `tests/test_transformers_free.py` checks that
# none of them imports a model, a cache or transformers.
TRANSFORMERS_FREE = frozenset({
    "test_import_rules.py", "test_kernel_channel_keys.py", "test_kernels_errors.py",
    "test_kernels_pack.py", "test_kernels_packed_attention.py", "test_kernels_quantized_attention.py",
    "test_quant_bits.py", "test_quant_channel.py", "test_quant_codebook.py", "test_quant_errors.py",
    "test_quant_roundtrip.py", "test_quant_tensor.py", "test_rank_attention.py",
    "test_rank_attention_triton.py", "test_rows.py", "test_select_fit.py",
    "test_select_tokens.py", "test_stored_token_ops.py", "test_transformers_free.py",
    "test_triton_registers_script.py",
})


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in TRANSFORMERS_FREE:
            item.add_marker(pytest.mark.transformers_free)


# --- the embedded real model (SmolLM2-135M-Instruct); converted once per machine ---

@pytest.fixture(scope="session")
def smollm():
    """``(model, tokenizer)`` of the embedded default model, fp32 on CPU."""
    from hf_subtok.model_loading import load_model_and_tokenizer

    return load_model_and_tokenizer()


@pytest.fixture(scope="session")
def smollm_tokenizer():
    """The embedded model's tokenizer alone (no weight conversion needed)."""
    from hf_subtok.model_loading import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def tiny_chat_model(smollm_tokenizer):
    """A tiny random Llama sized for the real tokenizer's vocabulary (no weights needed)."""
    from tests.tiny_models import make_tiny_model

    model = make_tiny_model("llama", vocab_size=len(smollm_tokenizer), head_dim=16)
    model.generation_config.eos_token_id = smollm_tokenizer.eos_token_id
    return model
