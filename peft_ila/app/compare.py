"""`peft-ila compare`: how much do the important layers of several runs agree?"""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

from ..tuner.selection import same_weights
from . import UsageError
from .files import staged_dir, write_json
from .plots import overlap_matrix
from .report import read_run, run_model


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


def default_labels(runs: list[Path]) -> list[str]:
    """Each run's shortest path ending that no other run shares (`alpaca/identify`, `lima/identify`)."""
    paths = [Path(run).resolve() for run in runs]
    labels = []
    for path in paths:
        others = [other for other in paths if other != path]
        n = 1
        while n < len(path.parts) and any(other.parts[-n:] == path.parts[-n:] for other in others):
            n += 1
        labels.append("/".join(path.parts[-n:]))
    return labels


def _same_model(a: dict, b: dict) -> bool:
    same = same_weights(a, b)
    return a["model"] == b["model"] if same is None else same


def compare(runs: list[Path], out: Path, overwrite: bool = False, labels: list[str] | None = None) -> str:
    """Write compare.json and compare.png into `out`; return a printable table. Runs on other models or candidate
    sets are compared on their common candidate layers only, with a note saying so."""
    if len(runs) < 2:
        raise UsageError(f"compare needs at least two run directories to compare, {len(runs)} given; pass another.")
    if labels is not None and len(labels) != len(runs):
        raise UsageError(f"--label given {len(labels)} time(s) for {len(runs)} runs; give one per run, in order.")
    records, selections = zip(*(read_run(run) for run in runs), strict=True)
    labels = labels or default_labels(runs)
    matrix = [[1.0] * len(runs) for _ in runs]
    pairs, notes = [], []
    for i, j in combinations(range(len(runs)), 2):
        a, b = records[i], records[j]
        sa, sb = selections[i], selections[j]
        common = [n for n in sa.candidates if n in set(sb.candidates)]
        chosen = [set(s.selected) & set(common) for s in (sa, sb)]
        matrix[i][j] = matrix[j][i] = jaccard(*chosen)
        same_model = _same_model(run_model(a), run_model(b))
        if not same_model:
            notes.append(
                f"note: {labels[i]} and {labels[j]} come from different models ({run_model(a)['model']} and "
                f"{run_model(b)['model']})"
            )
        if sa.candidates != sb.candidates:
            notes.append(
                f"note: {labels[i]} and {labels[j]} are compared on their {len(common)} common candidate layers only "
                f"(of {len(sa.candidates)} and {len(sb.candidates)})"
            )
        pairs.append(
            {
                "a": labels[i],
                "b": labels[j],
                "jaccard": matrix[i][j],
                "shared_selected": len(chosen[0] & chosen[1]),
                "spearman": spearman([sa.scores[n] for n in common], [sb.scores[n] for n in common])
                if len(common) > 1
                else float("nan"),
                "common_candidates": len(common),
                "same_model": same_model,
            }
        )
    with staged_dir(out, overwrite, "a compare directory") as tmp:
        write_json(
            tmp / "compare.json", {"runs": [str(r) for r in runs], "labels": labels, "jaccard": matrix, "pairs": pairs}
        )
        overlap_matrix(tmp / "compare.png", labels, matrix, "Overlap of ILA-selected layers (Jaccard)")
    width = max(7, *(len(label) for label in labels))
    lines = [*notes, f"{'run A':<{width}} {'run B':<{width}} {'Jaccard':>7} {'shared':>6} {'Spearman':>8}"]
    lines += [
        f"{p['a']:<{width}} {p['b']:<{width}} {p['jaccard']:7.3f} {p['shared_selected']:>6} {p['spearman']:8.3f}"
        for p in pairs
    ]
    lines.append(f"wrote {out}/compare.json and {out}/compare.png")
    return "\n".join(lines)
