"""PNG plots: the layer-importance heatmap of one run, the overlap matrix of several, and `versus`'s held-out loss
against forgetting."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from ..tuner.selection import CERTAIN, layer_of


def grid(names: list[str]) -> tuple[list[str], list[str], dict[str, tuple[int, int]]]:
    """Rows (module types within a block), columns (blocks) and each layer's cell."""
    blocks, kinds, cell = [], [], {}
    for name in names:
        block = layer_of(name, "block")
        kind = name[len(block) + 1 :] or "block"
        if block not in blocks:
            blocks.append(block)
        if kind not in kinds:
            kinds.append(kind)
        cell[name] = (kinds.index(kind), blocks.index(block))
    return kinds, blocks, cell


def heatmap(
    path: Path, scores: dict[str, float], selected: list[str], title: str, confidence: dict[str, float] | None = None
) -> None:
    """Module types x blocks, colour = importance score in [0, 1]; selected layers marked with a white dot, hollow
    where their `confidence` is below 0.9."""
    kinds, blocks, cell = grid(list(scores))
    values = [[float("nan")] * len(blocks) for _ in kinds]
    for name, score in scores.items():
        r, c = cell[name]
        values[r][c] = score
    fig, ax = plt.subplots(figsize=(2.5 + 0.32 * len(blocks), 1.6 + 0.32 * len(kinds)))
    image = ax.imshow(values, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    confidence = confidence or {}
    for certain in (True, False):
        chosen = [cell[n] for n in selected if (confidence.get(n, 1.0) >= CERTAIN) == certain]
        face = "white" if certain else "none"
        edge = "black" if certain else "white"
        ax.scatter([c for _, c in chosen], [r for r, _ in chosen], s=18, c=face, edgecolors=edge, linewidths=0.9)
    ax.set_yticks(range(len(kinds)), kinds, fontsize=8)
    ax.set_xticks(range(len(blocks)), [b.rsplit(".", 1)[-1] for b in blocks], fontsize=7)
    ax.set_xlabel(f"block ({blocks[0].rsplit('.', 1)[0]}.N)" if "." in blocks[0] else "block", fontsize=8)
    unsure = sum(confidence.get(n, 1.0) < CERTAIN for n in selected)
    hollow = f" (hollow: {unsure} below {CERTAIN:.0%} confidence)" if confidence else ""
    ax.set_title(f"{title}\nwhite dots: the {len(selected)} selected layers{hollow}", fontsize=9)
    fig.colorbar(image, ax=ax, label="importance score", fraction=0.025, pad=0.01)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def overlap_matrix(path: Path, labels: list[str], jaccard: list[list[float]], title: str) -> None:
    """Pairwise Jaccard overlap of selected sets, annotated."""
    n = len(labels)
    fig, ax = plt.subplots(figsize=(2.5 + 0.8 * n, 2.0 + 0.7 * n))
    image = ax.imshow(jaccard, cmap="magma", vmin=0.0, vmax=1.0)
    for i in range(n):
        for j in range(n):
            ax.text(
                j,
                i,
                f"{jaccard[i][j]:.2f}",
                ha="center",
                va="center",
                fontsize=8,
                color="black" if jaccard[i][j] > 0.5 else "white",
            )
    ax.set_xticks(range(n), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="Jaccard overlap")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def versus_plot(path: Path, runs: list[dict], base: dict, modes: list[str]) -> None:
    """Held-out loss (x) against forgetting (y), one colour per mode: each run's checkpoints joined in step order
    (faint where the mode has several runs, with their mean at each step drawn over them), the base model a black
    star; without forgetting (no reference sets), held-out loss against step."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    forgetting = any(point["forgetting"] is not None for run in runs for point in run["checkpoints"])
    x_of, y_of = ("held_out", "forgetting") if forgetting else ("step", "held_out")
    start = [{**base, "forgetting": 0.0}] if forgetting else []
    for colour, mode in zip(plt.cm.tab10.colors, modes, strict=False):
        curves = [[*start, *run["checkpoints"]] for run in runs if run["mode"] == mode]
        if len(curves) > 1:
            for points in curves:
                ax.plot([p[x_of] for p in points], [p[y_of] for p in points], "-", color=colour, lw=0.6, alpha=0.3)
        points, label = _mean_curve(curves), mode if len(curves) == 1 else f"{mode} (mean of {len(curves)})"
        ax.plot([p[x_of] for p in points], [p[y_of] for p in points], "o-", color=colour, ms=3, lw=1.2, label=label)
    if forgetting:
        ax.plot([base["held_out"]], [0.0], "k*", markersize=10, label="base model")
    ax.set_xlabel("held-out loss" if forgetting else "step")
    ax.set_ylabel("forgetting (reference sets' loss rise)" if forgetting else "held-out loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _mean_curve(curves: list[list[dict]]) -> list[dict]:
    """The mean of several runs' points at each step all of them measured (the base model's point, stepless, first
    when they start from it): {step, held_out, forgetting (None where a run has none)}."""
    steps = [p.get("step") for p in curves[0] if all(any(q.get("step") == p.get("step") for q in c) for c in curves)]
    mean = []
    for step in steps:
        at = [next(q for q in c if q.get("step") == step) for c in curves]
        rises = [q["forgetting"] for q in at]
        held_out = sum(q["held_out"] for q in at) / len(at)
        mean.append({"step": step, "held_out": held_out, "forgetting": None if None in rises else sum(rises) / len(at)})
    return mean
