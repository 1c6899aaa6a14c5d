"""`peft-ila compare`: how much do the important layers of several runs agree?"""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

from .files import staged_dir, write_json
from .plots import overlap_matrix
from .report import read_run


def jaccard(a: set[str], b: set[str]) -> float:
    """|A ∩ B| / |A ∪ B| (1.0 for two empty sets)."""
    return len(a & b) / len(a | b) if a | b else 1.0


def _ranks(values: list[float]) -> list[float]:
    """Average ranks (1 = smallest), ties sharing the mean rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman rank correlation (Pearson correlation of average ranks); NaN if either side is constant."""
    rx, ry = _ranks(x), _ranks(y)
    n = len(x)
    mx, my = sum(rx) / n, sum(ry) / n
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    return cov / (vx * vy) ** 0.5 if vx and vy else float("nan")


def compare(runs: list[Path], out: Path, overwrite: bool = False) -> str:
    """Write compare.json and compare.png into `out`; return a printable table."""
    records = [read_run(run) for run in runs]
    labels = [Path(run).name for run in runs]
    sets = [set(r["selected"]) for r in records]
    matrix = [[jaccard(a, b) for b in sets] for a in sets]
    pairs = []
    for i, j in combinations(range(len(runs)), 2):
        common = [n for n in records[i]["candidates"] if n in records[j]["scores"] and n in records[i]["scores"]]
        pairs.append(
            {
                "a": labels[i],
                "b": labels[j],
                "jaccard": matrix[i][j],
                "shared_selected": len(sets[i] & sets[j]),
                "spearman": spearman(
                    [records[i]["scores"][n] for n in common], [records[j]["scores"][n] for n in common]
                )
                if len(common) > 1
                else float("nan"),
                "common_candidates": len(common),
            }
        )
    with staged_dir(out, overwrite) as tmp:
        write_json(
            tmp / "compare.json", {"runs": [str(r) for r in runs], "labels": labels, "jaccard": matrix, "pairs": pairs}
        )
        overlap_matrix(tmp / "compare.png", labels, matrix, "Overlap of ILA-selected layers (Jaccard)")
    lines = [f"{'run A':<20} {'run B':<20} {'Jaccard':>7} {'shared':>6} {'Spearman':>8}"]
    lines += [
        f"{p['a']:<20} {p['b']:<20} {p['jaccard']:7.3f} {p['shared_selected']:>6} {p['spearman']:8.3f}" for p in pairs
    ]
    lines.append(f"wrote {out}/compare.json and {out}/compare.png")
    return "\n".join(lines)
