"""Learned routers: trained value-group routers and query-aware token selectors, shared on the Hub.

`RouterAdapter.from_pretrained(repo_or_folder)` loads one; `SubTokenCache(model, config,
router=adapter)` uses it. `hf-subtok train-router` (see `hf_subtok.training`) trains one.
Nothing here is imported by `hf_subtok` itself.
"""

from hf_subtok.routers.adapter import LoraWeights, RouterAdapter
from hf_subtok.routers.config import RouterConfig, model_identity
from hf_subtok.routers.modules import GroupRouter, RouterModules, TokenSelector
from hf_subtok.routers.scorers import LearnedGroupScorer, LearnedTokenScorer

__all__ = [
    "GroupRouter",
    "LearnedGroupScorer",
    "LearnedTokenScorer",
    "LoraWeights",
    "RouterAdapter",
    "RouterConfig",
    "RouterModules",
    "TokenSelector",
    "model_identity",
]
