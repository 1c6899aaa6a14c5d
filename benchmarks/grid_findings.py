"""The grid's findings: the paper's four, then what the grid adds, each judged by a stated rule against a noise
scale from the same grid.

Noise: on each dataset, sigma is the pooled standard deviation over seeds of the held-out loss after, within each
selector that ran with several seeds; a difference between the means of n_a and n_b seeds has the standard error
sigma * sqrt(1/n_a + 1/n_b) (likewise for forgetting). A difference counts when it exceeds twice its standard error.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import replace
from itertools import combinations

from benchmarks.core.page import Finding
from benchmarks.core.stats import (
    NOISE_RULE,
    OVERLAP_RULE,
    beyond,
    difference,
    expected_random_jaccard,
    jaccard,
    judge,
    overlap_verdict,
    pooled_sd,
    show,
)
from benchmarks.core.stats import (
    forgetting as judge_forgetting,
)
from peft_ila.tuner.config import parse_budget

GOALS = {"step": 0.8, "memory": 0.75, "budget_loss": 0.01}  # the goals (and the budget's own share)


ALL, ALL_TIME, RANDOM = ("all", 1.0), ("all-time", 1.0), ("random", 0.25)
TRANSFER, TRANSFER_FROM = "ila-transfer", "lima"  # ILA's top 25% on the primary dataset, from lima's mask
ILA25, ILA75 = ("ila", 0.25), ("ila", 0.75)
Method = tuple[str, float]  # a selector and the share of candidate layers it picks


def early_stage1(stage1: int) -> int:
    """The stage-1 steps of the early mask: a quarter of the preset's."""
    return max(1, stage1 // 4)


def groups(results: dict) -> dict[tuple[str, Method], list[dict]]:
    """(dataset, (selector, share)) -> its fine-tunes (one per seed), in plan order."""
    out: dict[tuple[str, Method], list[dict]] = {}
    for tune in results["tunes"]:
        out.setdefault((tune["dataset"], (tune["selector"], tune["share"])), []).append(tune)
    return out


def forgetting(results: dict, tune: dict) -> float | None:
    """The mean rise of the other datasets' held-out loss over the base model's (None until all bases are known)."""
    return judge_forgetting(tune["others_after"], results["base"])


def memory_rise(tune: dict) -> float:
    """MB: a fine-tune's peak resident memory minus that at its start."""
    return tune["memory"].get("rss_rise_mb", 0.0)


class Stats:
    """Means, spreads and the noise scale of the grid's fine-tunes."""

    def __init__(self, results: dict) -> None:
        self.results, self.groups = results, groups(results)

    def values(self, dataset: str, method: Method, what: str = "loss") -> list[float]:
        tunes = self.groups.get((dataset, method), [])
        if what == "loss":
            return [t["loss_after"] for t in tunes]
        found = [forgetting(self.results, t) for t in tunes]
        return [] if None in found else found

    def sigma(self, dataset: str, what: str = "loss") -> float | None:
        """The pooled spread over seeds (equal-time runs left out: their seeds ran different step counts)."""
        return pooled_sd([self.values(d, m, what) for d, m in self.groups if d == dataset and m != ALL_TIME])

    def delta(self, dataset: str, a: Method, b: Method, what: str = "loss") -> tuple[float, float] | None:
        """mean(a) - mean(b) and its standard error; None when either is missing or there is no noise scale."""
        return difference(self.values(dataset, a, what), self.values(dataset, b, what), self.sigma(dataset, what))

    def ratio(self, dataset: str, a: Method, b: Method, key: str) -> float | None:
        """a's cost over b's, measured side by side (the dataset's timing cell): `key` "median_step_seconds" or
        "memory" (the peak memory rise); None until both are timed."""
        rows = {(row["selector"], row["share"]): row for row in self.results.get("timing", {}).get(dataset, [])}
        field = "memory_rise_mb" if key == "memory" else key
        if a not in rows or b not in rows or rows[b][field] <= 0:
            return None
        return rows[a][field] / rows[b][field]


def provisional(verdict: str, judged: list[str], datasets: list[str]) -> str:
    """`verdict`, marked provisional while some datasets cannot be judged yet (a cell or their noise scale missing)."""
    missing = [d for d in datasets if d not in judged]
    if not judged:
        return "not judged yet"
    return verdict if not missing else f"provisional (not judged yet on {', '.join(missing)}: {WAITING}): {verdict}"


def per_dataset(stats: Stats, datasets: list[str], a: Method, b: Method, what: str = "loss") -> dict:
    """dataset -> (mean(a) - mean(b), its standard error), for the datasets where both are known."""
    found = {d: stats.delta(d, a, b, what) for d in datasets}
    return {d: delta for d, delta in found.items() if delta is not None}


def listed(deltas: dict) -> str:
    return ", ".join(f"{d} {show(delta)}" for d, delta in deltas.items()) or WAITING


WAITING = "a cell, or the noise scale that a second seed gives, is missing"


def mask_rows(results: dict, seed: int = 0, stage1: int | None = None) -> dict[str, dict]:
    """dataset -> its mask row with `seed` and `stage1` steps (default: the preset's)."""
    stage1 = stage1 or results["settings"]["stage1"]
    return {m["dataset"]: m for m in results["masks"] if (m["seed"], m["stage1"]) == (seed, stage1)}


def masks_of(results: dict, seed: int = 0, stage1: int | None = None) -> dict[str, set[str]]:
    """dataset -> the top 25% of its mask with `seed` and `stage1` steps (default: the preset's)."""
    return {name: set(row["selected"]) for name, row in mask_rows(results, seed, stage1).items()}


def seed_overlap(results: dict) -> float | None:
    """Top-25% Jaccard of the primary dataset's masks with two seeds (the ranking's noise floor)."""
    primary, seeds = results["datasets"][0], results["settings"]["seeds"]
    first, second = masks_of(results).get(primary), masks_of(results, seeds[1]).get(primary) if seeds[1:] else None
    return None if first is None or second is None else jaccard(first, second)


def finding_datasets(results: dict) -> Finding:
    claim = "Important layers overlap about 90% across alignment datasets"
    rule = f"mean top-25% Jaccard {OVERLAP_RULE}; two seeds on one dataset: the noise floor"
    masks = masks_of(results)
    if len(masks) < 2:
        return Finding(claim, "not judged yet", "fewer than two datasets' masks computed", rule)
    pairs = {f"{a}/{b}": jaccard(masks[a], masks[b]) for a, b in combinations(masks, 2)}
    mean = statistics.mean(pairs.values())
    k, n = len(next(iter(masks.values()))), results["settings"]["candidates"]
    floor = seed_overlap(results)
    evidence = f"mean {mean:.2f} ({', '.join(f'{p} {j:.2f}' for p, j in pairs.items())}); two seeds on one dataset: "
    evidence += f"{fmt(floor, 2)}; two random sets: {expected_random_jaccard(n, k):.2f}"
    verdict = provisional(overlap_verdict(mean), list(masks), results["datasets"])
    return Finding(claim, verdict, evidence, rule)


def finding_freeze(results: dict, stats: Stats) -> Finding:
    claim = "Freezing the least important 25% (ILA top 75%) improves on LoRA on all layers"
    rule = f"better on every dataset holds, worse on any does not hold, else within the noise; {NOISE_RULE}"
    deltas = per_dataset(stats, results["datasets"], ILA75, ALL)
    verdict = judge(deltas.values(), "holds", "does not hold", "within the noise")
    evidence = f"Δ held-out loss vs LoRA-all: {listed(deltas)}"
    return Finding(claim, provisional(verdict, list(deltas), results["datasets"]), evidence, rule)


def ratios(stats: Stats, datasets: list[str], a: Method, key: str) -> dict[str, float]:
    """dataset -> mean(a's cost) / mean(LoRA-all's), for the datasets where both are known."""
    found = {d: stats.ratio(d, a, ALL, key) for d in datasets}
    return {d: value for d, value in found.items() if value is not None}


def finding_top25(results: dict, stats: Stats) -> Finding:
    claim = "Tuning only the top 25% keeps quality at lower cost"
    rule = (
        f"quality holds when no dataset is worse than LoRA-all; cost meets the goals at ≤ {GOALS['step']}× step time "
        f"and ≤ {GOALS['memory']}× memory rise on every dataset; {NOISE_RULE}"
    )
    datasets = results["datasets"]
    deltas, steps = per_dataset(stats, datasets, ILA25, ALL), ratios(stats, datasets, ILA25, "median_step_seconds")
    memory, random = ratios(stats, datasets, ILA25, "memory"), per_dataset(stats, datasets, ILA25, RANDOM)
    quality = "does not hold" if any(beyond(d) > 0 for d in deltas.values()) else "holds"
    cheap = all(steps[d] <= GOALS["step"] and memory.get(d, math.inf) <= GOALS["memory"] for d in steps)
    cost = ("meets" if cheap else "misses") + " the goals" if steps else "not timed yet"
    verdict = f"quality {quality}, cost {cost}" if deltas else "not judged yet"
    if random:
        verdict += f"; against random 25%: {judge(random.values(), 'better', 'worse', 'within the noise')}"
    evidence = (
        f"Δ held-out loss vs LoRA-all: {listed(deltas)}; side by side, step time × {_ratios(steps)}, memory rise × "
        f"{_ratios(memory)} of LoRA-all's; Δ vs random 25%: {listed(random)}"
    )
    return Finding(claim, provisional(verdict, list(deltas), datasets), evidence, rule)


def _ratios(values: dict[str, float]) -> str:
    return ", ".join(f"{dataset} {value:.2f}" for dataset, value in values.items()) or "–"


def finding_early(results: dict) -> Finding:
    """Whether a quarter of stage 1's budget gives the whole budget's mask: a question of identification's cost. The
    paper's claim that important layers are found early in stage 1 is judged once, within one run, on STABILITY.md
    (two identifications of different budgets also differ by stage 2's noise, which this one cannot tell apart)."""
    claim = "A quarter of stage 1 finds the top 25% the whole stage 1 finds"
    stage1 = results["settings"]["stage1"]
    early = early_stage1(stage1)
    rule = f"top-25% Jaccard between {early} and {stage1} stage-1 steps {OVERLAP_RULE}"
    primary = results["datasets"][0]
    full, short = masks_of(results).get(primary), masks_of(results, 0, early).get(primary)
    if full is None or short is None:
        return Finding(claim, "not judged yet", f"the {primary} masks at {early} and {stage1} steps", rule)
    value, floor = jaccard(full, short), seed_overlap(results)
    evidence = f"Jaccard {value:.2f} on {primary}; two seeds at {stage1} steps: "
    evidence += "not computed yet" if floor is None else f"{floor:.2f}"
    evidence += "; whether important layers are found early in stage 1 is judged within one run on STABILITY.md"
    return Finding(claim, overlap_verdict(value), evidence, rule)


def finding_equal_time(results: dict, stats: Stats) -> Finding:
    claim = "At equal wall time, identification included, ILA top 25% beats LoRA on all layers"
    rule = f"LoRA-all runs for the seconds ILA spent identifying plus fine-tuning; {NOISE_RULE}"
    deltas = per_dataset(stats, results["datasets"][:1], ILA25, ALL_TIME)
    if not deltas:
        return Finding(claim, "not judged yet", f"the equal-time LoRA-all runs: {WAITING}", rule)
    dataset, delta = next(iter(deltas.items()))
    steps = [t["steps"] for t in stats.groups[(dataset, ALL_TIME)]]
    verdict = {-1: "holds", 0: "a tie within the noise", 1: "does not hold: LoRA-all is better"}[beyond(delta)]
    evidence = f"Δ held-out loss (ILA − LoRA-all given {', '.join(map(str, steps))} steps) on {dataset}: {show(delta)}"
    evidence += f"; at equal steps: {show(stats.delta(dataset, ILA25, ALL))}; the extra steps changed LoRA-all's own "
    evidence += f"loss by {show(stats.delta(dataset, ALL_TIME, ALL))}"
    return Finding(claim, verdict, evidence, rule)


def finding_forgetting(results: dict, stats: Stats) -> Finding:
    claim = "Freezing layers forgets less: ILA top 25% / 75% against LoRA on all layers"
    rule = (
        "forgetting is the mean rise of the other datasets' held-out loss over the base model (negative: it fell, "
        f"a transfer); less (or more) at equal steps on every dataset counts; {NOISE_RULE}. Per unit of gain "
        "(forgetting / own gain) is shown for the comparison at equal gain. ARC-Easy changes are shown, not judged: on "
        f"{results['settings']['questions']} questions one evaluation's standard error is about "
        f"{_accuracy_error(results):.1%}"
    )
    parts, verdicts, judged = [], [], set()
    for method, name in ((ILA25, "top 25%"), (ILA75, "top 75%")):
        deltas = per_dataset(stats, results["datasets"], method, ALL, "forgetting")
        judged |= set(deltas)
        word = judge(deltas.values(), "less", "more", "no difference beyond the noise")
        verdicts.append(f"{name}: {word}" if deltas else f"{name}: not judged yet")
        ratio = lambda d, m: _per_gain(results, stats, d, m)  # noqa: E731
        per_gain = ", ".join(f"{d} {ratio(d, method)} vs {ratio(d, ALL)}" for d in deltas)
        parts.append(
            f"{name} Δ forgetting {listed(deltas)}; per unit of gain (ILA vs LoRA-all) {per_gain or '–'}; "
            f"Δ ARC-Easy {_knowledge(stats, method)}"
        )
    verdict = provisional("; ".join(verdicts), sorted(judged), results["datasets"])
    return Finding(claim, verdict, "; ".join(parts), rule)


def _per_gain(results: dict, stats: Stats, dataset: str, method: Method) -> str:
    """Mean forgetting over mean gain of `method` on `dataset`."""
    gain = results["base"][dataset] - statistics.mean(stats.values(dataset, method))
    return f"{statistics.mean(stats.values(dataset, method, 'forgetting')) / gain:+.3f}"


def _accuracy_error(results: dict) -> float:
    p = results.get("base_knowledge", 0.5)
    return math.sqrt(p * (1 - p) / results["settings"]["questions"])


def _knowledge(stats: Stats, method: Method) -> str:
    out = []
    for (dataset, m), tunes in stats.groups.items():
        base = stats.groups.get((dataset, ALL))
        if m == method and base:
            mean = lambda ts: statistics.mean(t["knowledge_after"] for t in ts)  # noqa: E731
            out.append(f"{dataset} {mean(tunes) - mean(base):+.1%}")
    return ", ".join(out) or "–"


def finding_budget(results: dict, stats: Stats) -> Finding:
    budget, *others = results["settings"]["budgets"]
    resource, share = parse_budget(budget)
    key, what = {"time": ("median_step_seconds", "step time"), "memory": ("memory", "memory rise")}[resource]
    claim = f"Cost-aware ILA ({budget}) costs ≤ {share:g}× LoRA-all's {what} within +1% held-out loss"
    rule = f"{what} (side by side) and mean held-out loss against LoRA-all's on the primary dataset, both at once"
    primary, method = results["datasets"][0], (f"ila@{budget}", 0.25)
    delta, ratio = stats.delta(primary, method, ALL), stats.ratio(primary, method, ALL, key)
    if delta is None or ratio is None:
        return Finding(claim, "not judged yet", f"the cost-aware runs on {primary}: {WAITING}", rule)
    relative = delta[0] / statistics.mean(stats.values(primary, ALL))
    met = ratio <= share and relative <= GOALS["budget_loss"]
    evidence = f"{what} × {ratio:.2f}, Δ held-out loss {show(delta)} ({relative:+.1%}) on {primary}; the trade-off: "
    evidence += ", ".join(_trade_off(stats, primary, m, key) for m in [*((f"ila@{b}", 0.25) for b in others), ILA25])
    return Finding(claim, "holds" if met else "does not hold", evidence, rule)


def _trade_off(stats: Stats, dataset: str, method: Method, key: str) -> str:
    """A selection's cost ratio and loss change against LoRA-all, as one phrase."""
    delta, ratio = stats.delta(dataset, method, ALL), stats.ratio(dataset, method, ALL, key)
    name = "plain top 25%" if method == ILA25 else f"within {method[0][4:]}"
    if delta is None or ratio is None:
        return f"{name}: {WAITING}"
    return f"{name} × {ratio:.2f}, Δ {show(delta)}"


def finding_cheap(results: dict, stats: Stats) -> Finding:
    claim = "ILA top 25% beats every cheap selector (adapter gradient norm, KappaTune, Spectrum SNR, first-order)"
    rule = f"ILA better than each by more than the noise on the primary dataset; {NOISE_RULE}"
    primary = results["datasets"][0]
    cheap = [(selector, 0.25) for selector in results["settings"]["cheap"]]
    deltas = {s[0]: stats.delta(primary, ILA25, s, "loss") for s in cheap}
    known = {name: delta for name, delta in deltas.items() if delta is not None}
    if not known:
        return Finding(claim, "not judged yet", "no cheap selector computed yet", rule)
    verdict = judge(known.values(), "holds", "does not hold", "not beyond the noise")
    if len(known) < len(cheap):
        verdict = f"provisional ({len(cheap) - len(known)} not computed yet): {verdict}"
    evidence = f"Δ held-out loss, ILA − selector, on {primary}: {listed(known)}"
    return Finding(claim, verdict, evidence, rule)


def findings(results: dict) -> list[Finding]:
    """The paper's four findings, then what this grid adds, each judged by its rule."""
    stats = Stats(results)
    found = {
        "grid-overlap": finding_datasets(results),
        "grid-freeze-quarter": finding_freeze(results, stats),
        "grid-top25": finding_top25(results, stats),
        "grid-quarter-stage1": finding_early(results),
        "grid-equal-time": finding_equal_time(results, stats),
        "grid-forgetting": finding_forgetting(results, stats),
        "grid-budget": finding_budget(results, stats),
        "grid-cheap-selectors": finding_cheap(results, stats),
    }
    return [replace(finding, id=name) for name, finding in found.items()]


def fmt(value: float | None, digits: int = 4) -> str:
    return "not computed yet" if value is None else f"{value:.{digits}f}"
