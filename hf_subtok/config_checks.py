"""Validation helpers of `SubTokenConfig`: each raises `ValueError` naming the field and the
value received."""

from __future__ import annotations

import importlib.util

from hf_subtok.formats import LOG_SCALES
from hf_subtok.quant import SUPPORTED_BITS
from hf_subtok.rank.config import KEY_SPACES  # where keys are taken: as calibrated, as stored

BACKENDS = ("auto", "torch", "triton")


def check_budget(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")


def check_backend(backend) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton" and importlib.util.find_spec("triton") is None:
        raise ValueError(
            "backend='triton' needs the triton package, which is not installed "
            "(pip install triton, or use backend='auto' or 'torch')"
        )


def check_key_space(key_space, key_bases, head_budgets: str, backend: str) -> None:
    """`key_space` is one of `KEY_SPACES`; `key_bases` None or a folder / Hub id, only with
    'pre_rope'. Keys stored before RoPE keep a row per KV head and are read by the PyTorch path
    (the Triton kernel reads keys itself)."""
    if key_space not in KEY_SPACES:
        raise ValueError(f"key_space must be one of {KEY_SPACES}, got {key_space!r}")
    if key_bases is not None and (not isinstance(key_bases, str) or not key_bases):
        raise ValueError(f"key_bases must be a folder or Hub id of calibrated bases, got {key_bases!r}")
    if key_bases is not None and key_space != "pre_rope":
        raise ValueError(f"key_bases={key_bases!r} needs key_space='pre_rope' (bases calibrated before RoPE)")
    if key_space != "pre_rope":
        return
    if head_budgets == "adaptive":
        raise ValueError("key_space='pre_rope' needs head_budgets='uniform' (keys stored before RoPE keep a row per KV head)")
    if backend == "triton":
        raise ValueError("key_space='pre_rope' needs backend 'auto' or 'torch' (the Triton kernel reads keys after RoPE)")


def parse_layer_range(text) -> tuple[int, int]:
    """`3` or `"3"` -> (3, 3); `"0-5"` -> (0, 5)."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text, text
    first, sep, last = str(text).partition("-")
    try:
        return int(first), int(last if sep else first)
    except ValueError:
        raise ValueError(f"overrides layers must be 'N' or 'FIRST-LAST', got {text!r}") from None


def parse_depth_range(value) -> tuple[float, float]:
    """`"0-25%"` or `(0.0, 0.25)` -> (0.0, 0.25): a share of a model's depth, `0 <= low < high <= 1`."""
    shares = value
    if isinstance(value, str):
        low, sep, high = value.strip().removesuffix("%").partition("-")
        try:
            if not sep:
                raise ValueError
            shares = (float(low.strip().removesuffix("%")) / 100, float(high) / 100)
        except ValueError:
            raise ValueError(f"overrides layers by depth must be 'LOW-HIGH%' (like '0-25%'), got {value!r}") from None
    try:
        low, high = (float(v) for v in shares)
    except (TypeError, ValueError):
        raise ValueError(f"override depth must be (low, high) shares of the depth, got {value!r}") from None
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"override depth must have 0 <= low < high <= 1, got {value!r}")
    return low, high


def check_int(name: str, value, low: int, high: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in {low}..{high}"
        raise ValueError(f"{name} must be {bounds}, got {value}")


def check_quantization(config, key_layout: str, awaits_bits: bool) -> None:
    """The fields that shape quantized storage: their types always, and, unless `awaits_bits`
    (bits left to the recipe, which checks them again once it has filled them), that they
    have quantized storage to act on. `key_layout`: the keys' layout at `config.bits`."""
    check_int("code_piece", config.code_piece, 1, None)
    for name in ("key_clip", "rotate"):
        if not isinstance(getattr(config, name), bool):
            raise ValueError(f"{name} must be True or False, got {getattr(config, name)!r}")
    if config.log_scales not in LOG_SCALES:
        raise ValueError(f"log_scales must be one of {LOG_SCALES}, got {config.log_scales!r}")
    if config.value_codes is not None:
        check_int("value_codes", config.value_codes, 2, 256)
    if awaits_bits:
        return
    check_value_codes(config)
    per_channel = config.bits == "auto" or key_layout == "channel"
    if config.key_clip and (config.bits is None or config.key_quantization == "token" or not per_channel):
        raise ValueError(
            "key_clip=True needs keys quantized per channel (bits=2 or 'auto', or key_quantization="
            f"'channel'), got bits={config.bits!r}, key_quantization={config.key_quantization!r}"
        )
    check_log_scales(config, per_channel)
    if config.rotate and config.bits is None:
        raise ValueError("rotate=True needs bits= (only quantized storage is rotated)")


def check_log_scales(config, per_channel: bool) -> None:
    if config.log_scales in ("keys", "both") and (config.bits is None or not per_channel):
        raise ValueError(
            f"log_scales={config.log_scales!r} needs keys quantized per channel (bits=2 or key_quantization="
            f"'channel'), got bits={config.bits!r}, key_quantization={config.key_quantization!r}"
        )
    if config.log_scales in ("values", "both") and (config.bits is None or config.value_codes is None):
        raise ValueError(
            f"log_scales={config.log_scales!r} needs value_codes (values with one scale per token), "
            f"got value_codes={config.value_codes!r}, bits={config.bits!r}"
        )


def check_value_codes(config) -> None:
    if config.value_codes is None:
        return
    if config.bits not in SUPPORTED_BITS:
        raise ValueError(
            f"value_codes needs bits= one of {SUPPORTED_BITS} (the keys' precision), got bits={config.bits!r}"
        )
    if config.span == "adaptive" or config.head_budgets == "adaptive":
        raise ValueError(
            "value_codes works with span='fixed' and head_budgets='uniform' (one codebook per KV head), "
            f"got span={config.span!r}, head_budgets={config.head_budgets!r}"
        )
