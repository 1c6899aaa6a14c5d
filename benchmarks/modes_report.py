"""The modes study's arithmetic, findings and page (`modes.py` computes the cells).

Costs are in units of LoRA-all's step, from the side-by-side timing cell: a mode's wall time is its steps times its
step-time ratio, plus identification's stage-1 and stage-2 steps times theirs when it needs one; its memory is the
largest peak memory rise of what it runs (identification's stages included) over LoRA-all's. Noise: on each
dataset, the pooled seed-to-seed standard deviation of the held-out loss over every mode run with several seeds in
one regime; a difference counts beyond 2 standard errors (`benchmarks/core/stats.py`).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass, replace

from benchmarks.core.cells import Missing
from benchmarks.core.page import Finding, findings_section, missing_section, table
from benchmarks.core.stats import NOISE_RULE, beyond, difference, forgetting, judge, pooled_sd, show


@dataclass(frozen=True)
class Mode:
    """A training mode: the `family` whose learning rate it takes, what the page calls it (`short`) and what it
    trains (`text`), how it finds its layers (`identification`: "none", "separate" (the grid's mask, its cost
    added) or "inside" the fine-tune), the timing row whose steps it takes (`timed_as`; default its own) and the
    estimator its identification scores with."""

    family: str
    short: str
    text: str
    identification: str
    timed_as: str = ""
    estimator: str = "first-order"  # how its identification scores ("update-norm": no stage 2 of its own)

    @property
    def runs_stage2(self) -> bool:
        """Whether its identification has a second stage (every estimator but the update norms has one)."""
        return self.estimator != "update-norm"


MODES = {
    "all": Mode("lora", "LoRA-all", "LoRA on all layers", "none"),
    "ila-25": Mode("lora", "ILA top 25%", "LoRA on ILA's top 25%", "separate"),
    "ila-75": Mode("lora", "ILA top 75%", "LoRA on ILA's top 75%", "separate"),
    "lisa": Mode("sampled", "LISA (uniform)", "LISA: full weights of sampled blocks, drawn uniformly", "none"),
    "ila-sampled": Mode(
        "sampled", "ILA-sampled", "full weights of sampled blocks, drawn by ILA's block importance", "separate"
    ),
    "ila-inside": Mode(
        "lora", "ILA inside", "identification inside the fine-tune, its top 75% go on", "inside", "ila-75"
    ),
    "ila-inside-norm": Mode(
        "lora",
        "ILA inside, norms",
        "identification inside the fine-tune scored by stage 1's update norms (no stage 2), its top 75% go on",
        "inside",
        "ila-75",
        "update-norm",
    ),
    "ila-inside-sampled": Mode(
        "sampled",
        "ILA inside, sampled",
        "identification inside the fine-tune (its LoRA merged), then full weights of blocks drawn by its importance",
        "inside",
        "ila-sampled",
    ),
    "ila-full": Mode(
        "full", "ILA full", "full weights of ILA's top layers within LoRA-all's trainable parameters", "separate"
    ),
}
REGIMES = {"epoch": "one epoch", "equal-time": "LoRA-all's wall time", "long": "the long regime"}
NEW = ["lisa", "ila-sampled", "ila-inside", "ila-inside-norm", "ila-inside-sampled", "ila-full"]  # not the grid's
IMPORTANCE = [mode for mode in MODES if mode.startswith("ila")]  # the modes that use ILA's scores


def empty(preset: dict, grid, primary: str) -> dict:
    """The results before any cell is read: settings, and empty lists."""
    settings = {**preset, "grid": {k: grid.p[k] for k in ("batch_size", "max_length", "eval_size", "stage1", "stage2")}}
    settings["steps"] = {name: grid.steps(name) for name in grid.data.names}
    return {"datasets": grid.data.names, "primary": primary, "settings": settings, "sweep": [], "tunes": [],
            "no_time_left": [], "base": grid_bases(grid)}  # fmt: skip


def grid_bases(grid) -> dict:
    """The base model's held-out loss on each dataset and its share of right answers (the grid's cells)."""
    try:
        bases = {name: grid.base_loss(name)["loss"] for name in grid.data.names}
        return {**bases, "knowledge": grid.base_knowledge()["accuracy"]}
    except Missing:
        return {}


def row(record: dict, name: str, mode: str, seed: int, regime: str) -> dict:
    """What the page needs of a fine-tune cell."""
    keep = ("loss_before", "loss_after", "others_after", "knowledge_after", "trainable_params", "seconds")
    out = {"dataset": name, "mode": mode, "seed": seed, "regime": regime, "lr": record["settings"]["lr"]}
    out["steps"] = record["settings"]["steps"]
    out.update(stage1_steps=record.get("stage1_steps"), stage2_steps=record.get("stage2_steps"))
    return {**out, **{k: record[k] for k in keep}, "memory_rise_mb": record["memory"].get("rss_rise_mb", 0.0)}


def ratio(timing: dict, what: str) -> float:
    """The step seconds of `what` (a timing row, or a mode: the row it is timed as) over LoRA-all's (side by side)."""
    row = (MODES[what].timed_as or what) if what in MODES else what
    return timing[row]["step_seconds"] / timing["all"]["step_seconds"]


def identification_cost(timing: dict, grid: dict, mode: str) -> float:
    """`mode`'s identification's wall time in LoRA-all steps: the grid's stage-1 steps, and its stage-2 steps unless
    the mode's estimator has no stage 2."""
    stage2 = grid["stage2"] if MODES[mode].runs_stage2 else 0
    return grid["stage1"] * ratio(timing, "probe-stage1") + stage2 * ratio(timing, "probe-stage2")


def wall(timing: dict, mode: str, steps: int, grid: dict) -> float:
    """`mode`'s wall time for `steps` optimizer steps (stage 1's included for ila-inside), in LoRA-all steps."""
    how = MODES[mode].identification
    if how == "inside":
        return identification_cost(timing, grid, mode) + (steps - grid["stage1"]) * ratio(timing, mode)
    return steps * ratio(timing, mode) + (identification_cost(timing, grid, mode) if how == "separate" else 0.0)


def memory(timing: dict, mode: str) -> float:
    """The largest peak memory rise of what `mode` runs, over LoRA-all's (side by side)."""
    how = MODES[mode].identification
    probe = ["probe-stage1"] + (["probe-stage2"] if MODES[mode].runs_stage2 else [])
    rows = [MODES[mode].timed_as or mode] + (probe if how != "none" else [])
    return max(memory_ratio(timing, r) for r in rows)


TIMING_KEYS = ("step_seconds", "memory_rise_mb")


def repeats(timing: dict) -> list[tuple[str, str]]:
    """Pairs of timing rows that measured the same training: a mode timed on its own row whose `timed_as` is
    another row of the cell."""
    return [(m, MODES[m].timed_as) for m in timing if m in MODES and MODES[m].timed_as in timing]


def repeat_note(timing: dict, mode: str, twin: str) -> str:
    """How far apart two timing rows that measured the same training came out: the measurement's own spread."""
    step, mem = (abs(timing[mode][key] / timing[twin][key] - 1) for key in TIMING_KEYS)
    return (
        f" The same training timed twice, as {MODES[mode].short}'s row and {MODES[twin].short}'s, differs by "
        f"{100 * step:.1f}% in step time and {100 * mem:.1f}% in memory: the measurement's own spread."
    )


def memory_ratio(timing: dict, row: str) -> float:
    """A timing row's peak memory rise over LoRA-all's."""
    return timing[row]["memory_rise_mb"] / timing["all"]["memory_rise_mb"]


def equal_time_steps(timing: dict, mode: str, lora_steps: int, grid: dict) -> int:
    """The optimizer steps `mode` takes in LoRA-all's wall time for `lora_steps` (< 1: identification alone takes
    longer)."""
    how = MODES[mode].identification
    spare = lora_steps - (identification_cost(timing, grid, mode) if how != "none" else 0.0)
    if how == "inside":
        return grid["stage1"] + round(spare / ratio(timing, mode))
    return round(spare / ratio(timing, mode))


def best_new(results: dict, dataset: str, modes: list[str], count: int) -> list[str]:
    """The `count` new modes with the lowest mean held-out loss on `dataset` at one epoch, every seed in."""
    seeds = len(results["settings"]["seeds"])
    losses = {m: losses_of(results, dataset, m, "epoch") for m in modes}
    if any(len(v) < seeds for v in losses.values()):
        raise Missing("it waits for every new mode's seeds on the primary dataset")
    return sorted(modes, key=lambda m: statistics.mean(losses[m]))[:count]


def losses_of(results: dict, dataset: str, mode: str, regime: str, what: str = "loss") -> list[float]:
    """Held-out loss after (or `what` "forgetting": the other datasets' mean rise over the base model, or
    "knowledge": the share of right answers) of `mode`'s runs."""
    runs = [t for t in results["tunes"] if (t["dataset"], t["mode"], t["regime"]) == (dataset, mode, regime)]
    if what == "loss":
        return [t["loss_after"] for t in runs]
    if what == "knowledge":
        return [t["knowledge_after"] for t in runs]
    rises = [forgetting(t["others_after"], results["base"]) for t in runs]
    return [rise for rise in rises if rise is not None]


def sigma(results: dict, dataset: str, what: str = "loss", regimes: Iterable[str] | None = None) -> float | None:
    """The pooled seed-to-seed spread of `what` on `dataset` over every (mode, regime) with several seeds (or only
    those of `regimes`)."""
    pairs = {(t["mode"], t["regime"]) for t in results["tunes"] if t["dataset"] == dataset}
    pairs = {(m, r) for m, r in pairs if regimes is None or r in regimes}
    return pooled_sd([losses_of(results, dataset, m, r, what) for m, r in sorted(pairs)])


def judging_sigma(results: dict, dataset: str, what: str, regimes: Iterable[str]) -> float | None:
    """The noise a comparison of `regimes` is judged by: the larger of the pooled spread over every regime and that of
    the regimes compared (a regime that overfits may spread more than the rest)."""
    found = [v for v in (sigma(results, dataset, what), sigma(results, dataset, what, set(regimes))) if v is not None]
    return max(found, default=None)


def delta(results: dict, dataset: str, a: str, b: str, regime: str = "epoch", b_regime: str = "epoch", what="loss"):
    """mean(a) - mean(b) of `what` on `dataset` and its standard error (None while a side or the noise is missing)."""
    return difference(
        losses_of(results, dataset, a, regime, what),
        losses_of(results, dataset, b, b_regime, what),
        judging_sigma(results, dataset, what, {regime, b_regime}),
    )


def costs(results: dict, mode: str) -> tuple[float, float] | None:
    """`mode`'s (wall time, memory) over LoRA-all's at the grid's one epoch on the primary dataset."""
    timing = results.get("timing")
    if timing is None:
        return None
    steps = results["settings"]["steps"][results["primary"]]
    grid = results["settings"]["grid"]
    return wall(timing, mode, steps, grid) / steps, memory(timing, mode)


def per_dataset(results: dict, a: str, b: str = "all", regime: str = "epoch", b_regime: str = "epoch", what="loss"):
    """`delta` of `what` on each dataset where both sides and the noise are measured."""
    found = {d: delta(results, d, a, b, regime, b_regime, what) for d in results["datasets"]}
    return {d: v for d, v in found.items() if v is not None}


def listed(deltas: dict) -> str:
    return ", ".join(f"{d} {show(v)}" for d, v in deltas.items()) or "not measured yet"


def cost_text(results: dict, mode: str) -> str:
    found = costs(results, mode)
    return "cost not measured yet" if found is None else f"wall time {found[0]:.2f}x, memory {found[1]:.2f}x LoRA-all"


# --- findings ------------------------------------------------------------------------------------------------------


def findings(results: dict) -> list[Finding]:
    found = {"modes-rates": finding_rates(results)}
    found.update({f"modes-{mode}": finding_mode(results, mode) for mode in NEW})
    found.update({"modes-goal": finding_goal(results), "modes-importance-draws": finding_importance(results)})
    found.update({"modes-forgetting": finding_forgetting(results), "modes-equal-time": finding_equal_time(results)})
    found["modes-long"] = finding_long(results)
    return [replace(finding, id=name) for name, finding in found.items()]


def finding_rates(results: dict) -> Finding:
    sweep = ", ".join(
        f"{r['family']} ({MODES[r['mode']].short}) lr {r['lr']:g}: {r['loss_after']:.4f}" for r in results["sweep"]
    )
    chosen = ", ".join(f"{family} {lr:g}" for family, lr in results["rates"].items()) or "none yet"
    claim = "Each family's learning rate (one sweep on the primary dataset, first seed, extended past an end that wins)"
    return Finding(claim, chosen, sweep or "nothing")


def finding_mode(results: dict, mode: str) -> Finding:
    deltas = per_dataset(results, mode)
    verdict = judge(deltas.values(), "beats LoRA-all", "worse than LoRA-all", "within the noise of LoRA-all")
    evidence = f"Δ held-out loss vs LoRA-all at equal steps: {listed(deltas)}; {cost_text(results, mode)}"
    return Finding(
        f"{MODES[mode].short} against LoRA-all", verdict if deltas else "not judged yet", evidence, NOISE_RULE
    )


def finding_goal(results: dict) -> Finding:
    """The issue's goal: a mode using ILA's importance beats LoRA-all on every dataset within its memory and time.
    Short of it, the evidence names the closest mode within that cost and, when another, the closest at any cost
    (closeness: the worst dataset's difference in standard errors, < -2 on every dataset to meet the goal)."""
    met, closest = [], {}
    for mode in IMPORTANCE:
        deltas = per_dataset(results, mode)
        found = costs(results, mode) if len(deltas) == len(results["datasets"]) else None
        if found is None:
            continue
        worst = max(v / e for v, e in deltas.values())
        within = max(found) <= 1.0
        if all(beyond(d) < 0 for d in deltas.values()) and within:
            met.append(mode)
        for bound in ["within the cost"] * within + ["at any cost"]:
            if bound not in closest or worst < closest[bound][1]:
                closest[bound] = (mode, worst, found)
    claim = "A mode using ILA's importance beats LoRA-all on every dataset at ≤ 1.0x its memory and wall time"
    if met:
        return Finding(claim, f"met by {', '.join(MODES[m].short for m in met)}", "see the table", NOISE_RULE)
    if not closest:
        return Finding(claim, "not judged yet", "no mode using importance has run on every dataset", NOISE_RULE)
    within, anywhere = closest.get("within the cost"), closest["at any cost"]
    evidence = f"closest within the cost: {closeness(within)}" if within else "none within the cost"
    if within is None or within[0] != anywhere[0]:
        evidence += f"; closest at any cost: {closeness(anywhere)}"
    unmeasured = [MODES[m].short for m in IMPORTANCE if len(per_dataset(results, m)) < len(results["datasets"])]
    if unmeasured:  # the plan runs the best two new modes on every dataset, the others on the primary one only
        evidence += f"; not on every dataset: {', '.join(unmeasured)}"
    return Finding(claim, "not met so far" if results["missing"] else "not met", evidence, NOISE_RULE)


def closeness(found: tuple[str, float, tuple[float, float]]) -> str:
    """A mode's closeness to the goal (`finding_goal`): its worst dataset in standard errors, and its costs."""
    mode, worst, (time, mem) = found
    spent = f"{time:.2f}x wall time, {mem:.3f}x memory"
    return f"{MODES[mode].short}, its worst dataset {worst:+.1f} standard errors, {spent}"


def finding_importance(results: dict) -> Finding:
    deltas = per_dataset(results, "ila-sampled", "lisa")
    verdict = judge(deltas.values(), "importance helps", "importance hurts", "no difference")
    evidence = f"ILA-sampled − LISA (uniform): {listed(deltas)}"
    claim = "Drawing blocks by ILA's importance beats drawing them uniformly"
    return Finding(claim, verdict if deltas else "not judged yet", evidence, NOISE_RULE)


def finding_forgetting(results: dict) -> Finding:
    """Each new mode against LoRA-all on the other datasets' held-out loss rise (higher: forgets more) and on
    ARC-Easy (lower: forgets more), dataset by dataset; the verdict names the modes that forget more."""
    parts, more = [], []
    for mode in NEW:
        rise = per_dataset(results, mode, what="forgetting")
        arc = per_dataset(results, mode, what="knowledge")
        if not rise and not arc:
            continue
        parts.append(f"{MODES[mode].short}: rise {listed(rise)}; ARC-Easy {listed(arc)}")
        if any(beyond(v) > 0 for v in rise.values()) or any(beyond(v) < 0 for v in arc.values()):
            more.append(MODES[mode].short)
    verdict = "not judged yet" if not parts else (f"more: {', '.join(more)}" if more else "none forgets more")
    evidence = "Δ vs LoRA-all of the other datasets' held-out loss rise and of ARC-Easy accuracy: "
    return Finding("The new modes forget no more than LoRA-all", verdict, evidence + ("; ".join(parts)), NOISE_RULE)


def finding_equal_time(results: dict) -> Finding:
    """Each new mode given LoRA-all's wall time for one epoch on the primary dataset (identification included)
    against LoRA-all's epoch, grouped by the rule on held-out loss (the question here); the evidence gives the steps
    each mode took in that time and the other datasets' loss rise."""
    primary = results["primary"]
    deltas = against_all(results, NEW, "equal-time", "epoch")
    rises = against_all(results, NEW, "equal-time", "epoch", "forgetting")
    steps = {MODES[t["mode"]].short: t["steps"] for t in results["tunes"] if t["regime"] == "equal-time"}
    parts = [f"{name} {show(found)} in {steps[name]} steps" for name, found in deltas.items()]
    parts += [f"{MODES[m].short}: identification alone takes longer" for m in results["no_time_left"]]
    claim = f"Given LoRA-all's wall time on {primary}"
    if not parts:
        return Finding(claim, "not judged yet", "not measured yet", NOISE_RULE)
    evidence = f"in LoRA-all's time for {results['settings']['steps'][primary]} steps: " + ", ".join(parts)
    evidence += f"; the other datasets' loss rise: {listed(rises)}" if rises else ""
    return Finding(claim, by_verdict(deltas, {}) or "not judged yet", evidence, NOISE_RULE)


def finding_long(results: dict) -> Finding:
    """The long regime on the primary dataset: each mode against LoRA-all after as many epochs, the verdict grouping
    the modes by the rule, by held-out loss and by the other datasets' loss rise (forgetting); LoRA-all's loss after
    one epoch beside it, to show whether the long run overfits."""
    primary, epochs = results["primary"], results["settings"]["long_epochs"]
    modes = sorted({t["mode"] for t in results["tunes"] if t["regime"] == "long"} - {"all"})
    deltas = against_all(results, modes, "long", "long")
    rises = against_all(results, modes, "long", "long", "forgetting")
    claim = f"At {epochs} epochs on {primary}, against LoRA-all"
    if not deltas:
        return Finding(claim, "not judged yet", "not measured yet", NOISE_RULE)
    evidence = listed(deltas) + (f"; the other datasets' loss rise: {listed(rises)}" if rises else "")
    losses = {regime: losses_of(results, primary, "all", regime) for regime in ("long", "epoch")}
    if all(losses.values()):
        evidence += f"; LoRA-all's held-out loss {statistics.mean(losses['long']):.4f}"
        evidence += f" after {epochs} epochs, {statistics.mean(losses['epoch']):.4f} after one"
    return Finding(claim, by_verdict(deltas, rises), evidence, NOISE_RULE)


def against_all(results: dict, modes: Iterable[str], regime: str, all_regime: str, what: str = "loss") -> dict:
    """`delta` of each of `modes` in `regime` against LoRA-all in `all_regime` on the primary dataset, keyed by the
    mode's name on the page (the measured ones only)."""
    primary = results["primary"]
    found = {MODES[m].short: delta(results, primary, m, "all", regime, all_regime, what) for m in modes}
    return {name: v for name, v in found.items() if v is not None}


def by_verdict(deltas: dict[str, tuple], rises: dict[str, tuple]) -> str:
    """The modes grouped by the rule: better, level or worse than LoRA-all by `deltas` (held-out loss), and those
    that forget less or more by `rises` (the other datasets' loss rise); empty when nothing is measured."""
    groups = {"better": [], "level": [], "worse": [], "forgets less": [], "forgets more": []}
    for name, found in deltas.items():
        groups[("level", "worse", "better")[beyond(found)]].append(name)
    for name, found in rises.items():
        if sign := beyond(found):
            groups["forgets more" if sign > 0 else "forgets less"].append(name)
    return "; ".join(f"{how}: {', '.join(names)}" for how, names in groups.items() if names)


# --- page ----------------------------------------------------------------------------------------------------------


def page(results: dict) -> str:
    s = results["settings"]
    lines = [
        "# Training modes against LoRA on all layers",
        "",
        "Written by `python -m benchmarks.modes --preset full` (`make bench-modes`) from the cells in "
        "`benchmarks/results/modes/full/` and the grid's. SmolLM2-135M, the grid's data and judges "
        f"(batch {s['grid']['batch_size']}, max length {s['grid']['max_length']}, {s['grid']['eval_size']} held-out "
        f"examples); one epoch = {', '.join(f'{d} {n}' for d, n in s['steps'].items())} steps.",
        "",
        *table(["mode", "family", "what it trains"], [[MODES[m].short, MODES[m].family, MODES[m].text] for m in MODES]),
        "",
        f"Sampled modes: {s['layerwise']['active']} blocks active, re-drawn every {s['layerwise']['interval']} steps; "
        "a block that leaves loses its optimizer state.",
        "",
        noise_line(results),
        "",
        *findings_section([Finding(**f) for f in results["findings"]]),
        *timing_section(results),
        *loss_section(results),
        *missing_section(results["missing"], "make bench-modes"),
    ]
    return "\n".join(lines) + "\n"


def timing_section(results: dict) -> list[str]:
    if "timing" not in results:
        return []
    rows = []
    for mode in MODES:
        time, mem = costs(results, mode)
        step = ratio(results["timing"], mode)
        rows.append([MODES[mode].short, f"{step:.2f}", f"{time:.2f}", f"{mem:.2f}"])
    head = ["mode", "step time x LoRA-all", "wall time of one epoch, identification included", "memory rise"]
    note = (
        "Measured side by side in one process (the timing cell), each x LoRA-all's. After identification the inside "
        "modes train as ILA top 75% and ILA-sampled do; identification costs its stage-1 and stage-2 steps at the "
        "probe state's step time, and its memory counts in the rise: its stage 1 (LoRA on every layer in ILA's "
        f"wrapper) peaks at {memory_ratio(results['timing'], 'probe-stage1'):.3f}x LoRA-all's."
    ) + "".join(repeat_note(results["timing"], mode, twin) for mode, twin in repeats(results["timing"]))
    return ["## Cost, side by side", "", note, "", *table(head, rows, "lrrr"), ""]


def loss_section(results: dict) -> list[str]:
    out = ["## Held-out loss", ""]
    for regime, text in REGIMES.items():
        rows = []
        for dataset in results["datasets"]:
            for mode in MODES:
                losses = losses_of(results, dataset, mode, regime)
                if not losses:
                    continue
                against = delta(results, dataset, mode, "all", regime, "epoch" if regime == "equal-time" else regime)
                know = losses_of(results, dataset, mode, regime, "knowledge")
                forget = losses_of(results, dataset, mode, regime, "forgetting")
                shown = show(against) if mode != "all" or regime == "equal-time" else ""
                rise = f"{statistics.mean(forget):+.4f}" if forget else ""
                loss = f"{statistics.mean(losses):.4f}"
                rows.append(
                    [dataset, MODES[mode].short, str(len(losses)), loss, shown, rise, f"{statistics.mean(know):.3f}"]
                )
        if rows:
            head = ["dataset", "mode", "seeds", "loss after", "Δ vs LoRA-all", "other datasets' rise", "ARC-Easy"]
            out += [f"### {text}", "", *table(head, rows, "llrrrrr"), ""]
    return out


def noise_line(results: dict) -> str:
    """The pooled noise scale of each dataset, on the primary dataset each regime's own (once two regimes have several
    seeds: whether one scale fits them all), and the rule that judges by them (`judging_sigma`)."""
    noise = ", ".join(f"{d} {v:.4f}" for d in results["datasets"] if (v := sigma(results, d)) is not None)
    line = f"Noise scale (pooled seed-to-seed SD of the held-out loss, over every regime): {noise or 'not yet'}."
    alone = {r: v for r in REGIMES if (v := sigma(results, results["primary"], regimes={r})) is not None}
    if len(alone) > 1:
        each = ", ".join(f"{REGIMES[r]} {v:.4f}" for r, v in alone.items())
        line += f" On {results['primary']}, each regime's own: {each}."
    return line + " A comparison is judged by the larger of the pooled scale and the spread of the regimes it compares."
