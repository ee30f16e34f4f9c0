"""The rank axis: per-layer, per-KV-head bases calibrated on real text, tokens stored as their
first r coefficients (r per token), attention computed in the projected space
(`hf_subtok.kernels.rank_attention`).

`calibrate_bases(model, tokenizer, text)` (or `hf-subtok calibrate`) makes `RankBases`, a Hub
artifact like the routers; `RankBases.layer(i)` gives a layer's `LayerBases` for
`project_tokens` / `reconstruct_tokens` / `rank_view`. A cache whose config names `key_bases`
(bases calibrated before RoPE) loads them with `key_bases.layer_key_bases` and stores its
per-channel keys as coefficients in them (`hf_subtok.quant.basis_keys`).
"""

from hf_subtok.rank.artifact import RankBases
from hf_subtok.rank.calibrate import calibrate_bases
from hf_subtok.rank.config import BasesConfig
from hf_subtok.rank.projection import LayerBases, project_tokens, rank_view, reconstruct_tokens

__all__ = [
    "BasesConfig",
    "LayerBases",
    "RankBases",
    "calibrate_bases",
    "project_tokens",
    "rank_view",
    "reconstruct_tokens",
]
