"""Bytes a stored token costs: the one place the cache's size arithmetic lives.

`memory_report()` measures the tensors; these formulas only let the allocator plan ahead,
and tests check that plans and measurements agree.
"""

from __future__ import annotations

from dataclasses import dataclass

INDEX_BYTES = 1  # uint8 group index per kept value group
SCORE_BYTES = 4  # float32 token score per stored token (re-allocation while decoding)
SCALE_BYTES = 2  # float16 / bfloat16 scale and zero point per quantization group


@dataclass(frozen=True)
class StorageFormat:
    """How one KV head stores a packed token: whole key `[D]`, K value groups of `D / G`
    channels, each with its index; in the model's element size or in `bits` bits with a
    scale and zero per `group_size` channels (at most a key's `D` or a group's width)."""

    head_dim: int
    num_groups: int
    elem_bytes: int
    bits: int | None = None
    group_size: int = 32

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
    def key_bytes(self) -> int:
        return self._vector_bytes(self.head_dim, self.key_group_size)

    @property
    def slot_bytes(self) -> int:
        """One kept value group with its index."""
        return self._vector_bytes(self.width, self.value_group_size) + INDEX_BYTES

    def token_bytes(self, keep_groups: int, scored: bool) -> int:
        """Bytes of one packed token with `keep_groups` groups (and its score if `scored`)."""
        return self.key_bytes + keep_groups * self.slot_bytes + (SCORE_BYTES if scored else 0)

    @property
    def dense_token_bytes(self) -> int:
        """What a dense cache holds per token and head: key and value in the model's dtype."""
        return 2 * self.head_dim * self.elem_bytes
