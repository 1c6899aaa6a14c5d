"""The stability study's page (`STABILITY.md`): its tables, its findings (each a `Finding`, judged by a stated rule
where there is one) and the plot of reproducibility against cost."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from pathlib import Path

from benchmarks.core.page import Column, Finding, cell_text, columns, findings_section, missing_section, number, table
from benchmarks.core.stats import OVERLAP_RULE, overlap_verdict, top_count
from peft_ila import ILAConfig
from peft_ila.tuner.selection import CERTAIN

GOAL = dict(jaccard=0.80, spearman=0.8, cost=0.25)  # seed-to-seed top-25% overlap and rank correlation
RIGHT = 0.9  # an estimator is right on the planted task when it finds the planted layers in this share of its runs
MEASURES = {"J@25%": "jaccard@0.25", "Spearman": "spearman", "within type": "spearman_within_type"}
ESTIMATOR: Column = ("estimator", "l", lambda row: cell_text(row["estimator"]))
STAGE1: Column = ("stage-1 steps", "r", lambda row: str(row["stage1_steps"]))


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
        *_summary(results),
        "",
        "The gradient-norm row compares two seeds that differ in both initialisation and data order.",
        "",
        *findings_section([Finding(**f) for f in results["findings"]]),
    ]
    for section in (_known, _calibration, _types, _blocks, _lengths, _cross):
        lines += section(results)
    if results["missing"]:
        lines += [*missing_section(results["missing"], "make bench-stability"), ""]
    lines += [
        "Reproducibility against cost, in steps, seconds and tokens (the gradient-norm baseline has no token count):",
        "",
        f"![Jaccard against cost](results/stability/{results['preset']}/frontier.png)",
        "",
    ]
    return "\n".join(lines)


def _side(agreements: dict, source: str) -> dict:
    """The agreement between the two runs of a row (or of its blocks, a point, a rule) that differ in `source`; the
    gradient-norm row's `seed` stands for `init`; {} when there is none."""
    return agreements.get(source, agreements.get("seed", {}) if source == "init" else {})


def _agreements(*headers: str, of: str = "") -> list[Column]:
    """Columns headed "<measure> <source>" (a measure of `MEASURES`; init, order or stage2): that agreement between
    the two runs of a row that differ in the source (of its `of` entry: "blocks"), "–" where there is none."""

    def column(header: str) -> Column:
        measure, source = header.rsplit(" ", 1)
        return (header, "r", lambda row: number(_side(row[of] if of else row, source).get(MEASURES[measure])))

    return [column(header) for header in headers]


def _ordered(rows: list[dict]) -> list[dict]:
    """The rows by estimator, then stage-1 length."""
    return sorted(rows, key=lambda r: (r["estimator"], r["stage1_steps"]))


def _summary(results: dict) -> list[str]:
    """The main table: each estimator's cost and its agreement between runs that differ in one source of noise."""
    spec = [
        ESTIMATOR,
        STAGE1,
        ("stage-2 steps", "r", lambda row: str(row["stage2_steps"])),
        ("cost (steps)", "r", lambda row: f"{row['cost_steps']:.3f}x"),
        ("cost (seconds)", "r", lambda row: f"{row['cost']:.3f}x"),
        ("tokens", "r", lambda row: f"{row['tokens'] / 1000:.0f}k" if "tokens" in row else "–"),
        *_agreements("J@25% init", "J@25% order", "J@25% stage2", "Spearman init", "Spearman order"),
        *_agreements("within type init", "within type order"),
        ("J@5/10/50% init", "l", _other_fractions),
    ]
    return columns(spec, _ordered(results["rows"]))


def _other_fractions(row: dict) -> str:
    """The row's top-k Jaccard between init seeds at k = 5, 10 and 50%."""
    return "/".join(number(_side(row, "init").get(f"jaccard@{f:g}")) for f in (0.05, 0.1, 0.5))


def _section(title: str, *parts: str | list[str]) -> list[str]:
    """A page section: its heading, then each part (a paragraph, or a table's lines) followed by a blank line."""
    lines = [f"## {title}", ""]
    for part in parts:
        lines += [part, ""] if isinstance(part, str) else [*part, ""]
    return lines


def _row(results: dict, estimator: str, stage1: int, stage2: int | None = None) -> dict | None:
    """The estimator's row at `stage1` stage-1 steps (and `stage2` stage-2 steps, when given), if there is one."""
    rows = [r for r in results["rows"] if r["estimator"] == estimator and r["stage1_steps"] == stage1]
    return next((r for r in rows if stage2 is None or r["stage2_steps"] == stage2), None)


def _worst(row: dict, key: str = "jaccard@0.25") -> float:
    """The lower of the init and order agreements (or the seed one); NaN when the row has no such measure."""
    return min((row[s][key] for s in ("init", "order", "seed") if s in row and key in row[s]), default=math.nan)


def _init_order(agreements: dict, measure: str = "jaccard@0.25") -> str:
    """The measure between the runs that differ in each source, as "0.71 (init) / 0.74 (order)"."""
    return f"{agreements['init'][measure]:.2f} (init) / {agreements['order'][measure]:.2f} (order)"


def _each(values: Iterable[float]) -> str:
    """Values to 2 decimals, joined by '/'."""
    return "/".join(f"{v:.2f}" for v in values)


def _floor(results: dict, estimator: str, steps: int) -> float | None:
    """The mean top-25% Jaccard between seeds (init, order) of the estimator's row at `steps`, if there is one."""
    row = _row(results, estimator, steps)
    return statistics.mean([row["init"]["jaccard@0.25"], row["order"]["jaccard@0.25"]]) if row else None


def _planted(results: dict) -> dict[str, tuple[int, int, float]]:
    """Estimator -> its planted-task runs over all its stage-1 lengths: (runs that put the planted layers on top, runs,
    mean of its rows' mean ranks)."""
    pooled: dict[str, list[dict]] = {}
    for row in results.get("known", []):
        pooled.setdefault(row["estimator"], []).append(row)
    return {
        name: (
            sum(r["found"] for r in rows),
            sum(r["runs"] for r in rows),
            statistics.mean(r["mean_rank"] for r in rows),
        )
        for name, rows in pooled.items()
    }


def _found_share(results: dict) -> dict[str, float]:
    """Estimator -> the share of its planted-task runs that put the planted layers on top."""
    return {name: found / runs for name, (found, runs, _) in _planted(results).items()}


def findings(results: dict) -> list[Finding]:
    """The study's answers, from whatever cells exist."""
    defaults = ILAConfig()
    estimator = defaults.estimator
    default = _row(results, estimator, defaults.stage1_max_steps, defaults.stage2_steps)
    return [
        *_defaults_finding(results, default, defaults),
        *_cheapest_finding(results),
        *_known_findings(results, default),
        *_calibration_finding(results, estimator),
        *_blocks_finding(results, default, estimator),
        *_cross_finding(results, estimator),
        *_length_finding(results, estimator),
        *_trajectory_findings(results),
    ]


def _defaults_finding(results: dict, default: dict | None, defaults: ILAConfig) -> list[Finding]:
    if not default:
        return []
    cost = default["cost_steps"]
    met = (
        _worst(default) >= GOAL["jaccard"] and _worst(default, "spearman") >= GOAL["spearman"] and cost <= GOAL["cost"]
    )
    noise = {s: default[s]["jaccard@0.25"] for s in ("init", "order", "stage2") if s in default}
    claim = f"Reruns with the defaults reproduce the top 25% (`{defaults.estimator}`, {defaults.stage1_max_steps} + "
    claim += f"{defaults.stage2_steps} steps, {cost:.2f}x the steps of a {results['epochs']}-epoch LoRA-all fine-tune)"
    evidence = (
        f"top-25% Jaccard {_init_order(default)}, Spearman {default['init']['spearman']:.2f} / "
        f"{default['order']['spearman']:.2f}; the largest noise source is {min(noise, key=noise.get)} "
        f"({', '.join(f'{k} {v:.2f}' for k, v in noise.items())})"
    )
    rule = f"the goal: Jaccard ≥ {GOAL['jaccard']:.2f} and Spearman ≥ {GOAL['spearman']} at ≤ {GOAL['cost']}x"
    return [Finding(claim, f"the goal is {'met' if met else 'not met'}", evidence, rule, id="stability-defaults")]


def _cheapest_finding(results: dict) -> list[Finding]:
    cheap = [r for r in results["rows"] if r["cost_steps"] <= GOAL["cost"] and "top_types" in r]
    if not cheap:
        return []
    best = max(cheap, key=_worst)
    two, layers = sum(sorted(best["top_types"].values())[-2:]), sum(best["top_types"].values())
    evidence = (
        f"Jaccard {_worst(best):.2f} (worse of init and order); {two} of its {layers} layers are of two module types"
    )
    typed = [r for r in cheap if "spearman_within_type" in _side(r, "init")]
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
    certain = ", ".join(f"{row[s]['selected certain']:.0%} of them ({s})" for s in sources)
    uncertain = ", ".join(f"{row[s]['selected uncertain']:.0%}" for s in sources)
    evidence = f"the run is certain of {row['counts']['selected certain']} of its {row['selected']} selected layers; "
    evidence += f"a rerun selects {certain}, and {uncertain} of the uncertain ones"
    verdict = f"calibrated against: {', '.join(honest) or 'none'}; not against: "
    verdict += ", ".join(s for s in sources if s not in honest) or "none"
    rule = f"calibrated against a source when its rerun selects at least {CERTAIN:.0%} of the certain layers"
    claim = f"Is the confidence honest? (`{estimator}`, {row['stage1_steps']} stage-1 steps)"
    return [Finding(claim, verdict, evidence, rule, id="stability-confidence")]


def _known_findings(results: dict, default: dict | None) -> list[Finding]:
    """Which estimators find the planted layers, and the most reproducible cheap setting among those that do."""
    pooled, share = _planted(results), _found_share(results)
    if not pooled:
        return []
    ranked = sorted(pooled.items(), key=lambda item: -share[item[0]])
    counts = ", ".join(f"{name} {found}/{runs} (mean rank {rank:.1f})" for name, (found, runs, rank) in ranked)
    first, right = results["known"][0], [name for name in pooled if share[name] >= RIGHT]
    out = [
        Finding(
            "Reproducible is not the same as right",
            f"right on the planted task: {', '.join(right) or 'none'}; not right: "
            + (", ".join(name for name in pooled if name not in right) or "none"),
            "on the planted task (a tiny model whose important layers are known; stage-1 lengths pooled) the planted "
            f"layers are the top {len(first['ranks'][0])} in: {counts}; a random ranking: mean rank "
            f"{first['random_mean_rank']:.1f}",
            f"right when found in ≥ {RIGHT:.0%} of runs",
            id="stability-planted",
        )
    ]
    rows = [r for r in results["rows"] if share.get(r["estimator"], 0) >= RIGHT and r["cost_steps"] <= GOAL["cost"]]
    if rows:
        best = max(rows, key=_worst)
        if best is default:
            verdict = "the defaults"
        else:
            verdict = f"not the defaults ({_worst(default):.2f})" if default else "the defaults have no row yet"
        evidence = "among the estimators right on the planted task, the most reproducible top 25% within "
        evidence += f"{GOAL['cost']}x is `{best['estimator']}` at {best['stage1_steps']} stage-1 steps "
        evidence += f"(Jaccard {_worst(best):.2f})"
        out.append(Finding("Where the defaults sit", verdict, evidence, id="stability-defaults-place"))
    return out


def _blocks_finding(results: dict, default: dict | None, estimator: str) -> list[Finding]:
    block = default and default.get("blocks")
    if not block:
        return []
    return [
        Finding(
            f"Block granularity (`{estimator}`)",
            f"top-25% Jaccard {_init_order(block)} over {results['blocks']} blocks",
            f"two random sets of blocks: {results['random_blocks']:.2f}; Spearman {block['init']['spearman']:.2f} / "
            f"{block['order']['spearman']:.2f}",
            id="stability-blocks",
        )
    ]


def _length_finding(results: dict, estimator: str) -> list[Finding]:
    """Does a longer stage 1 make the ranking more reproducible? The estimator's rows at every length, and the
    within-type agreement of update norms along the recorded runs."""
    rows = sorted((r for r in results["rows"] if r["estimator"] == estimator), key=lambda r: r["stage1_steps"])
    run = results.get("trajectory")
    if len(rows) < 2 or not run:
        return []
    points = {p["step"]: p for p in run["points"]}
    within = [points[r["stage1_steps"]] for r in rows if r["stage1_steps"] in points]
    steps = "/".join(str(r["stage1_steps"]) for r in rows)
    costs = "/".join(f"{r['cost_steps']:.2f}x" for r in rows)
    evidence = f"cost {costs}; within-type Spearman {_each(_worst(r, 'spearman_within_type') for r in rows)}; "
    evidence += "`update-norm` within-type Spearman between seeds at the same steps "
    evidence += _each(_worst(p, "spearman_within_type") for p in within)
    verdict = f"top-25% Jaccard {_each(_worst(r) for r in rows)} (worse of init and order)"
    claim = f"A longer stage 1 (`{estimator}` at {steps} stage-1 steps)"
    return [Finding(claim, verdict, evidence, id="stability-longer-stage1")]


def _cross_finding(results: dict, estimator: str) -> list[Finding]:
    crosses = [c for c in results["cross"] if c["estimator"] == estimator]
    floor = _floor(results, estimator, crosses[0]["stage1_steps"]) if crosses else None
    if floor is None or len(crosses) < 3:
        return []
    cross = statistics.mean(c["jaccard@0.25"] for c in crosses)
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
            f"where they stop, `update-norm` top-25% Jaccard {_init_order(loss)}",
            id="stability-stop-rule",
        ),
    ]


def _known(results: dict) -> list[str]:
    """Each estimator on the planted task: how often it finds the planted layers, and where they land."""
    rows = results.get("known", [])
    if not rows:
        return []
    first, planted = rows[0], len(rows[0]["ranks"][0])
    prose = (
        "A tiny random Llama, trained on sequences sampled from a teacher that differs from it only in "
        f"{planted} planted layers (`benchmarks/known_answer.py`, the tests' known-answer task), so the layers that "
        f"need to change are known. Each row: {first['runs']} seeds (student, teacher and identification seed). "
        f"*Found*: runs whose top {planted} are exactly the planted layers (a random ranking: "
        f"{first['random_found']:.4f}). *Mean rank* of the planted layers (random: {first['random_mean_rank']:.1f}; "
        f"best: {statistics.mean(range(1, planted + 1)):.1f})."
    )
    spec = [
        ESTIMATOR,
        STAGE1,
        ("found", "r", lambda row: f"{row['found']}/{row['runs']}"),
        ("mean rank", "r", lambda row: f"{row['mean_rank']:.1f}"),
        ("ranks per seed", "l", lambda row: "; ".join(",".join(map(str, r)) for r in row["ranks"])),
    ]
    return _section("A known answer", prose, columns(spec, rows))


def _calibration(results: dict) -> list[str]:
    """How often a rerun keeps the membership of the layers a run was (un)certain of."""
    rows = results.get("calibration", [])
    if not rows:
        return []
    prose = (
        "Every run says how sure it is of each layer's membership in its top 25%: the share of bootstrap resamples of "
        f"its estimator's steps that agree (`layer_confidence`; *certain* at >= {CERTAIN:.0%}; the CLI's line counts "
        f"the certain layers of the selection). A calibrated confidence means that a rerun keeps at least "
        f"{CERTAIN:.0%} of the certain layers on their side of the top 25%. Reference run: seeds 0/0; each rerun "
        "differs from it in one source of noise. Cells: the share of the group's layers that the rerun puts on the "
        "same side (for the selected ones: that it selects too)."
    )
    groups, body = ("selected certain", "selected uncertain", "certain", "uncertain"), []
    for row in rows:
        counts = row["counts"]
        body.append([cell_text(row["estimator"]), str(row["stage1_steps"]), "(layers in the group)"])
        body[-1] += [str(counts[g]) for g in groups]
        for source in ("stage2", "init", "order"):
            body.append(["", "", source, *(number(row[source][g] if counts[g] else None) for g in groups)])
    header = ["estimator", "stage-1 steps", "rerun differs in", "selected, certain", "selected, uncertain"]
    header += ["all certain", "all uncertain"]
    return _section("Is the confidence honest?", prose, table(header, body, "lrlrrrr"))


def _types(results: dict) -> list[str]:
    """What each estimator's top 25% is made of, by module type (the reference run)."""
    rows = _ordered([row for row in results["rows"] if "top_types" in row])
    types = sorted({t for row in rows for t in row["top_types"]})
    spec = [ESTIMATOR, STAGE1, *((t, "r", lambda row, t=t: str(row["top_types"].get(t, 0))) for t in types)]
    prose = (
        "Layers of each module type in the top 25% of the reference run (seeds 0/0). A top set filled by one or two "
        "types agrees between runs whatever the positions do."
    )
    return _section("What the top 25% is made of", prose, columns(spec, rows))


def _blocks(results: dict) -> list[str]:
    """Seed agreement at block granularity (derived exactly from the module scores, see `block_scores`)."""
    prose = (
        f"One score per transformer block ({results['blocks']} blocks; top 25% = {top_count(0.25, results['blocks'])} "
        f'blocks; two random sets overlap {results["random_blocks"]:.2f}), as `granularity="block"` ranks them, '
        "derived from the module scores."
    )
    measures = _agreements("J@25% init", "J@25% order", "J@25% stage2", "Spearman init", "Spearman order", of="blocks")
    rows = _ordered([row for row in results["rows"] if "blocks" in row])
    return _section("Block granularity", prose, columns([ESTIMATOR, STAGE1, *measures], rows))


def _lengths(results: dict) -> list[str]:
    """Update-norm agreement along stage 1, and stop rules on the mask."""
    run = results.get("trajectory")
    if not run:
        return _section("Stage-1 length", "(no stage-1 trajectories among the cells yet)")
    along = [
        ("stage-1 steps", "r", lambda point: str(point["step"])),
        *_agreements("J@25% init", "J@25% order", "Spearman init", "Spearman order"),
        *_agreements("within type init", "within type order"),
    ]
    rules = [
        ("window", "r", lambda r: f"loss test: {r['loss_rule'][1]}" if "loss_rule" in r else str(r["window"])),
        ("J", "r", lambda r: f"ε = {r['loss_rule'][0]}" if "loss_rule" in r else str(r["jaccard"])),
        ("stop steps (init/order 0/0, 1/0, 0/1)", "l", lambda r: ", ".join(str(v) for v in r["stops"].values())),
        *_agreements("J@25% init", "J@25% order", "Spearman init"),
    ]
    return _section(
        "Stage-1 length, and a stop rule on the mask",
        f"Update-norm scores recorded every {run['every']} steps along the longest stage-1 runs (a shorter run is a "
        "prefix of a longer one: constant learning rate, same data order).",
        columns(along, [p for p in run["points"] if p["step"] % 32 == 0 or p["step"] == 16]),
        "A stop rule on the mask ends stage 1 at the first check whose top-25% set overlaps the set `window` steps "
        "before by at least `J`; each run stops on its own, and the runs are compared where they stopped. The last "
        "row is the paper's test on the loss (the mean loss of the last 20 steps within ε of the 20 before), "
        "compared at the first recorded check at or after its stop.",
        columns(rules, run["rules"]),
    )


def _cross(results: dict) -> list[str]:
    """Each estimator's agreement between two datasets, beside its agreement between two seeds on one."""
    spec = [
        ESTIMATOR,
        STAGE1,
        ("datasets", "l", lambda c: f"{c['a']} / {c['b']}"),
        ("J@25%", "r", lambda c: f"{c['jaccard@0.25']:.2f}"),
        ("Spearman", "r", lambda c: f"{c['spearman']:.2f}"),
        ("J@25% between seeds (same data)", "r", lambda c: number(_floor(results, c["estimator"], c["stage1_steps"]))),
    ]
    lines = columns(spec, results["cross"])
    if not results["cross"]:  # one row that says why the table is empty
        lines.append(f"| (no cross-dataset cells in this run: LIMA and Dolly come from ../shared) |{'  |' * 5}")
    return _section("Across datasets, against the seed-to-seed floor", lines)


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
            rows = [r for r in _ordered(results["rows"]) if r["estimator"] == name and cost in r]  # by stage-1 length
            if share.get(name, 0) >= RIGHT:
                style = dict(fillstyle="full", linestyle="-", label=name)
            else:
                style = dict(fillstyle="none", linestyle="--", label=f"{name} (not right on the planted task)")
            ax.plot([r[cost] for r in rows], [_worst(r) for r in rows], marker="o", **style)
        ax.axhline(results["random"]["jaccard@0.25"], color="grey", linestyle=":", label="random sets")
        ax.set_xlabel(label)
    axes[0].set_ylabel("top-25% Jaccard between seeds (worst source)")
    axes[0].set_ylim(0, 1)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
