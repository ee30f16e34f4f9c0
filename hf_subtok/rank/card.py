"""The model card (README.md) of saved bases, from `hf_subtok/model_cards/bases_card.md`."""

from __future__ import annotations

from importlib import resources

from huggingface_hub import ModelCardData

from hf_subtok.routers.card import UPSTREAM

TEMPLATE = "bases_card.md"
TAGS = ["hf-subtok", "kv-cache-compression", "low-rank", "rank-axis"]


def render_card(config, nbytes: int, repo_id: str | None = None) -> str:
    """README.md text for bases with `BasesConfig` `config` holding `nbytes` bytes."""
    repo_id = repo_id or f"<user>/{_slug(config.base_model)}-subtok-bases"
    data = ModelCardData(
        library_name="hf-subtok",
        base_model=UPSTREAM.get(config.base_model, config.base_model if "/" in config.base_model else None),
        tags=TAGS,
        hf_subtok={"kind": "rank-bases", "base_model": config.base_model, "centered": config.centered, "key_space": config.key_space},
    )
    template = (resources.files("hf_subtok") / "model_cards" / TEMPLATE).read_text(encoding="utf-8")
    return template.format(
        card_data=data.to_yaml(),
        repo_name=repo_id.split("/")[-1],
        repo_id=repo_id,
        base_model=config.base_model,
        num_layers=config.num_layers,
        num_kv_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        centered_sentence=", around their calibration means" if config.centered else "",
        bytes_mib=f"{nbytes / 2**20:.2f}",
        positions_sentence=_positions_sentence(config.calibration.get("window")),
        calibration_summary="\n".join(f"- {k}: `{v}`" for k, v in config.calibration.items()) or "Not recorded.",
        metrics_table=_metrics_table(config.metrics),
    )


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name.split("/")[-1]).strip("-") or "model"


def _positions_sentence(window) -> str:
    if not isinstance(window, int):
        return ""
    return (
        f"Keys after RoPE depend on the position: these were fitted on positions 0-{window - 1} (the calibration "
        "window) and rebuild keys further on less well; calibrate with windows as long as your contexts."
    )


def _metrics_table(metrics: dict) -> str:
    errors = metrics.get("relative_error") if metrics else None
    if not errors:
        return "Not measured."
    ranks = list(next(iter(errors.values())))
    header = "| tokens | " + " | ".join(f"r = {r}" for r in ranks) + " |\n|---|" + "---|" * len(ranks)
    rows = [f"| {name} | " + " | ".join(f"{errors[name][r]:.4f}" for r in ranks) + " |" for name in errors]
    return "\n".join([header, *rows])
