"""The model card (README.md) of a saved router, from `hf_subtok/model_cards/router_card.md`."""

from __future__ import annotations

from importlib import resources

from huggingface_hub import ModelCardData

TEMPLATE = "router_card.md"
TAGS = ["hf-subtok", "kv-cache-compression", "sub-token-routing", "lora"]
# hf-subtok's embedded default model is this Hub model, dequantized from its Q4_1 GGUF
UPSTREAM = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def render_card(config, repo_id: str | None = None) -> str:
    """README.md text for a router with `RouterConfig` `config`; `repo_id` fills the usage code."""
    repo_id = repo_id or f"<user>/{_slug(config.base_model)}-subtok-router"
    data = ModelCardData(
        library_name="hf-subtok",
        base_model=UPSTREAM.get(
            config.base_model, config.base_model if "/" in config.base_model else None
        ),
        tags=TAGS,
        hf_subtok={
            "budget": config.budget,
            "num_groups": config.num_groups,
            "keep_groups": config.keep_groups,
            "base_model": config.base_model,
            "selector": config.selector,
            "lora_r": config.lora_r,
            "metrics": config.metrics,
        },
    )
    template = (resources.files("hf_subtok") / "model_cards" / TEMPLATE).read_text(encoding="utf-8")
    return template.format(
        card_data=data.to_yaml(),
        repo_name=repo_id.split("/")[-1],
        repo_id=repo_id,
        base_model=config.base_model,
        keep_groups=config.keep_groups,
        num_groups=config.num_groups,
        budget_percent=f"{100 * config.budget:.1f}%",
        selector_sentence=(
            "A query-aware selector ranks tokens for eviction from the prompt's last queries."
            if config.selector
            else "It has no token selector (token eviction uses the cache's own scorer)."
        ),
        lora_sentence=(
            f"It was trained together with a rank-{config.lora_r} LoRA adapter of the base model that "
            "learns to read the compressed values."
            if config.lora_r
            else "It needs no change to the base model."
        ),
        training_summary=_training_summary(config.training),
        metrics_table=_metrics_table(config.metrics),
    )


def _slug(name: str) -> str:
    return (
        "".join(c if c.isalnum() or c in "-_." else "-" for c in name.split("/")[-1]).strip("-")
        or "model"
    )


def _training_summary(training: dict) -> str:
    if not training:
        return "Not recorded (this router was saved before or without a training run)."
    lines = [f"- {key}: `{value}`" for key, value in training.items()]
    return "\n".join(lines)


def _metrics_table(metrics: dict) -> str:
    """Markdown table of the `metrics` recorded by `hf-subtok train-router`."""
    rows = metrics.get("rows") if metrics else None
    if not rows:
        return "Not measured yet (run `hf-subtok train-router` to evaluate on held-out text)."
    header = "| method | budget (measured) | held-out ppl | needle accuracy |\n|---|---|---|---|"
    body = [
        f"| {r['method']} | {_fmt(r.get('ratio'), '.3f')} | {_fmt(r.get('ppl'), '.3f')} | "
        f"{_fmt(r.get('needle_accuracy'), '.2f')} |"
        for r in rows
    ]
    notes = metrics.get("notes")
    return "\n".join([header, *body] + ([f"\n{notes}"] if notes else []))


def _fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)
