"""Compute kernels over packed value groups.

Each kernel has a pure PyTorch reference (the CPU path and the test oracle) in a
`*_reference.py` module beside it.
"""

from hf_subtok.kernels.pack_reference import pack_value_groups
from hf_subtok.kernels.packed_attention_reference import packed_attention, packed_value_matmul

__all__ = ["pack_value_groups", "packed_attention", "packed_value_matmul"]
