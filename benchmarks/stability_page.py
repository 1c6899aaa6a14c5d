"""The stability study's page (`STABILITY.md`): its tables, its findings (each a `Finding`, judged by a stated rule
where there is one) and the plot of reproducibility against cost."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from benchmarks.core.page import Finding, cell_text, findings_section, missing_section, table
from benchmarks.core.stats import OVERLAP_RULE, overlap_verdict, top_count
from peft_ila import ILAConfig
from peft_ila.tuner.selection import CERTAIN


def _f(d: dict, k: str) -> str:
    return f"{d[k]:.2f}" if k in d else "–"


def page(results: dict, where: Path) -> str:
    """The Markdown page of the study, its cells in `where`."""
    ref, rnd = results["reference"], results["random"]
    lines = [
        "# Stability of the layer ranking",
        "",
        f"Written by `python -m benchmarks.stability --preset {results['preset']}` (`make bench-stability`) from the "
        f"cells in `{where}`; {results['candidates']} candidate layers; {results['machine']['cpu_count']} CPU cores, "
        f"torch {results['machine']['torch']}. Cost is identification's optimizer steps (stage 1 + stage 2), or its "
        f"seconds, over those of a {results['epochs']}-epoch LoRA-all fine-tune of the same data ({ref['epoch_steps']} "
        f"steps/epoch, {ref['step_seconds']:.2f} s/step). Seconds were measured on a shared machine; steps are the "
        "steadier unit.",
        "",
        "Two runs that differ in one source of noise only: `init` (the stage-1 adapter initialisation seed), `order` "
        "(the data order), `stage2` (the estimator's stage alone, on the same stage-1 adapters). Jaccard of the top-k "
        f"sets; two random sets overlap {rnd['jaccard@0.25']:.2f} at 25% (5%: {rnd['jaccard@0.05']:.2f}, 10%: "
        f"{rnd['jaccard@0.1']:.2f}, 50%: {rnd['jaccard@0.5']:.2f}). *Within type*: the mean over module types "
        "(q_proj, ..., down_proj) of the Spearman correlation inside the type, i.e. how reproducible the ranking of "
        "positions is once the type is fixed.",
        "",
    ]
    lines += _summary(results)
    lines += ["", "The gradient-norm row compares two seeds that differ in both initialisation and data order.", ""]
    lines += findings_section([Finding(**f) for f in results["findings"]])
    lines += [
        *_known(results),
        *_calibration(results),
        *_types(results),
        *_blocks(results),
        *_lengths(results),
        *_cross(results),
    ]
    if results["missing"]:
        lines += ["", *missing_section(results["missing"], "make bench-stability")]
    lines += [
        "",
        "Reproducibility against cost, in steps, seconds and tokens (the gradient-norm baseline has no token count):",
    ]
    lines += ["", "![Jaccard against cost](results/stability/" + results["preset"] + "/frontier.png)", ""]
    return "\n".join(lines)


def _summary(results: dict) -> list[str]:
    """The main table: each estimator's cost and its agreement between runs that differ in one source of noise."""
    header = ["estimator", "stage-1 steps", "stage-2 steps", "cost (steps)", "cost (seconds)", "tokens"]
    header += ["J@25% init", "J@25% order", "J@25% stage2", "Spearman init", "Spearman order"]
    header += ["within type init", "within type order", "J@5/10/50% init"]
    rows = []
    for row in sorted(results["rows"], key=lambda r: (r["estimator"], r["stage1_steps"])):
        init, order, stage2 = row.get("init", row.get("seed")), row.get("order", {}), row.get("stage2", {})
        small = "/".join(_f(init, f"jaccard@{f:g}") for f in (0.05, 0.1, 0.5))
        tokens = f"{row['tokens'] / 1000:.0f}k" if "tokens" in row else "–"
        rows.append(
            [
                cell_text(row["estimator"]),
                str(row["stage1_steps"]),
                str(row["stage2_steps"]),
                f"{row['cost_steps']:.3f}x",
                f"{row['cost']:.3f}x",
                tokens,
                _f(init, "jaccard@0.25"),
                _f(order, "jaccard@0.25"),
                _f(stage2, "jaccard@0.25"),
                _f(init, "spearman"),
                _f(order, "spearman"),
                _f(init, "spearman_within_type"),
                _f(order, "spearman_within_type"),
                small,
            ]
        )
    return table(header, rows, "l" + "r" * 12 + "l")


GOAL = dict(jaccard=0.80, spearman=0.8, cost=0.25)  # seed-to-seed top-25% overlap and rank correlation


def _row(results: dict, estimator: str, stage1: int, stage2: int | None = None) -> dict | None:
    rows = [r for r in results["rows"] if r["estimator"] == estimator and r["stage1_steps"] == stage1]
    return next((r for r in rows if stage2 is None or r["stage2_steps"] == stage2), None)


def _worst(row: dict, key: str = "jaccard@0.25") -> float:
    """The lower of the init and order agreements (or the seed one); NaN when the row has no such measure."""
    return min((row[s][key] for s in ("init", "order", "seed") if s in row and key in row[s]), default=math.nan)


RIGHT = 0.9  # an estimator is right on the planted task when it finds the planted layers in this share of its runs


def _pooled_known(results: dict) -> dict[str, list[dict]]:
    """The planted-task rows of each estimator (all its stage-1 lengths)."""
    pooled: dict[str, list[dict]] = {}
    for row in results.get("known", []):
        pooled.setdefault(row["estimator"], []).append(row)
    return pooled


def _found_share(results: dict) -> dict[str, float]:
    """Estimator -> the share of its planted-task runs that put the planted layers on top."""
    return {
        name: sum(r["found"] for r in rows) / sum(r["runs"] for r in rows)
        for name, rows in _pooled_known(results).items()
    }


def findings(results: dict) -> list[Finding]:
    """The study's answers, from whatever cells exist."""
    defaults = ILAConfig()
    default = _row(results, defaults.estimator, defaults.stage1_max_steps, defaults.stage2_steps)
    out = [*_defaults_finding(results, default), *_cheapest_finding(results)]
    out += _known_findings(results, default) + _calibration_finding(results, defaults.estimator)
    block = default and default.get("blocks")
    if block:
        init, order = block["init"], block["order"]
        out.append(
            Finding(
                f"Block granularity (`{defaults.estimator}`)",
                f"top-25% Jaccard {init['jaccard@0.25']:.2f} (init) / {order['jaccard@0.25']:.2f} (order) over "
                f"{results['blocks']} blocks",
                f"two random sets of blocks: {results['random_blocks']:.2f}; Spearman {init['spearman']:.2f} / "
                f"{order['spearman']:.2f}",
                id="stability-blocks",
            )
        )
    out += _cross_finding(results, defaults.estimator) + _length_finding(results, defaults.estimator)
    return out + _trajectory_findings(results)


def _defaults_finding(results: dict, default: dict | None) -> list[Finding]:
    if not default:
        return []
    defaults = ILAConfig()
    met = (
        _worst(default) >= GOAL["jaccard"]
        and _worst(default, "spearman") >= GOAL["spearman"]
        and default["cost_steps"] <= GOAL["cost"]
    )
    noise = {s: default[s]["jaccard@0.25"] for s in ("init", "order", "stage2") if s in default}
    init, order = default["init"], default["order"]
    return [
        Finding(
            f"Reruns with the defaults reproduce the top 25% (`{defaults.estimator}`, {defaults.stage1_max_steps} + "
            f"{defaults.stage2_steps} steps, {default['cost_steps']:.2f}x the steps of a {results['epochs']}-epoch "
            "LoRA-all fine-tune)",
            f"the goal is {'met' if met else 'not met'}",
            f"top-25% Jaccard {init['jaccard@0.25']:.2f} (init) / {order['jaccard@0.25']:.2f} (order), Spearman "
            f"{init['spearman']:.2f} / {order['spearman']:.2f}; the largest noise source is "
            f"{min(noise, key=noise.get)} ({', '.join(f'{k} {v:.2f}' for k, v in noise.items())})",
            f"the goal: Jaccard ≥ {GOAL['jaccard']:.2f} and Spearman ≥ {GOAL['spearman']} at ≤ {GOAL['cost']}x",
            id="stability-defaults",
        )
    ]


def _cheapest_finding(results: dict) -> list[Finding]:
    cheap = [r for r in results["rows"] if r["cost_steps"] <= GOAL["cost"] and "top_types" in r]
    if not cheap:
        return []
    best = max(cheap, key=_worst)
    typed = [r for r in cheap if "spearman_within_type" in r.get("init", r.get("seed", {}))]
    two = sum(sorted(best["top_types"].values())[-2:])
    evidence = (
        f"Jaccard {_worst(best):.2f} (worse of init and order); {two} of its {sum(best['top_types'].values())} layers "
        "are of two module types"
    )
    if typed:
        within = max(typed, key=lambda r: _worst(r, "spearman_within_type"))
        evidence += (
            f"; the most reproducible ranking of positions within a module type is {within['estimator']}'s "
            f"(Spearman {_worst(within, 'spearman_within_type'):.2f})"
        )
    verdict = f"{best['estimator']} at {best['stage1_steps']} stage-1 steps"
    return [Finding(f"Most reproducible top 25% within {GOAL['cost']}x", verdict, evidence, id="stability-cheapest")]


def _calibration_finding(results: dict, estimator: str) -> list[Finding]:
    row = next((r for r in results.get("calibration", []) if r["estimator"] == estimator), None)
    if row is None:
        return []
    sources = ("stage2", "init", "order")
    honest = [s for s in sources if row[s]["selected certain"] >= CERTAIN]
    evidence = (
        f"the run is certain of {row['counts']['selected certain']} of its {row['selected']} selected layers; a rerun "
        "selects "
        + ", ".join(f"{row[s]['selected certain']:.0%} of them ({s})" for s in sources)
        + ", and "
        + ", ".join(f"{row[s]['selected uncertain']:.0%}" for s in sources)
        + " of the uncertain ones"
    )
    verdict = f"calibrated against: {', '.join(honest) or 'none'}; not against: "
    verdict += ", ".join(s for s in sources if s not in honest) or "none"
    rule = f"calibrated against a source when its rerun selects at least {CERTAIN:.0%} of the certain layers"
    claim = f"Is the confidence honest? (`{estimator}`, {row['stage1_steps']} stage-1 steps)"
    return [Finding(claim, verdict, evidence, rule, id="stability-confidence")]


def _known_findings(results: dict, default: dict | None) -> list[Finding]:
    """Which estimators find the planted layers, and the most reproducible cheap setting among those that do."""
    pooled = _pooled_known(results)
    if not pooled:
        return []
    share = _found_share(results)
    counts = [
        f"{name} {sum(r['found'] for r in rows)}/{sum(r['runs'] for r in rows)} "
        f"(mean rank {statistics.mean(r['mean_rank'] for r in rows):.1f})"
        for name, rows in sorted(pooled.items(), key=lambda item: -share[item[0]])
    ]
    first = results["known"][0]
    right = [name for name in pooled if share[name] >= RIGHT]
    out = [
        Finding(
            "Reproducible is not the same as right",
            f"right on the planted task: {', '.join(right) or 'none'}; not right: "
            + (", ".join(name for name in pooled if name not in right) or "none"),
            f"on the planted task (a tiny model whose important layers are known; stage-1 lengths pooled) the planted "
            f"layers are the top {len(first['ranks'][0])} in: " + ", ".join(counts) + "; a random ranking: mean rank "
            f"{first['random_mean_rank']:.1f}",
            f"right when found in ≥ {RIGHT:.0%} of runs",
            id="stability-planted",
        )
    ]
    rows = [r for r in results["rows"] if share.get(r["estimator"], 0) >= RIGHT and r["cost_steps"] <= GOAL["cost"]]
    if rows:
        best = max(rows, key=_worst)
        where = f"`{best['estimator']}` at {best['stage1_steps']} stage-1 steps (Jaccard {_worst(best):.2f})"
        if best is default:
            verdict = "the defaults"
        else:
            verdict = f"not the defaults ({_worst(default):.2f})" if default else "the defaults have no row yet"
        evidence = "among the estimators right on the planted task, the most reproducible top 25% within "
        evidence += f"{GOAL['cost']}x is {where}"
        out.append(Finding("Where the defaults sit", verdict, evidence, id="stability-defaults-place"))
    return out


def _length_finding(results: dict, estimator: str) -> list[Finding]:
    """Does a longer stage 1 make the ranking more reproducible? The estimator's rows at every length, and the
    within-type agreement of update norms along the recorded runs."""
    rows = sorted((r for r in results["rows"] if r["estimator"] == estimator), key=lambda r: r["stage1_steps"])
    run = results.get("trajectory")
    if len(rows) < 2 or not run:
        return []
    steps = "/".join(str(r["stage1_steps"]) for r in rows)
    points = {p["step"]: p for p in run["points"]}
    within = [points[r["stage1_steps"]] for r in rows if r["stage1_steps"] in points]
    return [
        Finding(
            f"A longer stage 1 (`{estimator}` at {steps} stage-1 steps)",
            "top-25% Jaccard " + "/".join(f"{_worst(r):.2f}" for r in rows) + " (worse of init and order)",
            "cost "
            + "/".join(f"{r['cost_steps']:.2f}x" for r in rows)
            + "; within-type Spearman "
            + "/".join(f"{_worst(r, 'spearman_within_type'):.2f}" for r in rows)
            + "; `update-norm` within-type Spearman between seeds at the same steps "
            + "/".join(f"{_worst(p, 'spearman_within_type'):.2f}" for p in within),
            id="stability-longer-stage1",
        )
    ]


def _cross_finding(results: dict, estimator: str) -> list[Finding]:
    crosses = [c for c in results["cross"] if c["estimator"] == estimator]
    same = _row(results, estimator, crosses[0]["stage1_steps"]) if crosses else None
    if not same or len(crosses) < 3:
        return []
    cross = statistics.mean(c["jaccard@0.25"] for c in crosses)
    floor = statistics.mean([same["init"]["jaccard@0.25"], same["order"]["jaccard@0.25"]])
    return [
        Finding(
            f"Important layers overlap about 90% across alignment datasets (`{estimator}`)",
            overlap_verdict(cross),
            f"mean top-25% Jaccard across alpaca, LIMA and Dolly {cross:.2f}, against {floor:.2f} between two runs "
            f"on the same data (ratio {cross / floor:.2f})",
            f"mean top-25% Jaccard {OVERLAP_RULE}",
            id="stability-overlap",
        )
    ]


def _trajectory_findings(results: dict) -> list[Finding]:
    run = results.get("trajectory")
    if not run:
        return []
    early = statistics.mean(run["early"].values())
    loss = next(r for r in run["rules"] if "loss_rule" in r)
    return [
        Finding(
            "Important layers are found early in stage 1 (`update-norm`)",
            overlap_verdict(early),
            f"top-25% Jaccard {early:.2f} between step {run['early_step']} and step {run['points'][-1]['step']} of "
            "the same run (mean over 3 runs)",
            f"top-25% Jaccard {OVERLAP_RULE}",
            id="stability-found-early",
        ),
        Finding(
            f"The paper's stop rule on the loss (ε = {loss['loss_rule'][0]}, window {loss['loss_rule'][1]})",
            f"ends the three alpaca runs at steps {', '.join(map(str, loss['stops'].values()))}",
            f"where they stop, `update-norm` top-25% Jaccard {loss['init']['jaccard@0.25']:.2f} (init) / "
            f"{loss['order']['jaccard@0.25']:.2f} (order)",
            id="stability-stop-rule",
        ),
    ]


def _known(results: dict) -> list[str]:
    """Each estimator on the planted task: how often it finds the planted layers, and where they land."""
    rows = results.get("known", [])
    if not rows:
        return []
    first = rows[0]
    lines = ["## A known answer", ""]
    lines += [
        "A tiny random Llama, trained on sequences sampled from a teacher that differs from it only in "
        f"{len(first['ranks'][0])} planted layers (`benchmarks/known_answer.py`, the tests' known-answer task), so the "
        f"layers that need to change are known. Each row: {first['runs']} seeds (student, teacher and identification "
        f"seed). *Found*: runs whose top {len(first['ranks'][0])} are exactly the planted layers (a random ranking: "
        f"{first['random_found']:.4f}). *Mean rank* of the planted layers (random: {first['random_mean_rank']:.1f}; "
        f"best: {statistics.mean(range(1, len(first['ranks'][0]) + 1)):.1f}).",
        "",
    ]
    body = [
        [
            cell_text(row["estimator"]),
            str(row["stage1_steps"]),
            f"{row['found']}/{row['runs']}",
            f"{row['mean_rank']:.1f}",
            "; ".join(",".join(map(str, r)) for r in row["ranks"]),
        ]
        for row in rows
    ]
    header = ["estimator", "stage-1 steps", "found", "mean rank", "ranks per seed"]
    return [*lines, *table(header, body, "lrrrl"), ""]


def _calibration(results: dict) -> list[str]:
    """How often a rerun keeps the membership of the layers a run was (un)certain of."""
    rows = results.get("calibration", [])
    if not rows:
        return []
    lines = ["## Is the confidence honest?", ""]
    lines += [
        "Every run says how sure it is of each layer's membership in its top 25%: the share of bootstrap resamples of "
        f"its estimator's steps that agree (`layer_confidence`; *certain* at >= {CERTAIN:.0%}; the CLI's line counts "
        f"the certain layers of the selection). A calibrated confidence means that a rerun keeps at least "
        f"{CERTAIN:.0%} of the certain layers on their side of the top 25%. Reference run: seeds 0/0; each rerun "
        "differs from it in one source of noise. Cells: the share of the group's layers that the rerun puts on the "
        "same side (for the selected ones: that it selects too).",
        "",
    ]
    groups = ("selected certain", "selected uncertain", "certain", "uncertain")
    body = []
    for row in rows:
        counts = row["counts"]
        counted = [str(counts[g]) for g in groups]
        body.append([cell_text(row["estimator"]), str(row["stage1_steps"]), "(layers in the group)", *counted])
        for source in ("stage2", "init", "order"):
            body.append(["", "", source, *(f"{row[source][g]:.2f}" if counts[g] else "–" for g in groups)])
    header = ["estimator", "stage-1 steps", "rerun differs in", "selected, certain", "selected, uncertain"]
    header += ["all certain", "all uncertain"]
    lines += table(header, body, "lrlrrrr")
    return [*lines, ""]


def _types(results: dict) -> list[str]:
    """What each estimator's top 25% is made of, by module type (the reference run)."""
    types = sorted({t for row in results["rows"] for t in row.get("top_types", {})})
    lines = ["## What the top 25% is made of", "", "Layers of each module type in the top 25% of the reference run "]
    lines[-1] += "(seeds 0/0). A top set filled by one or two types agrees between runs whatever the positions do."
    body = [
        [cell_text(row["estimator"]), str(row["stage1_steps"]), *(str(row["top_types"].get(t, 0)) for t in types)]
        for row in sorted(results["rows"], key=lambda r: (r["estimator"], r["stage1_steps"]))
        if "top_types" in row
    ]
    return [*lines, "", *table(["estimator", "stage-1 steps", *types], body, "lr" + "r" * len(types)), ""]


def _blocks(results: dict) -> list[str]:
    """Seed agreement at block granularity (derived exactly from the module scores, see `block_scores`)."""
    k = top_count(0.25, results["blocks"])
    lines = ["## Block granularity", ""]
    lines += [
        f"One score per transformer block ({results['blocks']} blocks; top 25% = {k} blocks; two random sets overlap "
        f'{results["random_blocks"]:.2f}), as `granularity="block"` ranks them, derived from the module scores.',
        "",
    ]
    body = []
    for row in sorted(results["rows"], key=lambda r: (r["estimator"], r["stage1_steps"])):
        if "blocks" in row:
            b = row["blocks"]
            init, order = b.get("init", b.get("seed")), b.get("order", {})
            body.append(
                [
                    cell_text(row["estimator"]),
                    str(row["stage1_steps"]),
                    _f(init, "jaccard@0.25"),
                    _f(order, "jaccard@0.25"),
                    _f(b.get("stage2", {}), "jaccard@0.25"),
                    _f(init, "spearman"),
                    _f(order, "spearman"),
                ]
            )
    header = ["estimator", "stage-1 steps", "J@25% init", "J@25% order", "J@25% stage2"]
    header += ["Spearman init", "Spearman order"]
    return [*lines, *table(header, body, "lrrrrrr"), ""]


def _lengths(results: dict) -> list[str]:
    """Update-norm agreement along stage 1, and stop rules on the mask."""
    run = results.get("trajectory")
    if not run:
        return ["## Stage-1 length", "", "(no stage-1 trajectories among the cells yet)", ""]
    lines = ["## Stage-1 length, and a stop rule on the mask", ""]
    lines += [
        f"Update-norm scores recorded every {run['every']} steps along the longest stage-1 runs (a shorter run is a "
        "prefix of a longer one: constant learning rate, same data order).",
        "",
    ]
    header = ["stage-1 steps", "J@25% init", "J@25% order", "Spearman init", "Spearman order"]
    header += ["within type init", "within type order"]
    points = [p for p in run["points"] if p["step"] % 32 == 0 or p["step"] == 16]
    body = [
        [
            str(p["step"]),
            _f(p["init"], "jaccard@0.25"),
            _f(p["order"], "jaccard@0.25"),
            _f(p["init"], "spearman"),
            _f(p["order"], "spearman"),
            _f(p["init"], "spearman_within_type"),
            _f(p["order"], "spearman_within_type"),
        ]
        for p in points
    ]
    lines += table(header, body, "rrrrrrr")
    lines += [
        "",
        "A stop rule on the mask ends stage 1 at the first check whose top-25% set overlaps the set `window` steps "
        "before by at least `J`; each run stops on its own, and the runs are compared where they stopped. The last "
        "row is the paper's test on the loss (the mean loss of the last 20 steps within ε of the 20 before), "
        "compared at the first recorded check at or after its stop.",
        "",
    ]
    body = []
    for rule in run["rules"]:
        stops = ", ".join(str(v) for v in rule["stops"].values())
        if "loss_rule" in rule:  # compared at the first recorded check at or after the stop
            window, threshold = f"loss test: {rule['loss_rule'][1]}", f"ε = {rule['loss_rule'][0]}"
        else:
            window, threshold = str(rule["window"]), str(rule["jaccard"])
        body.append(
            [
                window,
                threshold,
                stops,
                _f(rule["init"], "jaccard@0.25"),
                _f(rule["order"], "jaccard@0.25"),
                _f(rule["init"], "spearman"),
            ]
        )
    header = ["window", "J", "stop steps (init/order 0/0, 1/0, 0/1)", "J@25% init", "J@25% order", "Spearman init"]
    return [*lines, *table(header, body, "rrlrrr"), ""]


def _cross(results: dict) -> list[str]:
    lines = ["## Across datasets, against the seed-to-seed floor", ""]
    body = []
    for cross in results["cross"]:
        same = [r for r in results["rows"] if r["estimator"] == cross["estimator"]]
        same = [r for r in same if r["stage1_steps"] == cross["stage1_steps"] and "init" in r]
        floor = statistics.mean([same[0]["init"]["jaccard@0.25"], same[0]["order"]["jaccard@0.25"]]) if same else None
        shown = f"{floor:.2f}" if floor is not None else "–"
        body.append(
            [
                cell_text(cross["estimator"]),
                str(cross["stage1_steps"]),
                f"{cross['a']} / {cross['b']}",
                f"{cross['jaccard@0.25']:.2f}",
                f"{cross['spearman']:.2f}",
                shown,
            ]
        )
    header = ["estimator", "stage-1 steps", "datasets", "J@25%", "Spearman", "J@25% between seeds (same data)"]
    if not results["cross"]:
        body = [["(no cross-dataset cells in this run: LIMA and Dolly come from ../shared)", "", "", "", "", ""]]
    return lines + table(header, body, "lrlrrr")


COSTS = {  # row key -> x-axis label of the frontier's panels
    "cost_steps": "identification steps / steps of a 3-epoch LoRA-all fine-tune",
    "cost": "identification seconds / seconds of that fine-tune",
    "tokens": "tokens read by identification",
}


def frontier(path: Path, results: dict) -> None:
    """Seed-to-seed top-25% Jaccard (the lower of init and order) against each cost, one line per estimator (dashed,
    hollow: not right on the planted task)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    share = _found_share(results)
    fig, axes = plt.subplots(1, len(COSTS), figsize=(15, 4), sharey=True)
    for ax, (cost, label) in zip(axes, COSTS.items(), strict=True):
        for name in dict.fromkeys(r["estimator"] for r in results["rows"]):
            rows = [r for r in results["rows"] if r["estimator"] == name and cost in r]
            rows.sort(key=lambda r: r["stage1_steps"])  # a line joins the stage-1 lengths in order
            right = share.get(name, 0) >= RIGHT
            tag = "" if right else " (not right on the planted task)"
            ax.plot(
                [r[cost] for r in rows],
                [_worst(r) for r in rows],
                marker="o",
                fillstyle="full" if right else "none",
                linestyle="-" if right else "--",
                label=name + tag,
            )
        ax.axhline(results["random"]["jaccard@0.25"], color="grey", linestyle=":", label="random sets")
        ax.set_xlabel(label)
    axes[0].set_ylabel("top-25% Jaccard between seeds (worst source)")
    axes[0].set_ylim(0, 1)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
