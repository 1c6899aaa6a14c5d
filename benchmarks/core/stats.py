"""The statistics every study computes, each defined once: overlaps and rank correlation with their random
expectation, top-k sets through the library's `resolve_top_k` and the overlap rules;
the pooled noise scale and the 2-SE rule are the library's judge (`peft_ila.app.judge`), re-exported."""

from __future__ import annotations

import math

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
    "pooled_sd",
    "show",
    "spearman",
]

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
