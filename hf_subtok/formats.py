"""Bytes a stored token costs: the one place the cache's size arithmetic lives.

`memory_report()` measures the tensors; these formulas only let the allocator plan ahead,
and tests check that plans and measurements agree.
"""

from __future__ import annotations

from dataclasses import dataclass

from hf_subtok.quant import SUPPORTED_BITS
from hf_subtok.quant.codebook import code_bits
from hf_subtok.quant.positions import POSITION_RUN_BYTES

INDEX_BYTES = 1  # uint8 group index per kept value group
SCORE_BYTES = 4  # float32 token score per stored token (re-allocation while decoding)
SCALE_BYTES = 2  # float16 / bfloat16 scale and zero point per quantization group
LOG_SCALE_BYTES = 1  # a scale as an 8-bit logarithm (`log_scales`, `quant.logscale`)
LOG_SCALES = ("none", "keys", "values", "both")  # which scales `log_scales` stores as logarithms
RUN_BYTES = 6  # int16 block and int32 length of a run of per-channel keys' tokens (`quant.channel`)
HEAD_INDEX_BYTES = 1  # uint8 KV head of a token when heads share one row (per-head budgets)
WIDE_NORM_BYTES = 2  # float16 norm of a wide token's other value groups (`storage.wide`)
KEY_LAYOUTS = ("channel", "token")
# keys per channel where it measures better: at 2 bits (ppl of 512 tokens after a 4k prefix on
# SmolLM2-135M-Instruct, every token kept: +16% per channel against +43% per token; withheld
# needle 10/12 against 5/12); at 4 and 8 bits per token is level or better (-0.1% against
# +0.2% at 4 bits), the error of a block's few high-attention tokens dominating there
CHANNEL_KEYS_AT_BITS = (2,)
# value groups quantized with the range of least squared error (`quantize(clip=True)`) where it
# measures better: at 2 bits `compact`'s ppl over four continuations of SmolLM2-135M-Instruct
# went from +5.7/+2.7/+3.7/+5.0% to +2.7/+0.4/+0.5/+4.1% with the same needle accuracy (keys
# are not clipped: in the attention-output error a clipped key costs more than it saves)
CLIP_VALUES_AT_BITS = (2,)
VALUE_CLIPS = ("auto", "on", "off")


def key_layout_for(key_quantization: str, bits: int | None) -> str:
    """The key layout `key_quantization` ('auto', 'channel' or 'token') gives at `bits`."""
    if key_quantization == "auto":
        return "channel" if bits in CHANNEL_KEYS_AT_BITS else "token"
    return key_quantization


def clips_values(value_clip: str, bits: int | None) -> bool:
    """Whether `value_clip` ('auto', 'on' or 'off') clips quantized value groups at `bits`."""
    if bits is None or value_clip == "off":
        return False
    return value_clip == "on" or bits in CLIP_VALUES_AT_BITS


@dataclass(frozen=True)
class StorageFormat:
    """How one KV head stores a packed token: whole key `[D]`, K value groups of `D / G`
    channels, each with its index; in the model's element size or in `bits` bits. Quantized
    value groups have a scale and zero per `group_size` channels (at most a group's width);
    quantized keys either the same per token (`key_layout="token"`) or a scale and zero per
    channel and block of `key_block` tokens, with a run (block and length) per block naming
    the block of each token (`key_layout="channel"`, `quant.channel`), whose tables and runs
    are counted here as if every block were full (`row_bytes` counts the blocks and runs a row
    really holds). `rotated`: quantized
    keys and value groups are stored Hadamard-rotated (`quant.rotation`; no bytes of its own).
    `pre_rope`: per-channel keys are stored before RoPE (in their own channels or as
    coefficients in calibrated bases), with their positions as runs (`quant.pre_rope_keys`;
    planned at a run per block, bases counted by the layer), and only value groups are rotated."""

    head_dim: int
    num_groups: int
    elem_bytes: int
    bits: int | None = None
    group_size: int = 32
    key_layout: str = "channel"
    key_block: int = 32
    rotated: bool = False
    head_index: bool = False  # each packed token names its KV head (per-head budgets)
    clip_values: bool = False  # value groups quantized over their least-error range (no bytes)
    clip_keys: bool = False  # per-channel keys quantized over each block's least-error range (no bytes)
    value_codes: int | None = None  # value groups as indices into this many codewords (`quant.codebook`)
    code_piece: int = 4  # channels per codeword
    log_scales: str = "none"  # per-channel key scales and/or codeword values' scales in one byte each
    pre_rope: bool = False  # per-channel keys stored before RoPE (`quant.pre_rope_keys`)

    @property
    def rotates(self) -> bool:
        """Whether quantized storage is rotated (never plain storage: nothing to spread)."""
        return self.bits is not None and self.rotated

    @property
    def pre_rope_keys(self) -> bool:
        """Whether keys are stored before RoPE, per channel (`quant.pre_rope_keys`)."""
        return self.pre_rope and self.channel_keys

    @property
    def rotates_keys(self) -> bool:
        """Whether keys are stored Hadamard-rotated (not when they are stored before RoPE)."""
        return self.rotates and not self.pre_rope_keys

    @property
    def channel_keys(self) -> bool:
        """Whether keys are quantized per channel over blocks of tokens."""
        return self.bits is not None and self.key_layout == "channel"

    @property
    def width(self) -> int:
        """Channels of one value group."""
        return self.head_dim // self.num_groups

    @property
    def key_group_size(self) -> int:
        return min(self.group_size, self.head_dim)

    @property
    def value_group_size(self) -> int:
        return min(self.group_size, self.width)

    def _vector_bytes(self, channels: int, group_size: int) -> int:
        if self.bits is None:
            return channels * self.elem_bytes
        return channels * self.bits // 8 + 2 * SCALE_BYTES * (channels // group_size)

    @property
    def logs_key_scales(self) -> bool:
        """Whether per-channel key scales are stored as 8-bit logarithms."""
        return self.channel_keys and self.log_scales in ("keys", "both")

    @property
    def logs_value_scales(self) -> bool:
        """Whether codeword values' per-token scales are stored as 8-bit logarithms."""
        return self.coded_values and self.log_scales in ("values", "both")

    @property
    def key_block_bytes(self) -> int:
        """Scale and zero tables of one block of per-channel keys (0 for other layouts)."""
        scale = LOG_SCALE_BYTES if self.logs_key_scales else SCALE_BYTES
        return (scale + SCALE_BYTES) * self.head_dim if self.channel_keys else 0

    @property
    def key_run_bytes(self) -> int:
        """One run of per-channel keys' tokens (0 for other layouts)."""
        return RUN_BYTES if self.channel_keys else 0

    @property
    def key_bytes(self) -> float:
        """One key with its share of scales (a full block's share of tables and of its run, for
        per-channel keys)."""
        if self.channel_keys:
            positions = POSITION_RUN_BYTES if self.pre_rope_keys else 0
            return self.head_dim * self.bits // 8 + (self.key_block_bytes + RUN_BYTES + positions) / self.key_block
        return self._vector_bytes(self.head_dim, self.key_group_size)

    @property
    def coded_values(self) -> bool:
        """Whether quantized value groups are stored as codeword indices (`quant.codebook`)."""
        return self.bits is not None and self.value_codes is not None

    @property
    def slot_bytes(self) -> int:
        """One kept value group with its index: scalar codes with scales and zeros, or
        codeword indices with one scale."""
        if self.coded_values:
            scale = LOG_SCALE_BYTES if self.logs_value_scales else SCALE_BYTES
            return self.width // self.code_piece * code_bits(self.value_codes) // 8 + scale + INDEX_BYTES
        return self._vector_bytes(self.width, self.value_group_size) + INDEX_BYTES

    def codebook_bytes(self, keep_groups: int) -> int:
        """The codebooks one (batch, head) row holds: one per slot (0 without codeword values)."""
        return keep_groups * self.value_codes * self.code_piece * SCALE_BYTES if self.coded_values else 0

    def token_bytes(self, keep_groups: int, scored: bool) -> float:
        """Bytes of one packed token with `keep_groups` groups (and its score if `scored`); with
        every group kept the indices are implied (slot k holds group k) and not stored."""
        indices = 0 if keep_groups == self.num_groups else keep_groups * INDEX_BYTES
        values = keep_groups * (self.slot_bytes - INDEX_BYTES) + indices
        head = HEAD_INDEX_BYTES if self.head_index else 0
        return self.key_bytes + values + head + (SCORE_BYTES if scored else 0)

    def wide_bytes(self, keep_groups: int) -> int:
        """What a wide token (adaptive span) adds to a packed token with `keep_groups` groups:
        its other groups with their indices, and their norm."""
        return (self.num_groups - keep_groups) * self.slot_bytes + WIDE_NORM_BYTES

    def row_bytes(
        self,
        tokens: int,
        key_blocks: int,
        keep_groups: int,
        scored: bool,
        key_runs: int | None = None,
        position_runs: int | None = None,
    ) -> float:
        """Bytes one (batch, head) row of `tokens` packed tokens holds, with `key_blocks`
        blocks of per-channel key tables, `key_runs` runs and `position_runs` runs of positions
        (keys stored before RoPE; None: one per block; all ignored for other layouts) and its
        value codebooks."""
        position_bytes = POSITION_RUN_BYTES if self.pre_rope_keys else 0
        shared = (self.key_block_bytes + self.key_run_bytes + position_bytes) / self.key_block if self.channel_keys else 0.0
        per_token = self.token_bytes(keep_groups, scored) - shared
        runs = key_blocks if key_runs is None else key_runs
        positions = key_blocks if position_runs is None else position_runs
        return (
            tokens * per_token
            + key_blocks * self.key_block_bytes
            + runs * self.key_run_bytes
            + positions * position_bytes
            + self.codebook_bytes(keep_groups)
        )

    @property
    def dense_token_bytes(self) -> int:
        """What a dense cache holds per token and head: key and value in the model's dtype."""
        return 2 * self.head_dim * self.elem_bytes


# --- a config's formats (`SubTokenConfig.storage_format` and friends call these) ---


def storage_formats(config, head_dim: int, elem_bytes: int) -> list[StorageFormat]:
    """The formats a layer may store packed tokens in: `bits`'s, or with `bits='auto'` the
    model's dtype and every bit width that fits (highest precision first)."""
    if config.bits != "auto":
        return [storage_format(config, head_dim, elem_bytes)]
    formats = [storage_format(config, head_dim, elem_bytes, None)]
    for bits in sorted(SUPPORTED_BITS, reverse=True):
        try:
            formats.append(storage_format(config, head_dim, elem_bytes, bits))
        except ValueError:
            continue  # this width does not pack the groups into whole bytes
    return formats

def storage_format(
    config, head_dim: int, elem_bytes: int, bits: int | str | None = "config"
) -> StorageFormat:
    """How a packed token is stored for a model with this `head_dim` and element size,
    in `bits` (default: the config's; 'auto' stores in the model's dtype until a plan picks).

    Raises `ValueError` if `num_groups` does not divide `head_dim`, or (with bits) if
    the quantization group does not divide the key or a value group.
    """
    if head_dim % config.num_groups:
        raise ValueError(f"num_groups must divide head_dim={head_dim}, got {config.num_groups}")
    bits = config.bits if bits == "config" else bits
    bits = None if bits == "auto" else bits
    storage = StorageFormat(
        head_dim,
        config.num_groups,
        elem_bytes,
        bits,
        config.quant_group_size,
        key_layout_for(config.key_quantization, bits),
        config.key_block,
        config.rotate,
        config.head_budgets == "adaptive",
        clips_values(config.value_clip, bits),
        config.key_clip,
        config.value_codes,
        config.code_piece,
        config.log_scales,
        config.key_space == "pre_rope",
    )
    if bits is not None:  # coded value groups are checked below, scalar ones here
        checks = [] if storage.coded_values else [("value group width", storage.width, storage.value_group_size)]
        key_group = 1 if storage.channel_keys else storage.key_group_size  # per channel: whole bytes
        checks.append(("head_dim", head_dim, key_group))
        if config.rotate:
            for name, channels in (("head_dim", head_dim), ("value group width", storage.width)):
                if channels & (channels - 1):
                    raise ValueError(
                        f"rotate=True needs {name}={channels} to be a power of two (Hadamard rotation)"
                    )
        if storage.coded_values:
            pieces = storage.width // config.code_piece
            if storage.width % config.code_piece or pieces * code_bits(config.value_codes) % 8:
                raise ValueError(
                    f"code_piece={config.code_piece} with value_codes={config.value_codes} does not fit value groups "
                    f"of {storage.width} channels (it must divide them into pieces whose codes fill whole bytes)"
                )
        for name, channels, size in checks:
            if channels % size or channels * bits % 8:
                raise ValueError(
                    f"quant_group_size={config.quant_group_size} at bits={bits} does not fit "
                    f"{name}={channels} (it must divide it into whole bytes)"
                )
    return storage

def keep_groups_for(config, head_dim: int, elem_bytes: int) -> int:
    """`keep_groups` for a model with this `head_dim` and element size.

    Raises `ValueError` as `storage_format` does, or if no `keep_groups` meets `budget`
    for packed tokens.
    """
    storage = storage_format(config, head_dim, elem_bytes)
    dense = storage.dense_token_bytes
    if config.groups_kept is not None:
        if config.budget is not None:
            ratio = storage.token_bytes(config.keep_groups, scored=False) / dense
            if ratio > config.budget:
                raise ValueError(
                    f"keep_groups={config.keep_groups} stores {ratio:.4f} of the dense bytes, "
                    f"above budget={config.budget}"
                )
        return config.groups_kept
    fitting = [
        k
        for k in range(1, config.num_groups + 1)
        if storage.token_bytes(k, scored=False) / dense <= config.budget
    ]
    if not fitting:
        lowest = storage.token_bytes(1, scored=False) / dense
        raise ValueError(
            f"budget={config.budget} is below {lowest:.4f}, the smallest ratio reachable with whole "
            f"keys and num_groups={config.num_groups} (axes='both' or 'tokens' also evicts tokens)"
        )
    return max(fitting)
