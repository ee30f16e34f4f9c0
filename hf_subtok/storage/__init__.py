"""Storage: the layer on transformers' `CacheLayerMixin` contract (`layer`), the operations on
what it stores (`tensors`), and the wide tokens of adaptive span (`wide`). It owns every byte
and knows the memory layout; what to keep it is told (scores, plans) by the cache's policy."""

from hf_subtok.storage.layer import SubTokenLayer

__all__ = ["SubTokenLayer"]
