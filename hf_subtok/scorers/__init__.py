"""Scorers: which tokens (per KV head) and which value groups of a token are worth storing.

Each scorer lives in its own file and registers itself by name; `get_group_scorer(name)`
returns an instance. Scorers only return scores; packing is the storage's job.
"""

from hf_subtok.scorers.attention_value import AttentionValueScorer
from hf_subtok.scorers.base import (
    GroupScorer,
    available_group_scorers,
    get_group_scorer,
    register_group_scorer,
)
from hf_subtok.scorers.expected_attention import ExpectedAttentionScorer
from hf_subtok.scorers.key_norm import KeyNormScorer
from hf_subtok.scorers.snapkv import SnapKVScorer
from hf_subtok.scorers.streaming import StreamingScorer
from hf_subtok.scorers.token_base import (
    PRIORITY,
    Observation,
    RopeInfo,
    TokenScorer,
    available_token_scorers,
    get_token_scorer,
    register_token_scorer,
)
from hf_subtok.scorers.tova import TOVAScorer
from hf_subtok.scorers.value_norm import ValueNormScorer

__all__ = [
    "AttentionValueScorer",
    "ExpectedAttentionScorer",
    "GroupScorer",
    "RopeInfo",
    "KeyNormScorer",
    "Observation",
    "PRIORITY",
    "SnapKVScorer",
    "StreamingScorer",
    "TokenScorer",
    "TOVAScorer",
    "available_token_scorers",
    "get_token_scorer",
    "register_token_scorer",
    "ValueNormScorer",
    "available_group_scorers",
    "get_group_scorer",
    "register_group_scorer",
]
