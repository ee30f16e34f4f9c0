"""TOVA: keep the tokens the newest query attends to most, averaged over the layer's heads.

Oren et al., "Transformers are Multi-State RNNs", arXiv 2401.06104 (kvpress's TOVAPress).
"""

from __future__ import annotations

import torch

from hf_subtok.scorers.token_base import PRIORITY, Observation, TokenScorer, register_token_scorer


@register_token_scorer
class TOVAScorer(TokenScorer):
    """Softmax attention of the prompt's last query to each key, averaged over all query heads
    of the layer (TOVA's layer-wise policy: every KV head gets the same row; `per_kv_head`
    averages only the query heads sharing each KV head instead). The newest token itself
    scores `PRIORITY`, as kvpress keeps it; TOVA keeps no sinks."""

    name = "tova"
    needs_queries = True
    per_kv_head = False

    def score_tokens(
        self, keys: torch.Tensor, values: torch.Tensor, observation: Observation | None
    ) -> torch.Tensor:
        if observation is None:
            raise ValueError("token_scorer 'tova' needs the prompt's queries (observation=None)")
        batch, kv_heads, tokens, _ = keys.shape
        query = observation.queries[:, :, -1:].float()  # [B, Hq, 1, D], at position T-1
        group = query.shape[1] // kv_heads
        k = keys.float().repeat_interleave(group, dim=1)  # [B, Hq, T, D]
        logits = (query @ k.transpose(-1, -2)).squeeze(2) * observation.scaling  # [B, Hq, T]
        # the last query sees every key causally; only padding is hidden from it
        if observation.key_valid is not None:
            logits = logits.masked_fill(
                ~observation.key_valid.view(batch, 1, tokens), float("-inf")
            )
        probs = logits.softmax(dim=-1).nan_to_num(0.0)  # [B, Hq, T]
        if self.per_kv_head:
            scores = probs.view(batch, kv_heads, group, tokens).mean(2)  # [B, Hkv, T]
        else:
            scores = probs.mean(1, keepdim=True).expand(batch, kv_heads, tokens).clone()
        scores[..., -1] = PRIORITY  # the newest token is never evicted
        return scores
