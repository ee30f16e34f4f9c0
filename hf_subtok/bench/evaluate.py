"""Run every method of a case from one shared prefill, and record one row per method."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from hf_subtok.bench.apply import Compressed, Unreachable, build_cache, release
from hf_subtok.bench.methods import MethodSpec
from hf_subtok.bench.prefill import DensePrefill
from hf_subtok.bench.resume import skip_finished

logger = logging.getLogger(__name__)


def subtok_spec(budget: float) -> MethodSpec:
    return MethodSpec("subtok", budget)


def run_methods(
    ctx,
    prefill: DensePrefill,
    base: dict,
    key_prefix: str,
    evaluate: Callable[[Compressed], dict],
    input_ids: torch.Tensor,
) -> None:
    """Evaluate each of `ctx.methods` not yet in `ctx.store` on `prefill`; store one row each.

    Methods run in order dense, subtok, kvpress, quantized, so each press can be matched to
    the stored bytes plain subtok measured at the same budget on this very context (`MATCHING`).

    Args:
        ctx: the run's `BenchContext`.
        prefill: the shared dense prefill of exactly `input_ids`.
        base: fields common to every row of this case (suite, lengths, ...).
        key_prefix: identifies the case; the method name is appended.
        evaluate: quality of one method's cache, e.g. `{"correct": True, "answer": ...}`.
        input_ids: `[1, T]`, for presses that need their own prefill.
    """
    ours: dict[float, float] = {}
    for spec in ctx.methods:
        key = f"{ctx.run_id}|{key_prefix}|{spec.name}"
        if skip_finished(ctx, key, spec, ours):
            continue
        row = {**base, "key": key, "run_id": ctx.run_id, **method_fields(spec)}
        compressed = None
        try:
            match = None
            if spec.family == "kvpress":
                match, row["matched_to"] = _match(ctx, spec.budget, prefill, ours)
            compressed = build_cache(
                spec,
                ctx.model,
                prefill,
                window=ctx.config.window,
                match_ratio=match,
                input_ids=input_ids,
                hooked=spec.family == "kvpress" and spec.press in ctx.hooked_presses,
            )
            row.update(
                status="ok",
                stored_bytes=compressed.stored_bytes,
                dense_bytes=compressed.dense_bytes,
                ratio=compressed.ratio,
                compress_s=compressed.seconds,
                **compressed.info,
            )
            row.update(evaluate(compressed))
            if spec.is_plain_subtok:
                ours[spec.budget] = compressed.ratio
        except Unreachable as e:
            row.update(status="unreachable", reason=str(e))
        except Exception as e:  # noqa: BLE001 - one failing method must not lose the others
            logger.exception("%s failed on %s", spec.name, key_prefix)
            row.update(status="error", reason=f"{type(e).__name__}: {e}")
        finally:
            release(ctx.model, compressed)
            del compressed
        ctx.store.add(row)
        ctx.advance()


def method_fields(spec: MethodSpec) -> dict:
    """The fields every row of `spec` carries (name, label, family, budget, bits, ...)."""
    return {"method": spec.name, "label": spec.label, "family": spec.family, "press": spec.press,
            "budget": spec.budget, "bits": spec.bits, "backend": spec.backend, "variant": spec.variant,
            "prefill_chunk": spec.prefill_chunk}


def _match(ctx, budget: float, prefill: DensePrefill, ours: dict[float, float]) -> tuple[float, str]:
    """Stored/dense ratio a press at `budget` must reach on this context, and how it was found."""
    if budget not in ours:
        reason = ctx.subtok_unreachable(budget)
        if reason is None:
            # subtok at this budget was not asked for: measure its bytes anyway (no decoding)
            try:
                compressed = build_cache(subtok_spec(budget), ctx.model, prefill, window=ctx.config.window)
                ours[budget] = compressed.ratio
                del compressed
            except Unreachable:
                pass
    if budget in ours:
        return ours[budget], f"subtok@{budget:g} measured on this context ({ours[budget]:.4f})"
    return budget, f"target budget {budget:g} (subtok cannot reach it)"

