"""hf-subtok: sub-token (value-group) KV-cache compression for transformers' generate()."""

from hf_subtok.attention import SUPPORTED_MODEL_TYPES, install_attention, uninstall_attention
from hf_subtok.cache import SubTokenCache
from hf_subtok.config import SubTokenConfig
from hf_subtok.generate_args import CACHE_ARGUMENT, cache_kwargs
from hf_subtok.presets import PRESETS

__all__ = [
    "CACHE_ARGUMENT",
    "PRESETS",
    "SUPPORTED_MODEL_TYPES",
    "SubTokenCache",
    "SubTokenConfig",
    "cache_kwargs",
    "install_attention",
    "uninstall_attention",
]
__version__ = "0.1.0"
