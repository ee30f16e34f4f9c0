"""Calibrate per-layer, per-KV-head bases for keys and values on real text.

`calibrate_bases(model, tokenizer, text)` runs the model's decoder (no LM head) over windows of
the text with `capture_kv` hooks, accumulates the second moments of the keys (after and before RoPE) and
values of every layer and KV head, and takes their eigenvectors, ordered by variance
(`statistics.principal_axes`). The last `held_out` tokens of the text are never fitted: they
measure the relative reconstruction error `sum ||x - x_r||^2 / sum ||x||^2` at r = D/8, D/4, D/2
of the saved bases and of the alternatives, recorded in the artifact's `metrics`.

Keys after RoPE, centred, calibrated over every position the cache will serve. Measured on
SmolLM2-135M-Instruct (`benchmarks/rank_key_space.py --window 4096`: fitted on one 4096-token
window of the shipped haystack text, measured on the first 4096 tokens of the unseen ppl text;
relative error at r = 8 / 16 / 32 of D = 64):

| keys | positions 0-1023 | 1024-2047 | 2048-4095 |
|---|---|---|---|
| before RoPE | 0.099 / 0.059 / 0.022 | 0.097 / 0.057 / 0.021 | 0.102 / 0.061 / 0.023 |
| after RoPE | 0.292 / 0.192 / 0.089 | 0.298 / 0.194 / 0.087 | 0.300 / 0.196 / 0.090 |
| after RoPE, fitted on 4 windows of 1024 | 0.245 / 0.157 / 0.070 | 0.415 / 0.317 / 0.205 | 0.543 / 0.437 / 0.307 |

(values: 0.61 / 0.46 / 0.25; centring lowers every error by 2-4%.) Keys before RoPE are 3-4x
more compressible at the same rank and do not depend on the position, but a basis before RoPE
cannot be met by a query projected once: `q . R_t (mu + B c_t)` rotates differently for every
token `t`, so attention must rebuild and rotate every key (`D x r` work per token, every step,
the cost class of unpacking codes). After RoPE, `q . k_t = q . mu + (q B) . c_t`: one `[D, r]`
projection per query and `r` multiply-adds per token, which is what the rank kernel does; the
default `key_space="post_rope"` serves it.

End quality decides against it. Every key of the real model through a compression inside
attention, values exact, the first 4 tokens exact, perplexity of 2,048 tokens
(`benchmarks/rank_at_equal_bits.py --tokens 2048 --fit 4096`, bits per key element with the
scale and zero of each channel and block of 32 tokens; book / legal text):

| keys | bits | ppl change |
|---|---:|---|
| per channel, Hadamard-rotated, 2-bit (the package's keys) | 3.0 | +23.2% / +30.9% |
| after RoPE, calibrated basis, all 64, 2-bit | 3.0 | +25.2% / +37.2% |
| before RoPE, calibrated basis, all 64, 2-bit | 3.0 | +8.8% / +10.1% |
| before RoPE, first 32, 4-bit | 2.5 | +4.2% / +14.0% |
| after RoPE, first 32, 4-bit | 2.5 | +62.1% / +225.0% |
| before RoPE, first 32, 2-bit | 1.5 | +14.6% / +28.2% |

A basis fitted after RoPE fits the positions' rotations on average and no position well; a
basis before RoPE compacts the keys and gives per-channel codes a third of the loss at equal
bits. `key_space="pre_rope"` saves those bases: the storage of the rank axis is to hold keys
as pre-RoPE coefficients and rebuild them per block at attention.
"""

from __future__ import annotations

import logging
import math
import time

import torch
from tqdm.auto import tqdm

from hf_subtok.rank.artifact import RankBases
from hf_subtok.rank.capture import attention_modules, capture_kv
from hf_subtok.rank.config import KEY_SPACE, KEY_SPACES, BasesConfig
from hf_subtok.rank.statistics import MomentSums, principal_axes, truncation_errors

logger = logging.getLogger(__name__)

DEFAULT_TOKENS = 4096  # calibration tokens
DEFAULT_WINDOW = 4096  # tokens per forward: keys after RoPE are fitted for positions 0..window-1 only
DEFAULT_HELD_OUT = 2048
# (name, index in the captured (keys_pre, keys_post, values)): what is fitted (the keys of one space are saved)
_FITTED = (("keys_post", 1), ("keys_pre", 0), ("values", 2))


def calibrate_bases(
    model,
    tokenizer,
    text: str,
    *,
    tokens: int = DEFAULT_TOKENS,
    window: int = DEFAULT_WINDOW,
    held_out: int = DEFAULT_HELD_OUT,
    center: bool = True,
    key_space: str = KEY_SPACE,
    source: str = "text",
    progress: bool = True,
) -> RankBases:
    """Bases of `model` calibrated on `text` (keys after or before RoPE, and values, per layer and KV head).

    Args:
        model: a supported causal LM (Llama, Mistral, Qwen2, Qwen3), any dtype and device.
        tokenizer: its tokenizer.
        text: calibration text; its last `held_out` tokens are only measured, never fitted.
        tokens: calibration tokens, taken as `ceil(tokens / window)` windows spread evenly over
            the rest of the text (they overlap when the text is shorter).
        window: tokens per forward.
        held_out: tokens measured at the end of the text (0: no measurement).
        center: take coefficients around the calibration mean (saved in the artifact).
        key_space: "post_rope" (keys as the cache holds them) or "pre_rope" (keys before RoPE,
            which a cache would un-rotate at each token's position before projecting).
        source: how the text is named in the artifact's config.
        progress: show a progress bar (tqdm, on stderr).

    Returns:
        `RankBases` whose config records the calibration and the held-out errors.
    """
    if key_space not in KEY_SPACES:
        raise ValueError(f"key_space must be one of {KEY_SPACES}, got {key_space!r}")
    _check_int("tokens", tokens, 1)
    _check_int("window", window, 1)
    _check_int("held_out", held_out, 0)
    ids = tokenizer(text, add_special_tokens=False, verbose=False).input_ids  # long texts are windowed
    fit_ids, measure_ids = (ids[:-held_out], ids[-held_out:]) if held_out else (ids, [])
    if len(fit_ids) < min(window, tokens):
        raise ValueError(
            f"text ({source}) has {len(ids)} tokens: too few for window={window} calibration tokens after "
            f"held_out={held_out}; give a longer text or smaller --tokens/--window/--held-out"
        )
    window = min(window, tokens)
    count = math.ceil(tokens / window)
    last = len(fit_ids) - window
    starts = [round(i * last / (count - 1)) for i in range(count)] if count > 1 else [0]
    if count * window > len(fit_ids):
        logger.warning("%d calibration tokens from a text of %d: windows overlap", count * window, len(fit_ids))
    layers = len(attention_modules(model))
    config = model.config.get_text_config(decoder=True)
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = attention_modules(model)[0].head_dim
    moments = {name: MomentSums(layers, heads, head_dim) for name, _ in _FITTED}

    def fit_sink(layer, keys_pre, keys_post, values):
        captured = (keys_pre, keys_post, values)
        for name, which in _FITTED:
            moments[name].add(layer, captured[which])

    begin = time.perf_counter()
    chunks = [fit_ids[s : s + window] for s in starts]
    _run(model, chunks, fit_sink, progress, "calibrating")
    fitted = {(name, c): principal_axes(moments[name], center=c) for name, _ in _FITTED for c in (True, False)}
    seconds = time.perf_counter() - begin
    measured = time.perf_counter()
    metrics = _measure(model, measure_ids, window, fitted, head_dim, progress) if measure_ids else {}
    measured = time.perf_counter() - measured
    basis_k, mean_k, var_k = fitted["keys_pre" if key_space == "pre_rope" else "keys_post", center]
    basis_v, mean_v, var_v = fitted["values", center]
    tensors = {
        "key_basis": basis_k, "key_mean": mean_k, "key_variance": var_k,
        "value_basis": basis_v, "value_mean": mean_v, "value_variance": var_v,
    }
    calibration = {
        "text": source, "tokens": count * window, "window": window, "windows": count,
        "held_out_tokens": len(measure_ids), "seconds": round(seconds, 1),
        "measure_seconds": round(measured, 1), "dtype": str(model.dtype).removeprefix("torch."),
    }
    logger.info("calibrated %d layers x %d KV heads on %d tokens in %.1f s", layers, heads, count * window, seconds)
    config = BasesConfig.for_model(model, centered=center, key_space=key_space, calibration=calibration, metrics=metrics)
    return RankBases(config, tensors)


def _run(model, chunks: list[list[int]], sink, progress: bool, what: str) -> None:
    """One decoder forward per chunk of token ids with `sink` capturing (no LM head, no cache)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    device = next(model.parameters()).device
    with capture_kv(model, sink), torch.inference_mode():
        for chunk in tqdm(chunks, desc=what, unit="window", disable=not progress):
            decoder(input_ids=torch.tensor([chunk], device=device), use_cache=False)


def _measure(model, ids: list[int], window: int, fitted: dict, head_dim: int, progress: bool) -> dict:
    """Held-out relative errors at r = D/8, D/4, D/2 of each fitted kind, centred or not."""
    ranks = sorted({max(1, head_dim // 8), max(1, head_dim // 4), max(1, head_dim // 2)})
    errors = {key: torch.zeros(len(ranks), dtype=torch.float64) for key in fitted}
    energy = {name: torch.zeros((), dtype=torch.float64) for name, _ in _FITTED}

    def measure_sink(layer, keys_pre, keys_post, values):
        captured = (keys_pre, keys_post, values)
        for name, which in _FITTED:
            for center in (True, False):
                basis, mean, _ = fitted[name, center]
                err, total = truncation_errors(captured[which], basis[layer], mean[layer], ranks)
                errors[name, center] += err
            energy[name] += total

    _run(model, [ids[s : s + window] for s in range(0, len(ids), window)], measure_sink, progress, "measuring")
    table = {}
    for (name, center), err in errors.items():
        label = f"{name}_{'centred' if center else 'uncentred'}"
        table[label] = {str(r): round(float(e / energy[name]), 6) for r, e in zip(ranks, err, strict=True)}
    return {"relative_error": table, "ranks": ranks, "held_out_tokens": len(ids)}


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
