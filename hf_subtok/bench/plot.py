"""PNG plot of quality against stored-bytes ratio (matplotlib, Agg backend)."""

from __future__ import annotations

import logging
from pathlib import Path

from hf_subtok.bench.report import group_by

logger = logging.getLogger(__name__)

_PANELS = (
    ("needle", "in_prompt", "needle accuracy\n(question in compressed prompt)", "correct"),
    ("needle", "after", "needle accuracy\n(question after compression)", "correct"),
    ("ppl", None, "perplexity (lower is better)", "ppl"),
)


def _points(rows: list[dict], suite: str, setting: str | None, metric: str) -> dict[str, list[tuple]]:
    """label -> [(ratio, quality, masked)] per budget, averaged over cases."""
    chosen = [
        r for r in rows
        if r.get("suite") == suite and r.get("status") == "ok" and (setting is None or r.get("setting") == setting)
    ]
    series: dict[str, list[tuple]] = {}
    for (label, _budget, _bits), group in sorted(
        group_by(chosen, "label", "budget", "bits").items(), key=lambda kv: str(kv[0])
    ):
        masked = any(r.get("masked") for r in group)
        ratio_key = "effective_ratio" if masked else "ratio"
        ratio = sum(r[ratio_key] for r in group) / len(group)
        quality = sum(float(r[metric]) for r in group) / len(group)
        series.setdefault(label, []).append((ratio, quality, masked))
    return {k: sorted(v) for k, v in series.items()}


def plot_quality_vs_ratio(rows: list[dict], path: str | Path, title: str = "") -> str | None:
    """Write the plot to `path`; returns the path, or None when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(p, _points(rows, *p[0:2], p[3])) for p in _PANELS]
    panels = [(p, pts) for p, pts in panels if pts]
    if not panels:
        logger.warning("nothing to plot (no needle or ppl rows)")
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 5.0), squeeze=False)
    markers = "os^vD<>pPX*h"
    labels = sorted({label for _, pts in panels for label in pts}, key=lambda s: (s != "dense", s != "subtok", s))
    style = {label: (f"C{i % 10}", markers[i % len(markers)]) for i, label in enumerate(labels)}
    for ax, ((_, _, name, metric), pts) in zip(axes[0], panels, strict=True):
        for label, points in pts.items():
            color, marker = style[label]
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            masked = any(p[2] for p in points)
            ax.plot(xs, ys, color=color, linewidth=1, alpha=0.7)
            ax.scatter(
                xs, ys, color="none" if masked else color, edgecolors=color, marker="*" if label == "dense" else marker,
                s=120 if label == "dense" else 40, label=label + (" (masked, holds dense)" if masked else ""), zorder=3,
            )
        if metric != "ppl":
            ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("stored bytes / dense bytes")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
        ax.set_xlim(0, 1.05)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=min(len(names), 4), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    rows = -(-len(names) // 4)
    fig.tight_layout(rect=(0, 0.06 * rows, 1, 1))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
