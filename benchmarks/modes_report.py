"""The modes study's arithmetic, findings and page (`modes.py` computes the cells).

Costs are in units of LoRA-all's step, from the side-by-side timing cell: a mode's wall time is its steps times its
step-time ratio, plus identification's stage-1 and stage-2 steps times theirs when it needs one; its memory is the
largest peak memory rise of what it runs (identification's stages included) over LoRA-all's. Noise (`ModeRuns`): on
each dataset, the pooled seed-to-seed standard deviation over every (mode, regime) run with several seeds, or that of
the regimes compared when larger; a difference counts beyond 2 standard errors (`benchmarks/core/stats.py`).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass, replace

from benchmarks.core.cells import Missing
from benchmarks.core.page import Finding, findings_section, missing_section, number, table
from benchmarks.core.stats import NOISE_RULE, Runs, beyond, forgetting, judge, listed, show


@dataclass(frozen=True)
class Mode:
    """A training mode: the `family` whose learning rate it takes, what the page calls it (`short`) and what it
    trains (`text`), how it finds its layers (`identification`: "none", "separate" (the grid's mask, its cost
    added) or "inside" the fine-tune), the timing row whose steps it takes (`timed_as`; default its own) and the
    estimator its identification scores with ("update-norm": no stage 2)."""

    family: str
    short: str
    text: str
    identification: str
    timed_as: str = ""
    estimator: str = "first-order"

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

# --- costs, in LoRA-all steps and memory (side by side) ------------------------------------------------------------


def ratio(timing: dict, what: str, key: str = "step_seconds") -> float:
    """`key` (step seconds, or "memory_rise_mb") of `what` (a timing row, or a mode: the row it is timed as) over
    LoRA-all's."""
    row = (MODES[what].timed_as or what) if what in MODES else what
    return timing[row][key] / timing["all"][key]


def identification(timing: dict, grid: dict, mode: str) -> float:
    """`mode`'s identification's wall time in LoRA-all steps: the grid's stage-1 steps, and its stage-2 steps unless
    the mode's estimator has no stage 2 (none without identification)."""
    if MODES[mode].identification == "none":
        return 0.0
    stage2 = grid["stage2"] if MODES[mode].runs_stage2 else 0
    return grid["stage1"] * ratio(timing, "probe-stage1") + stage2 * ratio(timing, "probe-stage2")


def wall(timing: dict, mode: str, steps: int, grid: dict) -> float:
    """`mode`'s wall time for `steps` optimizer steps (stage 1's included for ila-inside), in LoRA-all steps."""
    trained = steps - grid["stage1"] if MODES[mode].identification == "inside" else steps
    return identification(timing, grid, mode) + trained * ratio(timing, mode)


def equal_time_steps(timing: dict, mode: str, lora_steps: int, grid: dict) -> int:
    """The optimizer steps `mode` takes in LoRA-all's wall time for `lora_steps` (`wall` inverted; < 1:
    identification alone takes longer)."""
    spare = lora_steps - identification(timing, grid, mode)
    stage1 = grid["stage1"] if MODES[mode].identification == "inside" else 0
    return stage1 + round(spare / ratio(timing, mode))


def memory(timing: dict, mode: str) -> float:
    """The largest peak memory rise of what `mode` runs (its identification's stages too), over LoRA-all's."""
    probes = ["probe-stage1", "probe-stage2"] if MODES[mode].runs_stage2 else ["probe-stage1"]
    rows = [mode] + (probes if MODES[mode].identification != "none" else [])
    return max(ratio(timing, row, "memory_rise_mb") for row in rows)


def costs(results: dict, mode: str) -> tuple[float, float] | None:
    """`mode`'s (wall time, memory) over LoRA-all's at the grid's one epoch on the primary dataset."""
    if (timing := results.get("timing")) is None:
        return None
    steps = results["settings"]["steps"][results["primary"]]
    return wall(timing, mode, steps, results["settings"]["grid"]) / steps, memory(timing, mode)


def repeats(timing: dict) -> list[tuple[str, str]]:
    """Pairs of timing rows that measured the same training: a mode timed on its own row whose `timed_as` is
    another row of the cell."""
    return [(m, MODES[m].timed_as) for m in timing if m in MODES and MODES[m].timed_as in timing]


def repeat_note(timing: dict, mode: str, twin: str) -> str:
    """How far apart two timing rows that measured the same training came out: the measurement's own spread."""
    step, mem = (abs(timing[mode][key] / timing[twin][key] - 1) for key in ("step_seconds", "memory_rise_mb"))
    return (
        f" The same training timed twice, as {MODES[mode].short}'s row and {MODES[twin].short}'s, differs by "
        f"{100 * step:.1f}% in step time and {100 * mem:.1f}% in memory: the measurement's own spread."
    )


# --- runs and their noise ------------------------------------------------------------------------------------------


class ModeRuns(Runs):
    """The fine-tunes (`results["tunes"]`) by dataset and arm (mode, regime): "loss" (held-out loss after),
    "forgetting" (the other datasets' mean loss rise over the base model) and "knowledge" (ARC-Easy accuracy)."""

    def __init__(self, results: dict) -> None:
        metrics = {
            "loss": lambda run: run["loss_after"],
            "forgetting": lambda run: forgetting(run["others_after"], results["base"]),
            "knowledge": lambda run: run["knowledge_after"],
        }
        super().__init__(results["tunes"], lambda run: (run["mode"], run["regime"]), metrics)
        self.datasets, self.primary = results["datasets"], results["primary"]

    def within(self, dataset: str, what: str, regimes: Iterable[str]) -> float | None:
        """The pooled spread of `what` on `dataset` over the arms of `regimes` only."""
        return self.sigma(dataset, what, among=lambda arm: arm[1] in regimes)

    def noise(self, dataset: str, what: str, a: tuple[str, str], b: tuple[str, str]) -> float | None:
        """The larger of the pooled spread over every regime and that over the regimes of `a` and `b` (a regime that
        overfits may spread more than the rest)."""
        found = (self.sigma(dataset, what), self.within(dataset, what, {a[1], b[1]}))
        return max((value for value in found if value is not None), default=None)

    def against(self, mode: str, b: str = "all", what: str = "loss") -> dict:
        """`delta` of `what` of `mode` against `b`, both at one epoch, on each dataset where it is known."""
        return self.per_dataset(self.datasets, (mode, "epoch"), (b, "epoch"), what)

    def against_all(self, modes: Iterable[str], regime: str, all_regime: str, what: str = "loss") -> dict:
        """`delta` of each of `modes` in `regime` against LoRA-all in `all_regime` on the primary dataset, keyed by the
        mode's name on the page (the measured ones only)."""
        found = {MODES[m].short: self.delta(self.primary, (m, regime), ("all", all_regime), what) for m in modes}
        return {name: delta for name, delta in found.items() if delta is not None}


def mean(values: list[float]) -> float | None:
    """The mean of `values`, None without any."""
    return statistics.mean(values) if values else None


def best_new(results: dict, dataset: str, modes: list[str], count: int) -> list[str]:
    """The `count` new modes with the lowest mean held-out loss on `dataset` at one epoch, every seed in."""
    runs = ModeRuns(results)
    losses = {m: runs.values(dataset, (m, "epoch")) for m in modes}
    if any(len(v) < len(results["settings"]["seeds"]) for v in losses.values()):
        raise Missing("it waits for every new mode's seeds on the primary dataset")
    return sorted(modes, key=lambda m: statistics.mean(losses[m]))[:count]


# --- findings ------------------------------------------------------------------------------------------------------


def findings(results: dict) -> list[Finding]:
    found = {"modes-rates": finding_rates(results), **{f"modes-{m}": finding_mode(results, m) for m in NEW}}
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
    deltas = ModeRuns(results).against(mode)
    verdict = judge(deltas.values(), "beats LoRA-all", "worse than LoRA-all", "within the noise of LoRA-all")
    found = costs(results, mode)
    spent = "cost not measured yet" if found is None else f"wall time {found[0]:.2f}x, memory {found[1]:.2f}x LoRA-all"
    evidence = f"Δ held-out loss vs LoRA-all at equal steps: {listed(deltas)}; {spent}"
    claim = f"{MODES[mode].short} against LoRA-all"
    return Finding(claim, verdict if deltas else "not judged yet", evidence, NOISE_RULE)


def finding_goal(results: dict) -> Finding:
    """The issue's goal: a mode using ILA's importance beats LoRA-all on every dataset within its memory and time.
    Short of it, the evidence names the closest mode within that cost and, when another, the closest at any cost
    (closeness: the worst dataset's difference in standard errors, < -2 on every dataset to meet the goal)."""
    runs, met, closest = ModeRuns(results), [], {}
    everywhere = {mode: len(runs.against(mode)) == len(results["datasets"]) for mode in IMPORTANCE}
    for mode in IMPORTANCE:
        deltas = runs.against(mode)
        if not everywhere[mode] or (found := costs(results, mode)) is None:
            continue
        worst, within = max(v / e for v, e in deltas.values()), max(found) <= 1.0
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
    if unmeasured := [MODES[m].short for m in IMPORTANCE if not everywhere[m]]:
        evidence += f"; not on every dataset: {', '.join(unmeasured)}"  # the plan runs the best two new modes there
    return Finding(claim, "not met so far" if results["missing"] else "not met", evidence, NOISE_RULE)


def closeness(found: tuple[str, float, tuple[float, float]]) -> str:
    """A mode's closeness to the goal (`finding_goal`): its worst dataset in standard errors, and its costs."""
    mode, worst, (time, mem) = found
    spent = f"{time:.2f}x wall time, {mem:.3f}x memory"
    return f"{MODES[mode].short}, its worst dataset {worst:+.1f} standard errors, {spent}"


def finding_importance(results: dict) -> Finding:
    deltas = ModeRuns(results).against("ila-sampled", "lisa")
    verdict = judge(deltas.values(), "importance helps", "importance hurts", "no difference")
    claim, evidence = "Drawing blocks by ILA's importance beats drawing them uniformly", "ILA-sampled − LISA (uniform)"
    return Finding(claim, verdict if deltas else "not judged yet", f"{evidence}: {listed(deltas)}", NOISE_RULE)


def finding_forgetting(results: dict) -> Finding:
    """Each new mode against LoRA-all on the other datasets' held-out loss rise (higher: forgets more) and on
    ARC-Easy (lower: forgets more), dataset by dataset; the verdict names the modes that forget more."""
    runs, parts, more = ModeRuns(results), [], []
    for mode in NEW:
        rise, arc = runs.against(mode, what="forgetting"), runs.against(mode, what="knowledge")
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
    primary, runs = results["primary"], ModeRuns(results)
    deltas, rises = (runs.against_all(NEW, "equal-time", "epoch", what) for what in ("loss", "forgetting"))
    steps = {MODES[t["mode"]].short: t["steps"] for t in results["tunes"] if t["regime"] == "equal-time"}
    parts = [f"{name} {show(found)} in {steps[name]} steps" for name, found in deltas.items()]
    parts += [f"{MODES[m].short}: identification alone takes longer" for m in results["no_time_left"]]
    claim = f"Given LoRA-all's wall time on {primary}"
    if not parts:
        return Finding(claim, "not judged yet", "not measured yet", NOISE_RULE)
    evidence = f"in LoRA-all's time for {results['settings']['steps'][primary]} steps: " + ", ".join(parts)
    return Finding(claim, by_verdict(deltas, {}) or "not judged yet", evidence + rise_text(rises), NOISE_RULE)


def finding_long(results: dict) -> Finding:
    """The long regime on the primary dataset: each mode against LoRA-all after as many epochs, the verdict grouping
    the modes by the rule, by held-out loss and by the other datasets' loss rise (forgetting); LoRA-all's loss after
    one epoch beside it, to show whether the long run overfits."""
    primary, epochs, runs = results["primary"], results["settings"]["long_epochs"], ModeRuns(results)
    modes = sorted({t["mode"] for t in results["tunes"] if t["regime"] == "long"} - {"all"})
    deltas, rises = (runs.against_all(modes, "long", "long", what) for what in ("loss", "forgetting"))
    claim = f"At {epochs} epochs on {primary}, against LoRA-all"
    if not deltas:
        return Finding(claim, "not judged yet", "not measured yet", NOISE_RULE)
    evidence = listed(deltas) + rise_text(rises)
    long, epoch = (mean(runs.values(primary, ("all", regime))) for regime in ("long", "epoch"))
    if long is not None and epoch is not None:
        evidence += f"; LoRA-all's held-out loss {long:.4f} after {epochs} epochs, {epoch:.4f} after one"
    return Finding(claim, by_verdict(deltas, rises), evidence, NOISE_RULE)


def rise_text(rises: dict) -> str:
    return f"; the other datasets' loss rise: {listed(rises)}" if rises else ""


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


def noise_line(results: dict) -> str:
    """The pooled noise scale of each dataset, on the primary dataset each regime's own (once two regimes have several
    seeds: whether one scale fits them all), and the rule that judges by them (`ModeRuns.noise`)."""
    runs, primary = ModeRuns(results), results["primary"]
    noise = ", ".join(f"{d} {v:.4f}" for d in results["datasets"] if (v := runs.sigma(d)) is not None)
    line = f"Noise scale (pooled seed-to-seed SD of the held-out loss, over every regime): {noise or 'not yet'}."
    alone = {r: v for r in REGIMES if (v := runs.within(primary, "loss", {r})) is not None}
    if len(alone) > 1:
        line += f" On {primary}, each regime's own: {', '.join(f'{REGIMES[r]} {v:.4f}' for r, v in alone.items())}."
    return line + " A comparison is judged by the larger of the pooled scale and the spread of the regimes it compares."


def timing_section(results: dict) -> list[str]:
    if (timing := results.get("timing")) is None:
        return []
    rows = [[MODES[m].short, *(f"{v:.2f}" for v in (ratio(timing, m), *costs(results, m)))] for m in MODES]
    head = ["mode", "step time x LoRA-all", "wall time of one epoch, identification included", "memory rise"]
    note = (
        "Measured side by side in one process (the timing cell), each x LoRA-all's. After identification the inside "
        "modes train as ILA top 75% and ILA-sampled do; identification costs its stage-1 and stage-2 steps at the "
        "probe state's step time, and its memory counts in the rise: its stage 1 (LoRA on every layer in ILA's "
        f"wrapper) peaks at {ratio(timing, 'probe-stage1', 'memory_rise_mb'):.3f}x LoRA-all's."
    ) + "".join(repeat_note(timing, mode, twin) for mode, twin in repeats(timing))
    return ["## Cost, side by side", "", note, "", *table(head, rows, "lrrr"), ""]


def loss_section(results: dict) -> list[str]:
    """Per regime, each (dataset, mode) run: seeds, mean loss after, Δ vs LoRA-all (at one epoch for the equal-time
    regime), mean rise of the other datasets' loss, mean ARC-Easy accuracy."""
    runs, out = ModeRuns(results), ["## Held-out loss", ""]
    head = ["dataset", "mode", "seeds", "loss after", "Δ vs LoRA-all", "other datasets' rise", "ARC-Easy"]
    for regime, text in REGIMES.items():
        rows, against = [], ("all", "epoch" if regime == "equal-time" else regime)
        for dataset, mode in ((d, m) for d in results["datasets"] for m in MODES):
            if not (losses := runs.values(dataset, arm := (mode, regime))):
                continue
            compared = mode != "all" or regime == "equal-time"  # LoRA-all against itself only across regimes
            delta = show(runs.delta(dataset, arm, against)) if compared else ""
            rise, know = (mean(runs.values(dataset, arm, what)) for what in ("forgetting", "knowledge"))
            row = [str(len(losses)), f"{statistics.mean(losses):.4f}", delta, number(rise, "+.4f", ""), f"{know:.3f}"]
            rows.append([dataset, MODES[mode].short, *row])
        if rows:
            out += [f"### {text}", "", *table(head, rows, "llrrrrr"), ""]
    return out
