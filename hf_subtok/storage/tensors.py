"""Token-dim operations on what a layer stores: plain tensors, `QuantizedTensor`s (value
groups, or keys per token), `ChannelQuantizedTensor`s (keys per channel) and `CodedTensor`s
(value groups as codeword indices) alike.

A `QuantizedTensor`'s rows are independent, so it applies an operation to its payload, scales
and zeros alike; a `ChannelQuantizedTensor` moves its tokens (re-counting its block runs) and leaves its
block tables in place (compacting them after a gather or a cut); a `CodedTensor` moves its
codes and scales and leaves its codebook in place.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hf_subtok.formats import StorageFormat
from hf_subtok.quant import (
    ChannelQuantizedTensor,
    quantize,
    quantize_channels,
    quantize_vectors,
)
from hf_subtok.quant.gather import heads_into_rows, take_rows
from hf_subtok.quant.positions import PositionRuns
from hf_subtok.quant.pre_rope_keys import KeyBasis, PreRopeKeys
from hf_subtok.quant.rotation import rotate_groups, shared_hadamard
from hf_subtok.quant.stored import Stored


def cat_stored(parts: Sequence[Stored]) -> Stored:
    """`torch.cat` along the token dim (-2). Parts without tokens are left out (an empty store
    may be a plain placeholder of another kind)."""
    held = [p for p in parts if p.shape[-2]]
    if held and any(type(p) is not type(held[0]) for p in parts):  # an empty placeholder of another kind
        parts = held
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts, dim=-2)
    return type(parts[0]).cat(parts)


def take_tokens(x: Stored, index: torch.Tensor) -> Stored:
    """The tokens `index` (`[..., t]`, shaped like `x` up to its token dim -2) of `x`; per-channel
    key tables and codebooks stay (compacted where tokens left them)."""
    return take_rows(x, index, x.dim() - 2) if isinstance(x, torch.Tensor) else x.take(index)


def first_tokens(x: Stored, stop: int) -> Stored:
    """The first `stop` tokens of `[..., T, N]` storage (copies, so the rest is freed)."""
    return x[..., :stop, :].clone() if isinstance(x, torch.Tensor) else x.first_tokens(stop)


def flatten_heads(x: Stored, token_dim: int) -> Stored:
    """`[B, Hkv, ..., n, ...]` storage with its tokens at `token_dim` as one row of all heads'
    tokens, head-major: `[B, 1, ..., Hkv * n, ...]` (per-head token budgets, see
    `SubTokenLayer`). Stored tensors hold their tokens at dim -2; per-channel quantized keys keep
    each head's block tables (renumbered); codeword-coded values refuse (a codebook per head)."""
    return heads_into_rows(x, token_dim) if isinstance(x, torch.Tensor) else x.flatten_heads()


def key_rotation(storage: StorageFormat, device=None) -> torch.Tensor | None:
    """`[D, D]` rotation of stored keys (None: not rotated)."""
    return shared_hadamard(storage.head_dim, _device(device)) if storage.rotates_keys else None


def value_rotation(storage: StorageFormat, device=None) -> torch.Tensor | None:
    """`[C, C]` rotation of each stored value group (None: not rotated)."""
    return shared_hadamard(storage.width, _device(device)) if storage.rotates else None


def keys_as_stored(keys: torch.Tensor, storage: StorageFormat, rotation: torch.Tensor | None = None) -> torch.Tensor:
    """`[B, Hkv, T, D]` keys in the space `storage` quantizes them in (rotated or not);
    `rotation`: `key_rotation(storage)` if the caller holds it already."""
    if not storage.rotates_keys:
        return keys
    return rotate_groups(keys, key_rotation(storage, keys.device) if rotation is None else rotation)


def values_as_stored(
    values: torch.Tensor, storage: StorageFormat, rotation: torch.Tensor | None = None
) -> torch.Tensor:
    """`[..., C]`-grouped values (e.g. `[B, Hkv, K, T, C]`) in the space `storage` quantizes
    them in (each group rotated or not); `rotation`: `value_rotation(storage)` if held."""
    if not storage.rotates:
        return values
    return rotate_groups(values, value_rotation(storage, values.device) if rotation is None else rotation)


def store_keys(
    keys: torch.Tensor,
    storage: StorageFormat,
    solo: int = 0,
    rotation: torch.Tensor | None = None,
    basis: KeyBasis | None = None,
    positions: torch.Tensor | None = None,
) -> Stored:
    """`[B, Hkv, T, D]` keys as `storage` holds them: plain, or quantized (after rotation, if
    `storage.rotates_keys`) per channel over blocks of `storage.key_block` tokens (the first `solo`
    tokens a block each; each block's least-error range if `storage.clip_keys`), or per token.
    With `storage.pre_rope_keys`, the per-channel codes are of the keys before RoPE (at
    `positions` `[B, Hkv, T]`), in `basis`'s channels (`quant.pre_rope_keys`)."""
    if storage.bits is None:
        return keys
    if storage.pre_rope_keys:
        if basis is None or positions is None:
            raise ValueError("keys stored before RoPE need the layer's KeyBasis and the keys' positions")
        coefficients = basis.coefficients(keys, positions) if keys.shape[-2] else keys.float()
        coded = store_keys(coefficients, dataclasses.replace(storage, pre_rope=False, rotated=False), solo)
        return PreRopeKeys(coded, PositionRuns.of(positions), basis)
    keys = keys_as_stored(keys, storage, rotation)
    if storage.channel_keys:
        return quantize_channels(
            keys, storage.bits, storage.key_block, solo=solo, clip=storage.clip_keys, log_scale=storage.logs_key_scales
        )
    return quantize(keys, storage.bits, storage.key_group_size)


def store_values(
    values: torch.Tensor,
    storage: StorageFormat,
    codebook: torch.Tensor | None = None,
    rotation: torch.Tensor | None = None,
) -> Stored:
    """`[B, Hkv, K, T, C]` kept value groups as `storage` holds them (each group rotated first
    if `storage.rotates`, by `rotation` if given): quantized per token, or as indices into
    `codebook` `[B, Hkv, K, W, d]` (None: one fitted on these values) if `storage.coded_values`."""
    if storage.bits is None:
        return values
    rotated = values_as_stored(values, storage, rotation)
    if storage.coded_values:
        return quantize_vectors(
            rotated, storage.value_codes, storage.code_piece, codebook, log_scale=storage.logs_value_scales
        )
    return quantize(rotated, storage.bits, storage.value_group_size, clip=storage.clip_values)


def key_tables(keys: Stored) -> tuple[int, int, int]:
    """`(blocks, runs, position runs)`: rows of per-channel key tables, runs of tokens and runs
    of positions (keys stored before RoPE) each (batch, head) row holds (zeros for other layouts)."""
    if isinstance(keys, PreRopeKeys):
        return (*key_tables(keys.coefficients)[:2], keys.positions.start.shape[-1])
    if isinstance(keys, ChannelQuantizedTensor):
        return keys.scale.shape[-2], keys.run_block.shape[-1], 0
    return 0, 0, 0


def stored_parts(name: str, x: Stored) -> dict[str, torch.Tensor]:
    """The tensors behind `x` by name (`name.payload`, ... for a quantized tensor)."""
    if not isinstance(x, torch.Tensor):
        return {f"{name}.{part}": t for part, t in x.tensors().items()}
    return {name: x}


def _device(device) -> torch.device:
    """A hashable, canonical device for the shared rotations (None: the CPU)."""
    return torch.device("cpu") if device is None else torch.device(device)


@dataclass(frozen=True)
class ObservedQueries:
    """The prompt's last queries as the attention function saw them: `queries` `[B, Hq, W, D]`
    (RoPE applied), `scaling` the softmax scale, `key_valid` `[B, T]` over the prompt's tokens
    (False: left padding) or None. (Storage reads them without importing the scorers' `Observation`.)"""

    queries: torch.Tensor
    scaling: float
    key_valid: torch.Tensor | None = None


# Tokens (the last ones) a fidelity trial quantizes: the trial was 57% of a profiled prefill at
# 1,024 (issue 21.4). On SmolLM2-135M-Instruct (float32, `balanced`, the haystack text) 256
# picks the same (K, bits, tokens) in all 30 layers as 1,024 at 1k and 4k tokens; 128 changed
# one layer at 1k.
FIDELITY_SAMPLE = 256


def quantization_fidelity(
    keys: torch.Tensor,
    values: torch.Tensor,
    storage: StorageFormat,
    sample: int = FIDELITY_SAMPLE,
    observed: ObservedQueries | None = None,
) -> float:
    """The share of a layer's signal `storage` keeps on `[B, Hkv, T, D]` keys and values (at
    most the last `sample` tokens); 1.0 for unquantized storage.

    With the prompt's `observed` queries: `1 - |o_q - o| / |o|`, where `o` is the attention
    output of those queries over those tokens and `o_q` the same over their quantized keys and
    values. The output, not the tensors, is what the model reads: an error in a key moves every
    logit it enters, by more where attention is sharp. On SmolLM2-135M-Instruct (legal text,
    4k, rotated) 2-bit keys have 0.18-0.26 relative error but move the output by 0.18-0.64 in
    every layer but the first (0.05 there); the tensor-norm measure below let the plan pick
    2 bits in 21 of 30 layers, layer 1 included, and perplexity rose (BENCHMARKS.md).

    Without it (a scorer that needs no queries): `1 - mean(|x - Q(x)| / |x|)` over keys and
    values."""
    if storage.bits is None or keys.shape[-2] == 0:
        return 1.0
    return fidelity_of(quantization_norms(keys, values, storage, sample, observed).double().tolist())


def quantization_norms(
    keys: torch.Tensor,
    values: torch.Tensor,
    storage: StorageFormat,
    sample: int = FIDELITY_SAMPLE,
    observed: ObservedQueries | None = None,
    basis: KeyBasis | None = None,
    first_position: int = 0,
) -> torch.Tensor:
    """The error and reference norms behind `quantization_fidelity`, on the device (no host
    sync: a caller weighing several formats reads them all at once): `[2]` float32
    `|o_q - o|, |o|` with observed queries, else `[4]` `|k - Q(k)|, |k|, |v - Q(v)|, |v|`.
    Keys stored before RoPE (`storage.pre_rope_keys`) need the layer's `basis`, the keys'
    first token at `first_position`."""
    valid = None  # [B, 1, 1, S]: the sampled keys any query may attend (left padding: not)
    if observed is not None and observed.key_valid is not None:  # aligned with keys' first tokens
        valid = observed.key_valid[:, None, None, : keys.shape[-2]][..., -sample:]
    positions = None
    if storage.pre_rope_keys:  # [B, Hkv, S]: the sampled keys' positions
        first = first_position + max(keys.shape[-2] - sample, 0)
        positions = torch.arange(first, first + min(sample, keys.shape[-2]), device=keys.device)
        positions = positions.expand(*keys.shape[:2], -1)
    keys, values = keys[..., -sample:, :].float(), values[..., -sample:, :].float()
    # compared where they are stored (a rotation keeps every norm and every dot product)
    stored_keys = keys_as_stored(keys, storage)
    stored_values = values_as_stored(values, storage)
    restored_keys = store_keys(keys, storage, basis=basis, positions=positions).dequantize(torch.float32)
    restored_values = store_values(values, storage).dequantize(torch.float32)
    if observed is None:
        return torch.stack([
            torch.linalg.vector_norm(restored_keys - stored_keys),
            torch.linalg.vector_norm(stored_keys),
            torch.linalg.vector_norm(restored_values - stored_values),
            torch.linalg.vector_norm(stored_values),
        ])
    batch, heads, _, dim = keys.shape
    queries = observed.queries.float()  # [B, Hq, W, D], query heads h*R..(h+1)*R-1 read KV head h
    queries = keys_as_stored(queries.reshape(batch, heads, -1, dim), storage)  # [B, Hkv, R*W, D]

    def attend(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        logits = queries @ k.transpose(-1, -2) * observed.scaling  # [B, Hkv, R*W, S]
        if valid is not None:
            logits = logits.masked_fill(~valid, float("-inf"))
        return torch.softmax(logits, dim=-1).nan_to_num() @ v  # [B, Hkv, R*W, D]

    exact = attend(stored_keys, stored_values)
    error = attend(restored_keys, restored_values) - exact
    return torch.stack([torch.linalg.vector_norm(error), torch.linalg.vector_norm(exact)])


def fidelity_of(norms: Sequence[float]) -> float:
    """`quantization_fidelity` from its `quantization_norms`, read on the host."""
    errors = [error / max(norm, 1e-12) for error, norm in zip(norms[::2], norms[1::2], strict=True)]
    return max(0.0, 1.0 - sum(errors) / len(errors))
