"""The rank axis: per-layer, per-KV-head bases calibrated on real text, tokens stored as their
first r coefficients (r per token), attention computed in the projected space.

Nothing here is imported by `hf_subtok` itself.
"""

from hf_subtok.rank.projection import LayerBases, project_tokens, rank_view, reconstruct_tokens

__all__ = ["LayerBases", "project_tokens", "rank_view", "reconstruct_tokens"]
