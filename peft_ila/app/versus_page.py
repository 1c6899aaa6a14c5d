"""`peft-ila versus`'s verdicts and page: every mode against LoRA-all by the library's 2-SE rule (`judge`), the answer
in one paragraph, the tables, and the plot of held-out loss against forgetting."""

from __future__ import annotations

import statistics
from pathlib import Path

from .. import __version__
from .files import write_json
from .judge import MATCHED, NOISE_RULE, at_matched_loss, beyond, curve, difference, pooled_sd, ratio, show
from .recipe import MODES
from .report import machine

LOSS = {-1: "better than", 0: "level with", 1: "worse than"}  # held-out loss, by `beyond`
FORGETTING = {-1: "forgets less", 0: "forgets as much", 1: "forgets more"}


def write_results(
    out: Path, settings: dict, base: dict, runs: list[dict], timing: dict | None, modes, seeds: int, argv
) -> dict:
    """Judge what there is, write versus.json, VERSUS.md and versus.png into `out`, and return the results."""
    from .plots import versus_plot

    results = {
        "settings": settings,
        "base": base,
        "runs": runs,
        "timing": timing,
        "missing": [f"{m}, seed {s}" for m in modes for s in range(seeds) if not _ran(runs, m, s)],
        "comparisons": compare(runs, modes, timing, settings["schedule"]["steps"], base),
        "machine": machine(),
        "command": "peft-ila " + " ".join(argv),
    }
    results["answer"] = answer(results)
    write_json(out / "versus.json", results)
    (out / "VERSUS.md").write_text(page(results))
    versus_plot(out / "versus.png", runs, base, [m for m in modes if any(r["mode"] == m for r in runs)])
    return results


def _ran(runs: list[dict], mode: str, seed: int) -> bool:
    return any(r["mode"] == mode and r["seed"] == seed for r in runs)


def _ends(runs: list[dict], key: str) -> list[float]:
    """The runs' figure `key` at their last checkpoint (held_out, forgetting), those that have it."""
    return [r["checkpoints"][-1][key] for r in runs if r["checkpoints"][-1][key] is not None]


def compare(runs: list[dict], modes, timing: dict | None, steps: int, base: dict) -> dict:
    """Per mode: seeds, mean held-out loss and forgetting at the end, instruction scores; against LoRA-all: their
    differences ± SE (the pooled seed-to-seed SD of all modes), forgetting at matched held-out loss, the cost ratios
    and the verdict. And the noise scales."""
    by_mode = {m: [r for r in runs if r["mode"] == m] for m in modes}
    ends = {key: {m: _ends(rs, key) for m, rs in by_mode.items()} for key in ("held_out", "forgetting")}
    noise = {key: pooled_sd(values.values()) for key, values in ends.items()}
    rows = {}
    for mode, mode_runs in by_mode.items():
        if not mode_runs:
            continue
        row = {"label": MODES[mode].label, "seeds": len(mode_runs)}
        row.update({key: statistics.mean(ends[key][mode]) if ends[key][mode] else None for key in ends})
        row["seconds"] = statistics.mean(r["seconds"] for r in mode_runs)
        row.update({f"instructions_{at}": _followed(mode_runs, at) for at in ("best", "end")})
        if mode != "lora-all" and by_mode["lora-all"]:
            for key in ends:
                row[f"delta_{key}"] = difference(ends[key][mode], ends[key]["lora-all"], noise[key])
            row.update({key: _matched(mode_runs, by_mode["lora-all"], base, how) for key, how in MATCHED.items()})
            row.update(_costs(mode, by_mode, timing, steps))
        rows[mode] = row
    return {"noise": noise, "modes": rows}


def _followed(runs: list[dict], at: str) -> float | None:
    """The mean share of instructions the runs obeyed `at` the end or their best checkpoint (None: not scored)."""
    shares = [r["closing"][at]["instructions"]["share"] for r in runs if "closing" in r]
    return statistics.mean(shares) if shares else None


def _matched(runs: list[dict], lora: list[dict], base: dict, compare=at_matched_loss) -> dict | None:
    """Forgetting against LoRA-all's at matched held-out loss (`judge.at_matched_loss`; `judge.between_checkpoints`:
    without the line from the base model to each first checkpoint; `judge.past_best`: where the curves climb back
    past their best checkpoints), when measured."""
    if any(p["forgetting"] is None for r in [*runs, *lora] for p in r["checkpoints"]):
        return None
    mine, theirs = ([curve(r["checkpoints"], base["held_out"]) for r in rs] for rs in (runs, lora))
    return compare(mine, theirs)


def _costs(mode: str, by_mode: dict, timing: dict | None, steps: int) -> dict:
    """A mode's cost ratios to LoRA-all: its measured wall time, and, from the side-by-side timing, step time,
    memory rise and the wall time of its steps with identification's stages counted at the probe's step time."""
    seconds = [statistics.mean(r["seconds"] for r in by_mode[m]) for m in (mode, "lora-all")]
    costs = {"wall_measured": ratio(*seconds)}
    if timing is None:
        return costs
    lora = timing["lora-all"]["step_seconds"]
    identified = [r["identification"] for r in by_mode[mode]]
    stage1, stage2 = (statistics.mean(i.get(f"stage{k}_steps", 0) for i in identified) for k in (1, 2))
    tuned = steps - (stage1 if MODES[mode].layers == "inside" else 0)
    wall = tuned * timing[mode]["step_seconds"]
    if MODES[mode].identifies:
        wall += stage1 * timing["probe-stage1"]["step_seconds"] + stage2 * timing["probe-stage2"]["step_seconds"]
    costs.update(
        step=ratio(timing[mode]["step_seconds"], lora),
        memory=ratio(timing[mode]["memory_rise_mb"], timing["lora-all"]["memory_rise_mb"]),
        wall=ratio(wall, steps * lora),
    )
    return costs


def verdict(row: dict) -> str:
    """A mode against LoRA-all in words, by the 2-SE rule: held-out loss, then forgetting where measured."""
    if row.get("delta_held_out") is None:
        return "not judged: one seed gives no noise scale"
    words = f"{LOSS[beyond(row['delta_held_out'])]} LoRA-all on held-out loss ({show(row['delta_held_out'])})"
    if row.get("delta_forgetting") is not None:
        words += f" and {FORGETTING[beyond(row['delta_forgetting'])]} ({show(row['delta_forgetting'])})"
    return words


def answer(results: dict) -> str:
    """The paragraph at the top of the page: each mode's verdict and cost against LoRA-all."""
    settings, rows = results["settings"], results["comparisons"]["modes"]
    seeds = rows["lora-all"]["seeds"] if "lora-all" in rows else 0
    parts = []
    for mode, row in rows.items():
        if mode == "lora-all":
            continue
        cost = row.get("wall") or row.get("wall_measured")
        at = f", at {cost:.2f}x its wall time" if cost is not None else ""
        parts.append(f"{row['label']} is {verdict(row)}{at}")
    runs = f"{settings['schedule']['steps']} steps, {seeds} seed{'s' * (seeds != 1)}"
    head = f"On {settings['model']} and {settings['data']}, {runs}:"
    if results["missing"]:
        head = f"So far ({len(results['missing'])} runs missing), o{head[1:]}"
    return f"{head} " + ("; ".join(parts) + "." if parts else "no mode but LoRA-all has run yet.")


def page(results: dict) -> str:
    """VERSUS.md."""
    settings, comparisons = results["settings"], results["comparisons"]
    noise = comparisons["noise"]
    refs = ", ".join(settings["references"]) or "none (pass --reference FILE to measure forgetting)"
    lines = [
        f"# {settings['model']} on {settings['data']}: every mode against LoRA-all",
        "",
        f"Written by `{results['command']}` (peft-ila {__version__}).",
        "",
        f"**Answer.** {results['answer']}",
        "",
        f"Rule: {NOISE_RULE.replace(' (see the noise scale above)', '')}, the standard error from the pooled "
        f"seed-to-seed SD of all modes: held-out loss {_num(noise['held_out'])}, forgetting "
        f"{_num(noise['forgetting'])}. Forgetting: the loss rise over the base model on the reference sets ({refs}), "
        "averaged over them. At matched held-out loss, each seed's curve (from the base model through its checkpoints) "
        "is read at the held-out losses every curve reaches on its way down; between checkpoints only, the same "
        "without the straight line from the base model to each first checkpoint, which no checkpoint measured; past "
        "the best, where each curve first climbs back to the same held-out loss. Costs: step time and memory rise "
        "measured side by side in one process (`timing.json`); wall time is the run's steps at those step times, "
        "identification's stages included, and, measured, the runs' own seconds (one after another, evaluations left "
        "out: on a shared machine they move with its load while each run ran, the side-by-side ratios do not).",
        "",
        *_table(comparisons["modes"]),
        "",
        *_checkpoints(results["runs"], results["base"]),
        "![held-out loss against forgetting, every checkpoint of every run](versus.png)",
        "",
    ]
    if results["missing"]:
        lines += [f"Not run yet ({len(results['missing'])}; rerun the command to continue):", ""]
        lines += [f"- {m}" for m in results["missing"]]
    return "\n".join(lines) + "\n"


def _num(value, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _ratio(value) -> str:
    return "" if value is None else f"{value:.2f}"


def _table(rows: dict) -> list[str]:
    header = "| mode | seeds | held-out loss | Δ vs LoRA-all | forgetting | Δ vs LoRA-all | step time x | memory x | "
    header += "wall time x | measured wall x | Δ forgetting at matched held-out loss | Δ forgetting, between "
    header += "checkpoints only | Δ forgetting past the best, matched | instructions: best / end |"
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|---:|"]
    for row in rows.values():
        deltas = [show(row[k]) if row.get(k) else "" for k in ("delta_held_out", "delta_forgetting")]
        costs = [_ratio(row.get(k)) for k in ("step", "memory", "wall", "wall_measured")]
        figures = [_num(row["held_out"]), deltas[0], _num(row["forgetting"]), deltas[1], *costs]
        figures += [_at_matched(row, key) for key in MATCHED]
        follows = [_num(row.get(f"instructions_{at}"), 3) for at in ("best", "end")]
        figures.append(" / ".join(follows) if any(follows) else "")
        lines.append(f"| {row['label']} | {row['seeds']} | " + " | ".join(figures) + " |")
    return lines


def _at_matched(row: dict, key: str = "matched") -> str:
    """Forgetting against LoRA-all's at matched held-out loss (`key`: one of `judge.MATCHED`), and over which
    held-out losses."""
    found = row.get(key)
    if not found or found["delta"] is None:
        return ""
    return f"{show(found['delta'])} over {found['range'][0]:.3f}–{found['range'][1]:.3f}"


def _base_following(base: dict) -> str:
    """The base model's instruction score, when instructions are scored."""
    if "closing" not in base:
        return ""
    score = base["closing"]["instructions"]
    return f" It obeys {score['share']:.3f} ± {score['se']:.3f} of the {len(score['obeyed'])} instructions."


def _checkpoints(runs: list[dict], base: dict) -> list[str]:
    """The mean over seeds of each mode's held-out loss and forgetting at each checkpoint."""
    lines = [
        "## Checkpoints (means over seeds)",
        "",
        f"The base model: held-out loss {_num(base['held_out'])}"
        + "".join(f", {name} {_num(loss)}" for name, loss in base["references"].items())
        + "."
        + _base_following(base),
        "",
        "A mode that identifies inside the fine-tune spends its first steps on its identification's stage 1, LoRA on "
        "every layer (the gates read 1 there), and goes on with its top layers only.",
        "",
        "| mode | step | held-out loss | forgetting |",
        "|---|---:|---:|---:|",
    ]
    points: dict[tuple[str, int], list[dict]] = {}
    for run in runs:
        for point in run["checkpoints"]:
            points.setdefault((run["mode"], point["step"]), []).append(point)
    for (mode, step), group in points.items():
        losses = [p["held_out"] for p in group]
        forgetting = [p["forgetting"] for p in group if p["forgetting"] is not None]
        mean = statistics.mean(forgetting) if forgetting else None
        lines.append(f"| {MODES[mode].label} | {step} | {_num(statistics.mean(losses))} | {_num(mean)} |")
    return [*lines, ""]
