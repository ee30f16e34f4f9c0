"""The keyword that hands a cache to `model.generate()` and `model(...)`.

transformers 5.25 renamed `past_key_values=` to `cache=` in `GenerationMixin.generate` and in
the models' `forward` (the old name still works there, with a FutureWarning); 5.2 only knows
`past_key_values=`. `CACHE_ARGUMENT` is the name the installed version expects, read once from
the list of cache names `generate` uses (the version decides where that list is missing).
"""

from __future__ import annotations

import transformers
from packaging.version import Version
from transformers.generation import utils as _generation_utils

# first transformers release whose generate() and forward() take `cache=`
CACHE_RENAMED_IN = Version("5.25.0.dev0")


def _cache_argument() -> str:
    names = getattr(_generation_utils, "ALL_CACHE_NAMES", None)
    if names is not None:
        return "cache" if "cache" in names else "past_key_values"
    return "cache" if Version(transformers.__version__) >= CACHE_RENAMED_IN else "past_key_values"


CACHE_ARGUMENT: str = _cache_argument()


def cache_kwargs(cache) -> dict:
    """`{CACHE_ARGUMENT: cache}`, to spread into `model.generate(...)` or `model(...)`."""
    return {CACHE_ARGUMENT: cache}
