"""PNG plots: the layer-importance heatmap of one run, and the overlap matrix of several."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..mask import layer_of  # noqa: E402


def grid(names: list[str]) -> tuple[list[str], list[str], dict[str, tuple[int, int]]]:
    """Rows (blocks), columns (module types within a block) and each layer's cell."""
    rows, cols, cell = [], [], {}
    for name in names:
        block = layer_of(name, "block")
        kind = name[len(block) + 1 :] or "block"
        if block not in rows:
            rows.append(block)
        if kind not in cols:
            cols.append(kind)
        cell[name] = (rows.index(block), cols.index(kind))
    return rows, cols, cell


def heatmap(path: Path, scores: dict[str, float], selected: list[str], title: str) -> None:
    """Blocks x module types, colour = learned gate; selected layers marked with a white dot."""
    rows, cols, cell = grid(list(scores))
    values = [[float("nan")] * len(cols) for _ in rows]
    for name, score in scores.items():
        r, c = cell[name]
        values[r][c] = score
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(cols), 1.5 + 0.28 * len(rows)))
    image = ax.imshow(values, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    chosen = [cell[n] for n in selected]
    ax.scatter([c for _, c in chosen], [r for r, _ in chosen], s=22, c="white", edgecolors="black", linewidths=0.6)
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), [r.rsplit(".", 1)[-1] for r in rows], fontsize=7)
    ax.set_ylabel(rows[0].rsplit(".", 1)[0] + ".*" if len(rows) > 1 else "block")
    ax.set_title(f"{title}\nwhite dots: the {len(selected)} selected layers", fontsize=9)
    fig.colorbar(image, ax=ax, label="gate (importance)")
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
            ax.text(j, i, f"{jaccard[i][j]:.2f}", ha="center", va="center", fontsize=8,
                    color="black" if jaccard[i][j] > 0.5 else "white")
    ax.set_xticks(range(n), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="Jaccard overlap")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
