"""The grid's findings and page (`GRID.md`; `grid.py` computes the cells): a table of every dataset and method, the
findings (the paper's four, then what the grid adds, each judged by a stated rule), the masks, the step time and
memory side by side, the step-cost model and ILA's overhead.

Noise: on each dataset, sigma is the pooled standard deviation over seeds of the held-out loss after, within each
selector that ran with several seeds; a difference between the means of n_a and n_b seeds has the standard error
sigma * sqrt(1/n_a + 1/n_b) (likewise for forgetting). A difference counts when it exceeds twice its standard error.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import replace
from itertools import combinations

from benchmarks.core.page import Column, Finding, columns, findings_section, missing_section, number, table
from benchmarks.core.stats import (
    NOISE_RULE,
    OVERLAP_RULE,
    Runs,
    beyond,
    expected_random_jaccard,
    forgetting,
    jaccard,
    judge,
    listed,
    overlap_verdict,
    show,
)
from peft_ila.app.judge import ratio
from peft_ila.identification.cost import StepCost
from peft_ila.tuner.config import parse_budget
from peft_ila.tuner.selection import layer_of

GOALS = {"step": 0.8, "memory": 0.75, "budget_loss": 0.01}  # the goals (and the budget's own share)
ALL, ALL_TIME, RANDOM = ("all", 1.0), ("all-time", 1.0), ("random", 0.25)
TRANSFER, TRANSFER_FROM = "ila-transfer", "lima"  # ILA's top 25% on the primary dataset, from lima's mask
ILA25, ILA75 = ("ila", 0.25), ("ila", 0.75)
Method = tuple[str, float]  # a selector and the share of candidate layers it picks
WAITING = "a cell, or the noise scale that a second seed gives, is missing"
NOT_YET = "not computed yet"
STEP, MEMORY = "median_step_seconds", "memory_rise_mb"  # a timing row's costs


def early_stage1(stage1: int) -> int:
    """The stage-1 steps of the early mask: a quarter of the preset's."""
    return max(1, stage1 // 4)


def grid_runs(results: dict) -> Runs:
    """The fine-tunes by (dataset, (selector, share)), with their loss after, forgetting (the mean rise of the other
    datasets' held-out loss over the base model's; None until all bases are known), ARC-Easy share after, s/step,
    MB of memory rise and trainable parameters; the noise is pooled over every method but the equal-time LoRA-all
    (its seeds ran different step counts)."""
    metrics = {
        "loss": lambda tune: tune["loss_after"],
        "forgetting": lambda tune: forgetting(tune["others_after"], results["base"]),
        "knowledge": lambda tune: tune["knowledge_after"],
        "step": lambda tune: tune["median_step_seconds"],
        "memory": lambda tune: tune["memory"].get("rss_rise_mb", 0.0),  # peak resident memory minus that at start
        "params": lambda tune: tune["trainable_params"],
        "selection": lambda tune: tune["selection_seconds"],
    }
    method = lambda tune: (tune["selector"], tune["share"])  # noqa: E731
    return Runs(results["tunes"], method, metrics, pooled=lambda arm: arm != ALL_TIME)


def cost_ratio(results: dict, dataset: str, method: Method, key: str) -> float | None:
    """`method`'s cost over LoRA-all's, measured side by side (the dataset's timing cell): `key` STEP or MEMORY;
    None until both are timed."""
    rows = {(row["selector"], row["share"]): row[key] for row in results.get("timing", {}).get(dataset, [])}
    return ratio(rows.get(method), rows.get(ALL))


def cost_ratios(results: dict, method: Method, key: str) -> dict[str, float]:
    """dataset -> `cost_ratio`, for the datasets where it is known."""
    found = {dataset: cost_ratio(results, dataset, method, key) for dataset in results["datasets"]}
    return {dataset: value for dataset, value in found.items() if value is not None}


def provisional(verdict: str, judged: list[str], datasets: list[str]) -> str:
    """`verdict`, marked provisional while some datasets cannot be judged yet (a cell or their noise scale missing)."""
    missing = [d for d in datasets if d not in judged]
    if not judged:
        return "not judged yet"
    return verdict if not missing else f"provisional (not judged yet on {', '.join(missing)}: {WAITING}): {verdict}"


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


# --- findings -----------------------------------------------------------------------------------------------------


def findings(results: dict) -> list[Finding]:
    """The paper's four findings, then what this grid adds, each judged by its rule."""
    runs = grid_runs(results)
    found = {
        "grid-overlap": finding_datasets(results),
        "grid-freeze-quarter": finding_freeze(results, runs),
        "grid-top25": finding_top25(results, runs),
        "grid-quarter-stage1": finding_early(results),
        "grid-equal-time": finding_equal_time(results, runs),
        "grid-forgetting": finding_forgetting(results, runs),
        "grid-budget": finding_budget(results, runs),
        "grid-cheap-selectors": finding_cheap(results, runs),
    }
    return [replace(finding, id=name) for name, finding in found.items()]


def finding_datasets(results: dict) -> Finding:
    claim = "Important layers overlap about 90% across alignment datasets"
    rule = f"mean top-25% Jaccard {OVERLAP_RULE}; two seeds on one dataset: the noise floor"
    masks = masks_of(results)
    if len(masks) < 2:
        return Finding(claim, "not judged yet", "fewer than two datasets' masks computed", rule)
    pairs = {f"{a}/{b}": jaccard(masks[a], masks[b]) for a, b in combinations(masks, 2)}
    mean = statistics.mean(pairs.values())
    k, n = len(next(iter(masks.values()))), results["settings"]["candidates"]
    evidence = f"mean {mean:.2f} ({', '.join(f'{p} {j:.2f}' for p, j in pairs.items())}); two seeds on one dataset: "
    evidence += (
        f"{number(seed_overlap(results), missing=NOT_YET)}; two random sets: {expected_random_jaccard(n, k):.2f}"
    )
    return Finding(claim, provisional(overlap_verdict(mean), list(masks), results["datasets"]), evidence, rule)


def finding_freeze(results: dict, runs: Runs) -> Finding:
    claim = "Freezing the least important 25% (ILA top 75%) improves on LoRA on all layers"
    rule = f"better on every dataset holds, worse on any does not hold, else within the noise; {NOISE_RULE}"
    deltas = runs.per_dataset(results["datasets"], ILA75, ALL)
    verdict = judge(deltas.values(), "holds", "does not hold", "within the noise")
    evidence = f"Δ held-out loss vs LoRA-all: {listed(deltas, WAITING)}"
    return Finding(claim, provisional(verdict, list(deltas), results["datasets"]), evidence, rule)


def finding_top25(results: dict, runs: Runs) -> Finding:
    claim = "Tuning only the top 25% keeps quality at lower cost"
    rule = (
        f"quality holds when no dataset is worse than LoRA-all; cost meets the goals at ≤ {GOALS['step']}× step time "
        f"and ≤ {GOALS['memory']}× memory rise on every dataset; {NOISE_RULE}"
    )
    datasets = results["datasets"]
    deltas, random = runs.per_dataset(datasets, ILA25, ALL), runs.per_dataset(datasets, ILA25, RANDOM)
    steps, memory = cost_ratios(results, ILA25, STEP), cost_ratios(results, ILA25, MEMORY)
    quality = "does not hold" if any(beyond(d) > 0 for d in deltas.values()) else "holds"
    cheap = all(steps[d] <= GOALS["step"] and memory.get(d, math.inf) <= GOALS["memory"] for d in steps)
    cost = ("meets" if cheap else "misses") + " the goals" if steps else "not timed yet"
    verdict = f"quality {quality}, cost {cost}" if deltas else "not judged yet"
    if random:
        verdict += f"; against random 25%: {judge(random.values(), 'better', 'worse', 'within the noise')}"
    shown = lambda values: ", ".join(f"{d} {value:.2f}" for d, value in values.items()) or "–"  # noqa: E731
    evidence = (
        f"Δ held-out loss vs LoRA-all: {listed(deltas, WAITING)}; side by side, step time × {shown(steps)}, memory "
        f"rise × {shown(memory)} of LoRA-all's; Δ vs random 25%: {listed(random, WAITING)}"
    )
    return Finding(claim, provisional(verdict, list(deltas), datasets), evidence, rule)


def finding_early(results: dict) -> Finding:
    """Whether a quarter of stage 1's budget gives the whole budget's mask: a question of identification's cost. The
    paper's claim that important layers are found early in stage 1 is judged once, within one run, on STABILITY.md
    (two identifications of different budgets also differ by stage 2's noise, which this one cannot tell apart)."""
    claim = "A quarter of stage 1 finds the top 25% the whole stage 1 finds"
    stage1 = results["settings"]["stage1"]
    early, primary = early_stage1(stage1), results["datasets"][0]
    rule = f"top-25% Jaccard between {early} and {stage1} stage-1 steps {OVERLAP_RULE}"
    full, short = masks_of(results).get(primary), masks_of(results, 0, early).get(primary)
    if full is None or short is None:
        return Finding(claim, "not judged yet", f"the {primary} masks at {early} and {stage1} steps", rule)
    value = jaccard(full, short)
    evidence = f"Jaccard {value:.2f} on {primary}; two seeds at {stage1} steps: "
    evidence += number(seed_overlap(results), missing=NOT_YET)
    evidence += "; whether important layers are found early in stage 1 is judged within one run on STABILITY.md"
    return Finding(claim, overlap_verdict(value), evidence, rule)


def finding_equal_time(results: dict, runs: Runs) -> Finding:
    claim = "At equal wall time, identification included, ILA top 25% beats LoRA on all layers"
    rule = f"LoRA-all runs for the seconds ILA spent identifying plus fine-tuning; {NOISE_RULE}"
    deltas = runs.per_dataset(results["datasets"][:1], ILA25, ALL_TIME)
    if not deltas:
        return Finding(claim, "not judged yet", f"the equal-time LoRA-all runs: {WAITING}", rule)
    dataset, delta = next(iter(deltas.items()))
    steps = ", ".join(str(tune["steps"]) for tune in runs.groups[(dataset, ALL_TIME)])
    verdict = {-1: "holds", 0: "a tie within the noise", 1: "does not hold: LoRA-all is better"}[beyond(delta)]
    evidence = f"Δ held-out loss (ILA − LoRA-all given {steps} steps) on {dataset}: {show(delta)}"
    evidence += f"; at equal steps: {show(runs.delta(dataset, ILA25, ALL))}; the extra steps changed LoRA-all's own "
    evidence += f"loss by {show(runs.delta(dataset, ALL_TIME, ALL))}"
    return Finding(claim, verdict, evidence, rule)


def finding_forgetting(results: dict, runs: Runs) -> Finding:
    questions, known = results["settings"]["questions"], results.get("base_knowledge", 0.5)
    error = math.sqrt(known * (1 - known) / questions)  # of one evaluation's share of right answers
    claim = "Freezing layers forgets less: ILA top 25% / 75% against LoRA on all layers"
    rule = (
        "forgetting is the mean rise of the other datasets' held-out loss over the base model (negative: it fell, "
        f"a transfer); less (or more) at equal steps on every dataset counts; {NOISE_RULE}. Per unit of gain "
        "(forgetting / own gain) is shown for the comparison at equal gain. ARC-Easy changes are shown, not judged: on "
        f"{questions} questions one evaluation's standard error is about {error:.1%}"
    )
    parts, verdicts, judged = [], [], set()
    for method, name in ((ILA25, "top 25%"), (ILA75, "top 75%")):
        deltas = runs.per_dataset(results["datasets"], method, ALL, "forgetting")
        judged |= set(deltas)
        word = judge(deltas.values(), "less", "more", "no difference beyond the noise")
        verdicts.append(f"{name}: {word}" if deltas else f"{name}: not judged yet")
        per_gain = ", ".join(f"{d} {_per_gain(results, runs, d, method)}" for d in deltas)
        parts.append(
            f"{name} Δ forgetting {listed(deltas, WAITING)}; per unit of gain (ILA vs LoRA-all) {per_gain or '–'}; "
            f"Δ ARC-Easy {_knowledge(runs, method)}"
        )
    verdict = provisional("; ".join(verdicts), sorted(judged), results["datasets"])
    return Finding(claim, verdict, "; ".join(parts), rule)


def _per_gain(results: dict, runs: Runs, dataset: str, method: Method) -> str:
    """Mean forgetting over mean gain on `dataset`: `method`'s vs LoRA-all's."""
    gain = lambda m: results["base"][dataset] - mean(runs.values(dataset, m))  # noqa: E731
    per_gain = lambda m: mean(runs.values(dataset, m, "forgetting")) / gain(m)  # noqa: E731
    return f"{per_gain(method):+.3f} vs {per_gain(ALL):+.3f}"


def _knowledge(runs: Runs, method: Method) -> str:
    """The change in ARC-Easy's share of right answers from LoRA-all's to `method`'s, on each dataset (not judged)."""
    change = lambda d: mean(runs.values(d, method, "knowledge")) - mean(runs.values(d, ALL, "knowledge"))  # noqa: E731
    return ", ".join(f"{d} {change(d):+.1%}" for d, m in runs.groups if m == method and (d, ALL) in runs.groups) or "–"


def finding_budget(results: dict, runs: Runs) -> Finding:
    budget, *others = results["settings"]["budgets"]
    resource, share = parse_budget(budget)
    key, what = {"time": (STEP, "step time"), "memory": (MEMORY, "memory rise")}[resource]
    claim = f"Cost-aware ILA ({budget}) costs ≤ {share:g}× LoRA-all's {what} within +1% held-out loss"
    rule = f"{what} (side by side) and mean held-out loss against LoRA-all's on the primary dataset, both at once"
    primary, method = results["datasets"][0], (f"ila@{budget}", 0.25)
    delta, cost = runs.delta(primary, method, ALL), cost_ratio(results, primary, method, key)
    if delta is None or cost is None:
        return Finding(claim, "not judged yet", f"the cost-aware runs on {primary}: {WAITING}", rule)
    relative = delta[0] / mean(runs.values(primary, ALL))
    met = cost <= share and relative <= GOALS["budget_loss"]
    evidence = f"{what} × {cost:.2f}, Δ held-out loss {show(delta)} ({relative:+.1%}) on {primary}; the trade-off: "
    others = [*((f"ila@{other}", 0.25) for other in others), ILA25]
    evidence += ", ".join(_trade_off(results, runs, other, key) for other in others)
    return Finding(claim, "holds" if met else "does not hold", evidence, rule)


def _trade_off(results: dict, runs: Runs, method: Method, key: str) -> str:
    """A selection's cost ratio and loss change against LoRA-all on the primary dataset, as one phrase."""
    primary = results["datasets"][0]
    delta, cost = runs.delta(primary, method, ALL), cost_ratio(results, primary, method, key)
    name = "plain top 25%" if method == ILA25 else f"within {method[0][4:]}"
    return f"{name}: {WAITING}" if delta is None or cost is None else f"{name} × {cost:.2f}, Δ {show(delta)}"


def finding_cheap(results: dict, runs: Runs) -> Finding:
    claim = "ILA top 25% beats every cheap selector (adapter gradient norm, KappaTune, Spectrum SNR, first-order)"
    rule = f"ILA better than each by more than the noise on the primary dataset; {NOISE_RULE}"
    primary, cheap = results["datasets"][0], results["settings"]["cheap"]
    deltas = {selector: runs.delta(primary, ILA25, (selector, 0.25)) for selector in cheap}
    known = {selector: delta for selector, delta in deltas.items() if delta is not None}
    if not known:
        return Finding(claim, "not judged yet", "no cheap selector computed yet", rule)
    verdict = judge(known.values(), "holds", "does not hold", "not beyond the noise")
    if len(known) < len(cheap):
        verdict = f"provisional ({len(cheap) - len(known)} not computed yet): {verdict}"
    return Finding(claim, verdict, f"Δ held-out loss, ILA − selector, on {primary}: {listed(known, WAITING)}", rule)


# --- the page -----------------------------------------------------------------------------------------------------


def page(results: dict) -> str:
    s, runs = results["settings"], grid_runs(results)
    base_knowledge = results.get("base_knowledge", math.nan)
    lines = [
        "# The benchmark grid: fine-tunes long enough to judge",
        "",
        f"Written by `python -m benchmarks.grid --preset {results['preset']}` (`make bench`) from the cells in "
        f"`benchmarks/results/grid/{results['preset']}`; {results['machine']['cpu_count']} CPU cores, torch "
        f"{results['machine']['torch']}. Each fine-tune: at least {s['epochs']} epoch(s) and {s['min_steps']} AdamW "
        f"steps of batch {s['batch_size']} at max length {s['max_length']} (lr {s['lr']:g}, r {s['r']}), judged on "
        f"{s['eval_size']} held-out examples. Loss after: mean over seeds (spread: their standard deviation); gain: "
        "the base model's loss minus it. Forgetting: the mean rise, over the base model, of the loss on the other "
        f"datasets' held-out examples; ARC-Easy Δ: the change in the share of {s['questions']} ARC-Easy questions "
        f"answered right (base model: {base_knowledge:.1%}; `benchmarks/knowledge.py`). s/step and memory rise (peak "
        "resident memory during the fine-tune minus that at its start): each fine-tune's own, hours apart on a "
        "shared machine; cost ratios are taken side by side (below). Selection s: what choosing the layers cost "
        "(ILA: its mask; ILA within a budget: plus the step-cost model).",
        "",
        "Noise scale (pooled standard deviation over seeds of the loss after): "
        + ", ".join(f"{d} {number(runs.sigma(d), '.4f', NOT_YET)}" for d in results["datasets"])
        + ". Base model's held-out loss: "
        + ", ".join(f"{d} {loss:.4f}" for d, loss in results["base"].items())
        + ".",
        "",
        *tunes_table(results, runs),
        "",
        *findings_section([Finding(**f) for f in results["findings"]]),
    ]
    masks = [
        [m["dataset"], str(m["seed"]), str(m["stage1"]), f"{m['seconds']:.0f}", f"{m['tokens']:,}"]
        for m in results["masks"]
    ]
    lines += ["## Masks", "", *table(["dataset", "seed", "stage-1 steps", "seconds", "tokens"], masks, "lrrrr")]
    lines += ["", *side_by_side(results), *cost_section(results), *overhead_section(results)]
    lines += missing_section(results["missing"], "make bench")
    return "\n".join(lines) + "\n"


def tunes_table(results: dict, runs: Runs) -> list[str]:
    """One row per dataset and method (`runs.groups`' keys): the means over its seeds."""
    average = lambda key, what: mean(runs.values(*key, what))  # noqa: E731
    gain = lambda key: results["base"].get(key[0], math.nan) - average(key, "loss")  # noqa: E731
    knows = results.get("base_knowledge")
    spread = lambda losses: statistics.stdev(losses) if len(losses) > 1 else None  # noqa: E731
    spec: list[Column] = [
        ("dataset", "l", lambda key: key[0]),
        ("method", "l", lambda key: runs.groups[key][0]["method"]),
        ("seeds", "r", lambda key: str(len(runs.groups[key]))),
        ("steps", "r", lambda key: "/".join(sorted({str(tune["steps"]) for tune in runs.groups[key]}))),
        ("held-out loss after", "r", lambda key: f"{average(key, 'loss'):.4f}"),
        ("spread", "r", lambda key: number(spread(runs.values(*key)), ".4f", "")),
        ("gain", "r", lambda key: f"{gain(key):.4f}"),
        ("forgetting", "r", lambda key: number(average(key, "forgetting"), "+.4f", "")),
        ("ARC-Easy Δ", "r", lambda key: "" if knows is None else f"{average(key, 'knowledge') - knows:+.1%}"),
        ("s/step", "r", lambda key: f"{average(key, 'step'):.2f}"),
        ("memory rise MB", "r", lambda key: f"{average(key, 'memory'):.0f}"),
        ("trainable params", "r", lambda key: f"{average(key, 'params'):,.0f}"),
        ("gain per M params", "r", lambda key: f"{gain(key) / average(key, 'params') * 1e6:.4f}"),
        ("gain per GB", "r", lambda key: number(per_gb(gain(key), average(key, "memory")), ".4f", "")),
        ("selection s", "r", lambda key: seconds(selection_seconds(results, *key, average(key, "selection")))),
    ]
    return columns(spec, runs.groups)


def mean(values: list[float]) -> float | None:
    return statistics.mean(values) if values else None


def per_gb(gain: float, memory_mb: float) -> float | None:
    """Gain per GB of memory rise; None without a rise."""
    return gain / memory_mb * 1024 if memory_mb > 0 else None


def selection_seconds(results: dict, dataset: str, method: Method, measured: float) -> float | None:
    """What choosing the layers cost: the mask's seconds for ILA (plus the cost model's when budgeted; another
    dataset's mask: that one's), else what the fine-tune cells `measured` (0 for LoRA-all and random)."""
    if not method[0].startswith("ila"):
        return measured
    mask = mask_rows(results).get(TRANSFER_FROM if method[0] == TRANSFER else dataset)
    if mask is None:
        return None
    return mask["seconds"] + (results.get("cost", {}).get("seconds", 0.0) if method[0].startswith("ila@") else 0.0)


def seconds(value: float | None) -> str:
    """Whole seconds; "–" under half a second."""
    return "" if value is None else ("–" if value < 0.5 else f"{value:.0f}")


def side_by_side(results: dict) -> list[str]:
    """Each dataset's selections timed in one process (its `timing` cell) against LoRA-all, with the lowest adapted
    block and the step-cost model's predicted share of LoRA-all's step time."""
    if not results.get("timing"):
        return []
    (rounds, steps), seed = results["settings"]["timing"], results["settings"]["seeds"][0]
    cost = StepCost.from_json(results["cost"]["cost"]) if "cost" in results else None
    layers = {(t["dataset"], t["selector"], t["share"]): t["layers"] for t in results["tunes"] if t["seed"] == seed}
    rows = []
    for dataset, timed in results["timing"].items():
        for row in timed:
            method = (row["selector"], row["share"])
            lowest = _lowest_block(cost, layers.get((dataset, *method)))
            block, predicted = ("", None) if lowest is None else (cost.blocks[lowest], cost.fraction("time", lowest))
            step, memory = (cost_ratio(results, dataset, method, key) for key in (STEP, MEMORY))
            rows.append(
                {**row, "dataset": dataset, "block": block, "predicted": predicted, "step ×": step, "memory ×": memory}
            )
    spec: list[Column] = [
        ("dataset", "l", lambda row: row["dataset"]),
        ("method", "l", lambda row: row["method"]),
        ("lowest adapted block", "l", lambda row: row["block"]),
        ("s/step", "r", lambda row: f"{row[STEP]:.2f}"),
        ("× LoRA-all", "r", lambda row: number(row["step ×"], missing=NOT_YET)),
        ("predicted ×", "r", lambda row: number(row["predicted"], missing="")),
        ("memory rise MB", "r", lambda row: f"{row[MEMORY]:.0f}"),
        ("× LoRA-all", "r", lambda row: number(row["memory ×"], missing=NOT_YET)),
    ]
    return [
        "## Step time and memory, side by side",
        "",
        f"The selections of seed {seed} on each dataset, trained in one process: {rounds} round(s), each running "
        f"every selection for {steps} AdamW steps in turn (the first not timed), so the machine's drift falls on all "
        "alike (`timing` cells). s/step: the median; memory rise: the median over rounds of the peak resident memory "
        "minus that at the start. Every cost ratio in the findings is taken from here. Predicted: the step-cost "
        "model's share of LoRA-all's step time for the lowest adapted block.",
        "",
        *columns(spec, rows),
        "",
    ]


def _lowest_block(cost: StepCost | None, layers: list[str] | None) -> int | None:
    """The index in `cost.blocks` of the lowest block holding one of `layers` (None: every block, so 0)."""
    if cost is None:
        return None
    return 0 if layers is None else min(cost.blocks.index(layer_of(name, "block")) for name in layers)


def cost_section(results: dict) -> list[str]:
    """The step-cost model: its fit and the points it was fitted to."""
    if "cost" not in results:
        return []
    cost, primary = StepCost.from_json(results["cost"]["cost"]), results["datasets"][0]
    rows = [
        [cost.blocks[low], f"{seconds:.3f}", f"{cost.predicted('time', low):.3f}", f"{memory:.0f}"]
        for low, seconds, memory in cost.measured
    ]
    return [
        "## The step-cost model",
        "",
        f"Measured on {primary}'s first batch in {results['cost']['seconds']:.0f} s (`measure_step_cost`): forward + "
        "backward with the adapters trainable from block L up, fitted as fixed + per block × (blocks from L up). "
        f"Fit: {cost.seconds[0]:.3f} s + {cost.seconds[1]:.4f} s per block; {cost.memory_mb[0]:.0f} MB + "
        f"{cost.memory_mb[1]:.1f} MB per block of activations kept for backward.",
        "",
        *table(["lowest adapted block", "measured s", "predicted s", "activation MB"], rows, "lrrr"),
        "",
    ]


OVERHEAD = [  # (what, the overhead cell's measurement, its reference)
    ("probe state, stage 1 (adapters on every candidate) vs LoRA-all: forward + backward", "probe_stage1", "lora_all"),
    ("probe state, stage 2 (gates learned) vs LoRA-all: forward + backward", "probe_stage2", "lora_all"),
    ("ILA top 25%, unmerged, vs the base model: inference", "ila_top25", "base"),
    ("ILA top 25%, merged, vs the base model: inference", "ila_top25_merged", "base"),
]


def overhead_section(results: dict) -> list[str]:
    """What ILA's own machinery costs per batch (the `overhead` cell)."""
    if "overhead" not in results:
        return []
    seconds = results["overhead"]
    rows = [
        [what, f"{seconds[a]:.3f}", f"{seconds[b]:.3f}", f"{seconds[a] / seconds[b]:.2f}"] for what, a, b in OVERHEAD
    ]
    return [
        "## Overhead of ILA's machinery",
        "",
        f"Median seconds per batch on {results['datasets'][0]}'s first batches, measured side by side in one process "
        "(`overhead` cell).",
        "",
        *table(["comparison", "seconds", "reference seconds", "ratio"], rows, "lrrr"),
        "",
    ]
