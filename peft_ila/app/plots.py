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
    """Held-out loss (x) against forgetting (y), every checkpoint of every run joined in step order, one colour per
    mode, the base model a black star; without forgetting (no reference sets), held-out loss against step."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    forgetting = any(point["forgetting"] is not None for run in runs for point in run["checkpoints"])
    for colour, mode in zip(plt.cm.tab10.colors, modes, strict=False):
        for number, run in enumerate(r for r in runs if r["mode"] == mode):
            points = [{**base, "forgetting": 0.0}, *run["checkpoints"]] if forgetting else run["checkpoints"]
            x = [p["held_out"] if forgetting else p["step"] for p in points]
            y = [p["forgetting"] if forgetting else p["held_out"] for p in points]
            label = mode if number == 0 else None
            ax.plot(x, y, "o-", color=colour, markersize=3, linewidth=0.8, alpha=0.8, label=label)
    if forgetting:
        ax.plot([base["held_out"]], [0.0], "k*", markersize=10, label="base model")
    ax.set_xlabel("held-out loss" if forgetting else "step")
    ax.set_ylabel("forgetting (reference sets' loss rise)" if forgetting else "held-out loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
