"""The statistics every study computes, each defined once: overlaps and rank correlation with their random
expectation, top-k sets through the library's `resolve_top_k`, the pooled noise scale, and the verdict rules."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable

from peft_ila import resolve_top_k
from peft_ila.app.compare import jaccard, spearman

__all__ = ["jaccard", "spearman"]  # re-exported: the studies take every statistic from here

BEYOND = 2.0  # a difference counts when larger than this many standard errors
HOLDS, PARTLY = 0.80, 0.50  # overlap rules (top-k Jaccard) of the paper's findings on overlap
OVERLAP_RULE = f"≥ {HOLDS:.2f} holds, ≥ {PARTLY:.2f} partly"
NOISE_RULE = f"a difference counts beyond {BEYOND:g} standard errors (see the noise scale above)"


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


def pooled_sd(samples: Iterable[list[float]]) -> float | None:
    """Pooled standard deviation of several groups of samples (groups of one add nothing); None without any."""
    groups = [s for s in samples if len(s) > 1]
    dof = sum(len(s) - 1 for s in groups)
    if dof == 0:
        return None
    return math.sqrt(sum((len(s) - 1) * statistics.variance(s) for s in groups) / dof)


def difference(a: list[float], b: list[float], sigma: float | None) -> tuple[float, float] | None:
    """mean(a) - mean(b) and its standard error sigma * sqrt(1/n_a + 1/n_b); None when a side or sigma is missing."""
    if not a or not b or sigma is None:
        return None
    return statistics.mean(a) - statistics.mean(b), sigma * math.sqrt(1 / len(a) + 1 / len(b))


def beyond(delta: tuple[float, float]) -> int:
    """-1 when a difference is below -BEYOND standard errors, +1 above +BEYOND, 0 within the noise."""
    value, error = delta
    return -1 if value < -BEYOND * error else (1 if value > BEYOND * error else 0)


def judge(deltas: Iterable[tuple[float, float]], better: str, worse: str, tie: str) -> str:
    """`better` when every difference is below the noise, `worse` when any is above it, else `tie`."""
    signs = [beyond(delta) for delta in deltas]
    return better if signs and all(s < 0 for s in signs) else (worse if 1 in signs else tie)


def show(delta: tuple[float, float] | None) -> str:
    """A difference and its standard error, as the pages print them."""
    return "missing" if delta is None else f"{delta[0]:+.4f} ± {delta[1]:.4f}"
