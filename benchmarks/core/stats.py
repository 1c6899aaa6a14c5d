"""The statistics every study computes, each defined once: overlaps and rank correlation with their random
expectation, top-k sets through the library's `resolve_top_k` and the overlap rules, a difference paired over items;
the pooled noise scale and the 2-SE rule are the library's judge (`peft_ila.app.judge`), re-exported."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Hashable, Iterable

from peft_ila import resolve_top_k
from peft_ila.app.compare import jaccard, spearman
from peft_ila.app.judge import BEYOND, NOISE_RULE, beyond, difference, forgetting, judge, pooled_sd, show

# re-exported: the studies take every statistic from here (the noise and its rule from the library's judge, which
# `peft-ila versus` judges with too)
__all__ = [
    "BEYOND",
    "NOISE_RULE",
    "beyond",
    "difference",
    "forgetting",
    "jaccard",
    "judge",
    "listed",
    "paired_difference",
    "pooled_sd",
    "show",
    "spearman",
]


def paired_difference(a: list[float], b: list[float]) -> tuple[float, float] | None:
    """mean(a - b) over paired items (the same prompts, say) and its standard error, the spread of the item
    differences / sqrt(items); None with fewer than two items."""
    if len(a) != len(b):
        raise ValueError(f"paired_difference: {len(a)} items against {len(b)}; pair every item once")
    if len(a) < 2:
        return None
    gaps = [x - y for x, y in zip(a, b, strict=True)]
    return sum(gaps) / len(gaps), statistics.stdev(gaps) / math.sqrt(len(gaps))


class Runs:
    """Fine-tunes grouped by (dataset, arm), `arm(run)` naming what a run tried (a selector and its share, a mode and
    its regime): each metric's values in a group (`metrics`: name -> a run's value, None when not known), the pooled
    seed-to-seed noise over the groups `pooled(arm)` admits, and differences ± SE judged by it."""

    def __init__(
        self,
        runs: Iterable[dict],
        arm: Callable[[dict], Hashable],
        metrics: dict[str, Callable[[dict], float | None]],
        pooled: Callable[[Hashable], bool] = lambda arm: True,
    ) -> None:
        self.groups: dict[tuple[str, Hashable], list[dict]] = {}
        for run in runs:
            self.groups.setdefault((run["dataset"], arm(run)), []).append(run)
        self.metrics, self.pooled = metrics, pooled

    def values(self, dataset: str, arm: Hashable, what: str = "loss") -> list[float]:
        """`what` of each run of `arm` on `dataset` (those where it is known), in run order."""
        found = (self.metrics[what](run) for run in self.groups.get((dataset, arm), []))
        return [value for value in found if value is not None]

    def sigma(self, dataset: str, what: str = "loss", among: Callable[[Hashable], bool] | None = None) -> float | None:
        """The pooled seed-to-seed spread of `what` on `dataset` over the arms `among` admits (default: `pooled`)."""
        admit = among or self.pooled
        return pooled_sd([self.values(d, arm, what) for d, arm in self.groups if d == dataset and admit(arm)])

    def noise(self, dataset: str, what: str, a: Hashable, b: Hashable) -> float | None:
        """The noise a comparison of arms `a` and `b` is judged by: the dataset's pooled spread."""
        return self.sigma(dataset, what)

    def delta(self, dataset: str, a: Hashable, b: Hashable, what: str = "loss") -> tuple[float, float] | None:
        """mean(a) - mean(b) of `what` on `dataset` and its standard error; None when a side or the noise is missing."""
        return difference(self.values(dataset, a, what), self.values(dataset, b, what), self.noise(dataset, what, a, b))

    def per_dataset(self, datasets: Iterable[str], a: Hashable, b: Hashable, what: str = "loss") -> dict:
        """dataset -> `delta`, for the datasets where it is known."""
        found = {dataset: self.delta(dataset, a, b, what) for dataset in datasets}
        return {dataset: delta for dataset, delta in found.items() if delta is not None}


def listed(deltas: dict, empty: str = "not measured yet") -> str:
    """Named differences ± SE as one phrase ("alpaca +0.0012 ± 0.0040, lima ..."), or `empty`."""
    return ", ".join(f"{name} {show(delta)}" for name, delta in deltas.items()) or empty


HOLDS, PARTLY = 0.80, 0.50  # overlap rules (top-k Jaccard) of the paper's findings on overlap
OVERLAP_RULE = f"≥ {HOLDS:.2f} holds, ≥ {PARTLY:.2f} partly"


def expected_random_jaccard(n: int, k: int) -> float:
    """E[|A & B| / |A | B|] for two independent uniformly random k-subsets of n (hypergeometric overlap)."""
    total = math.comb(n, k)
    return sum(math.comb(k, i) * math.comb(n - k, k - i) / total * i / (2 * k - i) for i in range(k + 1))


def top_k(scores: dict[str, float], k: int, largest: bool = True) -> list[str]:
    """The k names with the largest (or smallest) scores; ties keep candidate order."""
    order = {name: i for i, name in enumerate(scores)}
    sign = -1 if largest else 1
    return sorted(scores, key=lambda n: (sign * scores[n], order[n]))[:k]


def top_count(fraction: float, n: int) -> int:
    """How many of n layers a top `fraction` holds: as many as `resolve_top_k` keeps, and at least one (a small
    fraction of a small set, e.g. 5% of 2 blocks, would round to none)."""
    return resolve_top_k(fraction, n) if fraction * n >= 0.5 else 1


def top_set(scores: dict[str, float], fraction: float) -> list[str]:
    """The top `fraction` of the layers by score (`top_count` of them; ties: candidate order)."""
    return top_k(scores, top_count(fraction, len(scores)))


def overlap_verdict(value: float) -> str:
    """The paper's overlap findings judged on a top-k Jaccard (`OVERLAP_RULE`)."""
    return "holds" if value >= HOLDS else ("partly holds" if value >= PARTLY else "does not hold")
