"""A policy per band of layers from evidence (PolyKV, issue 23.7).

Layers play different roles, so one token scorer, precision and share of the budget for all
of them may not be best. `search_policy` starts from one policy (a recipe's fields at one
budget) and, band by band (the first quarter of the layers, the second, ...), tries another
token scorer, another precision and a larger or smaller share of the budget for that band
alone, on held-out text: perplexity of `eval_tokens` after a compressed prefix of the needle's
filler chapters (`haystack`), which neither perplexity text of the recipe search uses. A
band keeps the setting that lowers the mean negative log-likelihood by more than `margin`
nats; the rest of the layers share what a band's budget leaves (`LayerOverride`). The
result is a list of overrides by depth, which a recipe can carry; whether it beats the one
policy is then decided by the recipe search on the needle and both perplexity texts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from hf_subtok.bench.apply import Unreachable, build_cache
from hf_subtok.bench.decoding import continuation_nll
from hf_subtok.bench.methods import MethodSpec
from hf_subtok.bench.prefill import dense_prefill
from hf_subtok.config import SubTokenConfig
from hf_subtok.quant import SUPPORTED_BITS
from hf_subtok.scorers import available_token_scorers
from hf_subtok.tasks import as_input_ids, build_ppl_case

logger = logging.getLogger(__name__)

TUNING_TEXT = "haystack"  # held out: the recipe search scores perplexity on "ppl" and "legal"
BUDGET_SCALES = (0.5, 1.5)  # a band's share of the budget relative to the rest


@dataclass
class Trial:
    """One measured policy: the band tried, its setting, the NLL, and whether the band kept it."""

    band: str
    setting: dict
    nll: float
    kept: bool = False


@dataclass
class PolicyResult:
    """The overrides found (by depth; empty: the one policy was not beaten) and every trial."""

    budget: float
    base_nll: float
    overrides: list[dict] = field(default_factory=list)
    trials: list[Trial] = field(default_factory=list)

    @property
    def nll(self) -> float:
        kept = [t.nll for t in self.trials if t.kept]
        return kept[-1] if kept else self.base_nll

    def to_dict(self) -> dict:
        return {
            "budget": self.budget, "base_nll": self.base_nll, "nll": self.nll, "overrides": self.overrides,
            "trials": [vars(t) for t in self.trials],
        }


def band_ranges(bands: int) -> list[str]:
    """`bands` equal shares of the depth: 4 -> ["0-25%", "25-50%", "50-75%", "75-100%"]."""
    if bands < 1:
        raise ValueError(f"bands must be >= 1, got {bands}")
    return [f"{100 * i / bands:g}-{100 * (i + 1) / bands:g}%" for i in range(bands)]


def band_options(fields: dict, budget: float) -> list[dict]:
    """What a band may set apart from `fields`: another token scorer, another precision (when
    the policy quantizes), a smaller or larger share of the budget."""
    scorer = fields.get("token_scorer", SubTokenConfig.token_scorer)
    options = [{"token_scorer": name} for name in available_token_scorers() if name != scorer]
    if fields.get("bits") is not None:
        options += [{"bits": bits} for bits in (*SUPPORTED_BITS, "auto") if bits != fields["bits"]]
    options += [{"budget": round(budget * scale, 6)} for scale in BUDGET_SCALES if budget * scale <= 1.0]
    return options


def search_policy(
    model,
    tokenizer,
    fields: dict,
    budget: float,
    *,
    bands: int = 4,
    prefix_tokens: int = 2048,
    eval_tokens: int = 512,
    text: str = TUNING_TEXT,
    margin: float = 0.002,
) -> PolicyResult:
    """Band by band, the setting that lowers the held-out NLL of `fields` at `budget` most
    (kept only when by more than `margin` nats). See the module docstring."""
    case = build_ppl_case(tokenizer, prefix_tokens, eval_tokens, text)
    prefix, eval_ids = as_input_ids(case.prefix_ids), as_input_ids(case.eval_ids)
    prefill = dense_prefill(model, prefix, capture_hidden=False)
    base_overrides = list(fields.get("overrides", []))

    def nll(overrides: list[dict]) -> float:
        options = {**fields, "recipe": None, "overrides": base_overrides + overrides}
        spec = MethodSpec("subtok", budget, variant="layer-policy", options=tuple(options.items()))
        compressed = build_cache(spec, model, prefill, window=None)
        total, count = continuation_nll(model, compressed.cache, prefix.shape[1], eval_ids, prefill.last_logits)
        return total / count

    result = PolicyResult(budget, nll([]))
    current = result.base_nll
    for band in band_ranges(bands):
        tried = []
        for option in band_options(fields, budget):
            try:
                value = nll([*result.overrides, {"layers": band, **option}])
            except (Unreachable, ValueError) as e:  # e.g. a band's budget the rest cannot make up
                logger.info("layer policy at %s: %s %s left out (%s)", budget, band, option, e)
                continue
            tried.append(Trial(band, option, value))
        result.trials += tried
        best = min(tried, key=lambda t: t.nll, default=None)
        if best is not None and best.nll < current - margin:
            best.kept = True
            current = best.nll
            result.overrides.append({"layers": band, **best.setting})
        logger.info("layer policy at %s, layers %s: %s (NLL %.4f)", budget, band,
                    best.setting if best is not None and best.kept else "as the rest", current)
    return result
