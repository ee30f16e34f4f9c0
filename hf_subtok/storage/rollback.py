"""Rolling back the newest tokens (`crop`, for assisted decoding and prompt lookup), which only
lossless storage can do exactly (`SubTokenLayer` inherits these methods)."""

from __future__ import annotations

import inspect

from transformers.cache_utils import DynamicLayer

from hf_subtok.storage.tensors import first_tokens

# transformers 5.2 calls `crop(max_length)` (an absolute length, negative counts from the
# end); later releases call `crop(tokens_to_remove)` with a negative count.
_CROP_TAKES_LENGTH = "max_length" in inspect.signature(DynamicLayer.crop).parameters


class Rollback:
    """The `SubTokenLayer` methods of transformers' `crop` contract."""

    @property
    def is_croppable(self) -> bool:
        """Whether `crop` restores exactly the cache that never saw the cropped tokens: only
        with `lossless` storage. A lossy layer may have packed, evicted or re-selected tokens
        because of the tokens to crop, so assisted decoding and prompt lookup are refused with
        it (transformers checks this flag)."""
        return self.lossless

    def crop(self, length_or_removed: int) -> None:
        """Drop the newest tokens (assisted decoding); see `_CROP_TAKES_LENGTH` for the argument.

        Raises `ValueError` for a lossy layer (`is_croppable` is False): what it packed or
        evicted because of the cropped tokens cannot be restored."""
        if not self.is_croppable:
            raise ValueError(
                "this SubTokenCache's config is lossy, so it cannot roll back (crop) the tokens assisted "
                "decoding or prompt lookup rejected; use the 'lossless' preset or a DynamicCache for them"
            )
        if self.rows is not None:
            removed = self.seen_tokens - self._crop_keep(length_or_removed)
            for row in self.rows:
                row.crop(row.seen_tokens - removed if _CROP_TAKES_LENGTH else -removed)
            self.seen_tokens -= removed
            return
        self._flush()
        keep = self._crop_keep(length_or_removed)
        if keep >= self.seen_tokens or not self.is_initialized:
            return
        stored = self.packed_keys.shape[-2]
        self.room = {}  # cropped tensors are copies: the next append starts a buffer of its own
        if keep >= stored:
            self.window.truncate(keep - stored)
        else:
            self.packed_keys = first_tokens(self.packed_keys, keep)
            self._open_key_tokens = 0  # the cut block stays as it is; new tokens start a block
            self.packed_values = first_tokens(self.packed_values, keep)
            if self.group_idx is not None:
                self.group_idx = self.group_idx[..., :keep].clone()
            self.window.truncate(0)
        self.seen_tokens = keep

    def _crop_keep(self, length_or_removed: int) -> int:
        """Tokens `crop(length_or_removed)` keeps."""
        if _CROP_TAKES_LENGTH:
            keep = (
                length_or_removed
                if length_or_removed >= 0
                else self.seen_tokens + length_or_removed
            )
        else:
            if length_or_removed > 0:
                raise ValueError(
                    f"crop takes a negative number of tokens to remove, got {length_or_removed}"
                )
            keep = self.seen_tokens + length_or_removed
        if keep < 0:
            raise ValueError(f"cannot crop {self.seen_tokens} tokens to {keep}")
        return keep
