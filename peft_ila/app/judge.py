"""The noise and the rule every verdict uses, defined once: `peft-ila versus` and every study judge with these;
and training curves compared at matched held-out loss (`at_matched_loss`; past their best, `past_best`).

A difference between two groups of seeds counts when it is larger than `BEYOND` standard errors; the standard error
comes from the pooled seed-to-seed standard deviation (the noise scale) of the groups compared."""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Iterable

BEYOND = 2.0  # a difference counts when larger than this many standard errors
NOISE_RULE = f"a difference counts beyond {BEYOND:g} standard errors (see the noise scale above)"


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
    """A difference and its standard error, as every page prints them."""
    return "missing" if delta is None else f"{delta[0]:+.4f} ± {delta[1]:.4f}"


def forgetting(after: dict[str, float], base: dict[str, float]) -> float | None:
    """The mean rise of the reference sets' losses `after` a fine-tune over the base model's (`base`, by set name):
    what the fine-tune forgot (negative: it helped them too). None without a reference set, or while the base
    model's loss on one is not known."""
    if not after or not set(after) <= set(base):
        return None
    return statistics.mean(after[name] - base[name] for name in after)


def ratio(value: float | None, reference: float | None) -> float | None:
    """`value` in units of `reference` (a cost ratio: 0.5 is half the reference's); None when either is missing or
    the reference is not positive."""
    if value is None or reference is None or reference <= 0:
        return None
    return value / reference


LEVELS = 41  # held-out losses, evenly spaced over a matched range, at which curves are compared


def curve(checkpoints: list[dict], base: float) -> list[tuple[float, float]]:
    """A run's training curve: (held-out loss, forgetting) at its checkpoints in step order, from the base model's
    (`base`, 0)."""
    return [(base, 0.0), *((point["held_out"], point["forgetting"]) for point in checkpoints)]


def along(curve: list[tuple[float, float]], level: float) -> float | None:
    """On a training curve of (held-out loss, y) points in step order, y where the held-out loss first reaches
    `level` (linear between the two checkpoints around it); None when it never does."""
    if curve and curve[0][0] <= level:
        return curve[0][1]
    for (before, y0), (after, y1) in itertools.pairwise(curve):
        if after <= level:
            return y0 + (y1 - y0) * (before - level) / (before - after)
    return None


def matched_range(curves: list[list[tuple[float, float]]]) -> tuple[float, float] | None:
    """The held-out losses every curve reaches: from the highest of their lowest to the lowest of their starts; None
    when they share none."""
    low, high = max(min(h for h, _ in c) for c in curves), min(c[0][0] for c in curves)
    return (low, high) if low < high else None


def matched(curves: list[list[tuple[float, float]]], span: tuple[float, float]) -> list[float]:
    """Each curve's mean y over `LEVELS` held-out losses evenly spaced across `span` (which every curve reaches)."""
    low, high = span
    levels = [low + (high - low) * i / (LEVELS - 1) for i in range(LEVELS)]
    return [statistics.mean(along(curve, level) for level in levels) for curve in curves]


def at_matched_loss(a: list[list[tuple[float, float]]], b: list[list[tuple[float, float]]]) -> dict | None:
    """Two arms' curves (one per seed; y: forgetting, say) compared over the held-out losses all of them reach:
    {"range": (low, high), "a": per-seed means, "b": per-seed means, "delta": mean(a) - mean(b) ± SE from the two
    arms' pooled seed spread (None with one seed each)}; None when the curves share no held-out loss."""
    span = matched_range([*a, *b])
    if span is None:
        return None
    ys_a, ys_b = matched(a, span), matched(b, span)
    return {"range": span, "a": ys_a, "b": ys_b, "delta": difference(ys_a, ys_b, pooled_sd([ys_a, ys_b]))}


def between_checkpoints(a: list[list[tuple[float, float]]], b: list[list[tuple[float, float]]]) -> dict | None:
    """`at_matched_loss` on the curves without their base-model point: over the held-out losses every curve reaches
    from its first checkpoint on, leaving out the straight line from the base model to it (a stretch no checkpoint
    measured, where the comparison only scales the first checkpoints' gap)."""
    return at_matched_loss([c[1:] for c in a], [c[1:] for c in b])


def rising(curve: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The part of a training curve from its lowest held-out loss on (its overfitting), held-out losses negated: its
    rise then reads as a fall, so `along` finds where the held-out loss first climbs back to a level."""
    lowest = min(range(len(curve)), key=lambda i: curve[i][0])
    return [(-held_out, y) for held_out, y in curve[lowest:]]


def past_best(a: list[list[tuple[float, float]]], b: list[list[tuple[float, float]]]) -> dict | None:
    """`at_matched_loss` past the curves' best checkpoints: each seed's y where its held-out loss first climbs back
    to each level between the highest of their lowest losses and the lowest of their highest after it ("range", as
    held-out losses); None when they do not overlap there (a curve still falling at its end has no such part)."""
    found = at_matched_loss([rising(c) for c in a], [rising(c) for c in b])
    if found is None:
        return None
    low, high = found["range"]
    return {**found, "range": (-high, -low)}


MATCHED = {"matched": at_matched_loss, "between_checkpoints": between_checkpoints, "past_best": past_best}
"""The comparisons at matched held-out loss a page shows for an arm against another, by the key it shows each under:
on the way down, between the checkpoints only, and past the best checkpoints."""
