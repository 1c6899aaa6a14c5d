"""The grid's page (`GRID.md`): a table per dataset, the findings (`grid_findings.py`), the masks and the step-cost
model."""

from __future__ import annotations

import math
import statistics

from benchmarks.core.page import Finding, findings_section, missing_section, table
from benchmarks.grid_findings import (
    ALL,
    TRANSFER,
    TRANSFER_FROM,
    Stats,
    fmt,
    forgetting,
    groups,
    mask_rows,
    memory_rise,
)
from peft_ila.identification.cost import StepCost
from peft_ila.tuner.selection import layer_of


def selection_seconds(results: dict, dataset: str, selector: str, tunes: list[dict]) -> float | None:
    """What choosing the layers cost: the mask's seconds for ILA (plus the cost model's when budgeted; another
    dataset's mask: that one's), else what the fine-tune cells measured (0 for LoRA-all and random)."""
    if not selector.startswith("ila"):
        return statistics.mean(t["selection_seconds"] for t in tunes)
    mask = mask_rows(results).get(TRANSFER_FROM if selector == TRANSFER else dataset)
    if mask is None:
        return None
    return mask["seconds"] + (results.get("cost", {}).get("seconds", 0.0) if selector.startswith("ila@") else 0.0)


TUNES = ["dataset", "method", "seeds", "steps", "held-out loss after", "spread", "gain", "forgetting", "ARC-Easy Δ"]
TUNES += ["s/step", "memory rise MB", "trainable params", "gain per M params", "gain per GB", "selection s"]


def tunes_table(results: dict) -> list[str]:
    """One row per dataset and method: the mean over its seeds."""
    rows = []
    base_knowledge = results.get("base_knowledge")
    for (dataset, (selector, _)), tunes in groups(results).items():
        after = [t["loss_after"] for t in tunes]
        gain = results["base"].get(dataset, math.nan) - statistics.mean(after)
        lost = [forgetting(results, t) for t in tunes]
        memory = statistics.mean(map(memory_rise, tunes))
        params = statistics.mean(t["trainable_params"] for t in tunes)
        known = base_knowledge is not None
        cells = [
            dataset,
            tunes[0]["method"],
            str(len(tunes)),
            "/".join(sorted({str(t["steps"]) for t in tunes})),
            f"{statistics.mean(after):.4f}",
            f"{statistics.stdev(after):.4f}" if len(after) > 1 else "",
            f"{gain:.4f}",
            "" if None in lost else f"{statistics.mean(lost):+.4f}",
            f"{statistics.mean(t['knowledge_after'] for t in tunes) - base_knowledge:+.1%}" if known else "",
            f"{statistics.mean(t['median_step_seconds'] for t in tunes):.2f}",
            f"{memory:.0f}",
            f"{params:,.0f}",
            f"{gain / params * 1e6:.4f}",
            f"{gain / memory * 1024:.4f}" if memory > 0 else "",
            _seconds(selection_seconds(results, dataset, selector, tunes)),
        ]
        rows.append(cells)
    return table(TUNES, rows, "llrrrrrrrrrrrrr")


def _seconds(value: float | None) -> str:
    return "" if value is None else ("–" if value < 0.5 else f"{value:.0f}")


def cost_section(results: dict) -> list[str]:
    """The step-cost model: its fit and the points it was fitted to."""
    if "cost" not in results:
        return []
    cost, primary = StepCost.from_json(results["cost"]["cost"]), results["datasets"][0]
    lines = [
        "## The step-cost model",
        "",
        f"Measured on {primary}'s first batch in {results['cost']['seconds']:.0f} s (`measure_step_cost`): forward + "
        "backward with the adapters trainable from block L up, fitted as fixed + per block × (blocks from L up). "
        f"Fit: {cost.seconds[0]:.3f} s + {cost.seconds[1]:.4f} s per block; {cost.memory_mb[0]:.0f} MB + "
        f"{cost.memory_mb[1]:.1f} MB per block of activations kept for backward.",
        "",
    ]
    rows = [
        [cost.blocks[low], f"{seconds:.3f}", f"{cost.predicted('time', low):.3f}", f"{memory:.0f}"]
        for low, seconds, memory in cost.measured
    ]
    header = ["lowest adapted block", "measured s", "predicted s", "activation MB"]
    return [*lines, *table(header, rows, "lrrr"), ""]


def side_by_side(results: dict) -> list[str]:
    """Each dataset's selections timed in one process (its `timing` cell) against LoRA-all, with the lowest adapted
    block and the step-cost model's predicted share of LoRA-all's step time."""
    if not results.get("timing"):
        return []
    rounds, steps = results["settings"]["timing"]
    cost = StepCost.from_json(results["cost"]["cost"]) if "cost" in results else None
    stats, seed = Stats(results), results["settings"]["seeds"][0]
    layers = {(t["dataset"], t["selector"], t["share"]): t["layers"] for t in results["tunes"] if t["seed"] == seed}
    lines = [
        "## Step time and memory, side by side",
        "",
        f"The selections of seed {seed} on each dataset, trained in one process: {rounds} round(s), each running "
        f"every selection for {steps} AdamW steps in turn (the first not timed), so the machine's drift falls on all "
        "alike (`timing` cells). s/step: the median; memory rise: the median over rounds of the peak resident memory "
        "minus that at the start. Every cost ratio in the findings is taken from here. Predicted: the step-cost "
        "model's share of LoRA-all's step time for the lowest adapted block.",
        "",
    ]
    header = ["dataset", "method", "lowest adapted block", "s/step", "× LoRA-all", "predicted ×", "memory rise MB"]
    out = []
    for dataset, timed in results["timing"].items():
        for row in timed:
            method = (row["selector"], row["share"])
            lowest = _lowest_block(cost, layers.get((dataset, *method)))
            predicted = "" if lowest is None else f"{cost.fraction('time', lowest):.2f}"
            cells = [
                dataset,
                row["method"],
                "" if lowest is None else cost.blocks[lowest],
                f"{row['median_step_seconds']:.2f}",
                fmt(stats.ratio(dataset, method, ALL, "median_step_seconds"), 2),
                predicted,
                f"{row['memory_rise_mb']:.0f}",
                fmt(stats.ratio(dataset, method, ALL, "memory"), 2),
            ]
            out.append(cells)
    return [*lines, *table([*header, "× LoRA-all"], out, "lllrrrrr"), ""]


def _lowest_block(cost: StepCost | None, layers: list[str] | None) -> int | None:
    """The index in `cost.blocks` of the lowest block holding one of `layers` (None: every block, so 0)."""
    if cost is None:
        return None
    return 0 if layers is None else min(cost.blocks.index(layer_of(name, "block")) for name in layers)


def page(results: dict) -> str:
    s, stats = results["settings"], Stats(results)
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
        + ", ".join(f"{d} {fmt(stats.sigma(d))}" for d in results["datasets"])
        + ". Base model's held-out loss: "
        + ", ".join(f"{d} {loss:.4f}" for d, loss in results["base"].items())
        + ".",
        "",
        *tunes_table(results),
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
    lines = [
        "## Overhead of ILA's machinery",
        "",
        f"Median seconds per batch on {results['datasets'][0]}'s first batches, measured side by side in one process "
        "(`overhead` cell).",
        "",
    ]
    rows = []
    for what, measured, reference in OVERHEAD:
        a, b = seconds[measured], seconds[reference]
        rows.append([what, f"{a:.3f}", f"{b:.3f}", f"{a / b:.2f}"])
    return [*lines, *table(["comparison", "seconds", "reference seconds", "ratio"], rows, "lrrr"), ""]
