"""The frontier study's judge and page: every arm's training curves against LoRA-all's and its peers' at matched
held-out loss (the library's `judge.at_matched_loss`, and past their best checkpoints `judge.past_best`), best
held-out loss and instruction score by the 2-SE rule, the findings, the tables and one frontier plot per dataset."""

from __future__ import annotations

import collections.abc
import statistics
from pathlib import Path

from benchmarks.core.cells import Missing
from benchmarks.core.page import Column, Finding, columns, findings_section, missing_section, number
from benchmarks.core.stats import NOISE_RULE, beyond, difference, paired_difference, pooled_sd, show
from peft_ila.app.judge import MATCHED, at_matched_loss, between_checkpoints, curve, past_best

ILA_ARMS = ("ila-75", "ila-50", "ila-ranks", "inside")
PEERS_OF = {  # an ILA arm's peers: the selectors of the same share of layers
    "ila-75": ("random-75", "kappa-75", "spectrum-75"),
    "inside": ("random-75", "kappa-75", "spectrum-75"),
    "ila-50": ("random-50",),
    "ila-ranks": (),  # every layer keeps an adapter: its peer is LoRA-all
}
PEER_ARMS = ("random-75", "random-50", "kappa-75", "spectrum-75")
REFERENCE = "lora-all"
RULE = (  # the 2-SE rule, its standard error from the seeds of the two arms compared
    NOISE_RULE.replace(" (see the noise scale above)", "")
    + ", the standard error from the two arms' pooled seed-to-seed spread of the figure compared"
)
UNDECIDED = "not decided yet: a figure is missing or lacks planned seeds"
RANGES = {"whole": at_matched_loss, "between": between_checkpoints}  # the matched ranges a finding is judged on
CUT = ("ila-50", "random-50", "spectrum-75", "lora-slow")  # what goes first when the plan is too long, in order


def runs_of(results: dict, dataset: str, arm: str) -> list[dict]:
    return [run for run in results["runs"] if (run["dataset"], run["arm"]) == (dataset, arm)]


def complete(results: dict, dataset: str, *arms: str) -> bool:
    """Whether every arm has all its planned seeds on `dataset` (a verdict waits for them: a gap from fewer seeds
    can still move past 2 SE either way)."""
    planned = results["settings"]["seeds" if dataset == results["primary"] else "other_seeds"]
    return all(len(runs_of(results, dataset, arm)) >= len(planned) for arm in arms)


def matched(results: dict, dataset: str, arm: str, other: str, compare=at_matched_loss) -> dict | None:
    """`arm`'s forgetting against `other`'s at matched held-out loss on `dataset` (`judge.at_matched_loss`; or
    `judge.past_best`: where the curves climb back past their best checkpoints, their overfitting)."""
    base = results["base"]["held_out"][dataset]
    a, b = ([curve(r["checkpoints"], base) for r in runs_of(results, dataset, x)] for x in (arm, other))
    return compare(a, b) if a and b else None


def mean_gap(found: dict | None) -> float | None:
    """The mean difference of a matched comparison, with or without a noise estimate."""
    return None if found is None else statistics.mean(found["a"]) - statistics.mean(found["b"])


def best_held_out(run: dict) -> float:
    return min(c["held_out"] for c in run["checkpoints"])


def closing(run: dict, at: str, name: str) -> float | None:
    """A closing measure of a run at the end or at its best checkpoint (`at`): "instructions" (the share obeyed),
    "knowledge" (ARC-Easy's share of right answers) or "general" (the general text's loss)."""
    value = run["closing"][at][name]
    return value["share"] if name == "instructions" else value


def paired(results: dict, dataset: str, arm: str, value) -> tuple[list[float], list[float]]:
    """value(run) for `arm`'s runs on `dataset` and for LoRA-all's (runs without it left out)."""
    a, b = ([v for r in runs_of(results, dataset, x) if (v := value(r)) is not None] for x in (arm, REFERENCE))
    return a, b


def delta(results: dict, dataset: str, arm: str, value) -> tuple[float, float] | None:
    """mean(value(run)) of `arm` - LoRA-all's on `dataset`, ± SE from the two arms' pooled seed spread."""
    a, b = paired(results, dataset, arm, value)
    return difference(a, b, pooled_sd([a, b]))


def followed(run: dict) -> float:
    """The share of instructions a run obeyed at its best checkpoint."""
    return closing(run, "best", "instructions")


def against_base(results: dict, dataset: str, arm: str, at: str) -> tuple[float, float] | None:
    """The share of instructions `arm` obeyed on `dataset` `at` its best checkpoint or the end, less the base
    model's, paired over the prompts (each prompt's share obeyed over the arm's seeds less the base model's
    verdict), ± SE; None before both are scored."""
    base = results["base"].get("instructions", {}).get("obeyed")
    each = [run["closing"][at]["instructions"]["obeyed"] for run in runs_of(results, dataset, arm)] if base else []
    if not each:
        return None
    shares = [statistics.mean(int(verdicts[i]) for verdicts in each) for i in range(len(base))]
    return paired_difference(shares, [int(verdict) for verdict in base])


def delta_text(results: dict, dataset: str, arm: str, value) -> str:
    """`delta` as the page prints it: ± SE, one seed's gap while there is no spread, or "missing"."""
    found = delta(results, dataset, arm, value)
    if found is not None:
        return show(found)
    a, b = paired(results, dataset, arm, value)
    return f"{statistics.mean(a) - statistics.mean(b):+.4f} (one seed)" if a and b else "missing"


def chosen(results: dict, arms: list[str]) -> list[str]:
    """The arms the other datasets run: LoRA-all, the best two ILA arms and the best peer, by their forgetting at
    matched held-out loss against LoRA-all on the primary dataset (`Missing` until every arm has every seed)."""
    primary = results["primary"]
    if not complete(results, primary, *arms):
        raise Missing(f"it waits for every arm on {primary} with every seed")
    gap = {arm: mean_gap(matched(results, primary, arm, REFERENCE)) for arm in arms if arm != REFERENCE}
    ranked = sorted((arm for arm in gap if gap[arm] is not None), key=gap.__getitem__)
    ila = [arm for arm in ranked if arm in ILA_ARMS][:2]
    return [REFERENCE, *ila, *[arm for arm in ranked if arm in PEER_ARMS][:1]]


# --- findings --------------------------------------------------------------------------------------------------------


def in_words(tests: dict[str, list[bool | None]], datasets: list[str]) -> str:
    """A finding's verdict from its rule's `tests` on each dataset judged: "does not hold on" the datasets where
    one fails (one failure decides it, so others may not have run yet), with those where every test holds;
    `UNDECIDED` while one lacks its figures or none was judged, else "holds on" the datasets judged ("every
    dataset" when they are all of `datasets`)."""
    failed = [name for name, here in tests.items() if False in here]
    held = [name for name, here in tests.items() if here and all(here)]
    if failed:
        return f"does not hold on {', '.join(failed)}" + (f" (holds on {', '.join(held)})" if held else "")
    if not tests or any(None in here for here in tests.values()):
        return UNDECIDED
    return f"holds on {'every dataset' if list(tests) == datasets else ', '.join(tests)}"


def lower(sign: int) -> bool:
    """A rule on `judge.beyond`'s sign: the arm's figure is lower by > 2 SE."""
    return sign < 0


def not_higher(sign: int) -> bool:
    """A rule on `judge.beyond`'s sign: the arm's figure is not higher by > 2 SE."""
    return sign <= 0


def decided(
    figure: tuple[float, float] | None,
    rule: collections.abc.Callable[[int], bool],
    results: dict,
    dataset: str,
    *arms: str,
) -> bool | None:
    """Whether `figure` (a difference and its SE) meets `rule`, or None while it is missing or an arm compared lacks
    planned seeds on `dataset`."""
    if figure is None or not complete(results, dataset, *arms):
        return None
    return rule(beyond(figure))


def goal(results: dict, arm: str, compare=at_matched_loss) -> tuple[str, str]:
    """Whether `arm` meets the issue's first goal on every dataset (forgets less than LoRA-all at matched held-out
    loss by > 2 SE, best held-out loss and instruction score at its best checkpoint not worse by > 2 SE), in words
    (`in_words`), and the evidence; `compare`: the matching (`matched`)."""
    parts, tests = [], {}
    for dataset in results["datasets"]:
        found = matched(results, dataset, arm, REFERENCE, compare)
        figures = [found["delta"] if found else None]
        figures += [delta(results, dataset, arm, value) for value in (best_held_out, followed)]
        rules = zip(figures, (lower, not_higher, not_higher), strict=True)
        tests[dataset] = [decided(f, rule, results, dataset, arm, REFERENCE) for f, rule in rules]
        ran = runs_of(results, dataset, arm) and runs_of(results, dataset, REFERENCE)
        forgets = gap_text(found) if ran else "missing"
        best, follows = (delta_text(results, dataset, arm, value) for value in (best_held_out, followed))
        parts.append(f"{dataset}: forgetting {forgets}, best held-out {best}, instructions {follows}")
    return in_words(tests, results["datasets"]), "; ".join(parts)


def ahead_of_peers(results: dict, arm: str, compare=at_matched_loss) -> tuple[str, str]:
    """Whether `arm` forgets less than every peer of its share at matched held-out loss by > 2 SE on every dataset
    where both ran, in words (`in_words`), and the evidence; `compare`: the matching (`matched`)."""
    parts, tests = [], {}
    for dataset in results["datasets"]:
        for peer in PEERS_OF[arm]:
            if not runs_of(results, dataset, peer) or not runs_of(results, dataset, arm):
                continue
            found = matched(results, dataset, arm, peer, compare)
            here = decided(found["delta"] if found else None, lower, results, dataset, arm, peer)
            tests.setdefault(dataset, []).append(here)
            parts.append(f"{dataset} vs {peer}: {gap_text(found)}")
    return in_words(tests, results["datasets"]), "; ".join(parts) or "no peer ran"


def trade_off_past_best(results: dict, arm: str) -> tuple[str, str]:
    """Whether `arm` forgets less than LoRA-all at matched held-out loss past both curves' best checkpoints by
    > 2 SE on every dataset where both ran, in words (`in_words`), and the evidence: is a lower forgetting after 3
    epochs a better trade-off, or the same curve less far along its overfitting?"""
    parts, tests = [], {}
    for dataset in results["datasets"]:
        if not runs_of(results, dataset, arm) or not runs_of(results, dataset, REFERENCE):
            continue
        found = matched(results, dataset, arm, REFERENCE, past_best)
        tests[dataset] = [decided(found["delta"] if found else None, lower, results, dataset, arm, REFERENCE)]
        parts.append(f"{dataset}: {gap_text(found)}")
    return in_words(tests, results["datasets"]), "; ".join(parts) or "not run beside LoRA-all"


def fewer_instructions(results: dict) -> Finding:
    """Whether LoRA-all's fine-tune obeys fewer instructions than the base model at its best checkpoint by > 2 SE
    (`against_base`), on each dataset it ran; the evidence gives every arm's, at the best checkpoint and the end."""
    parts, tests = [], {}
    for dataset in results["datasets"]:
        if not runs_of(results, dataset, REFERENCE):
            continue
        found = against_base(results, dataset, REFERENCE, "best")
        tests[dataset] = [decided(found, lower, results, dataset, REFERENCE)]
        arms = dict.fromkeys(run["arm"] for run in results["runs"] if run["dataset"] == dataset)  # as they ran
        shown = [f"{arm} {show(against_base(results, dataset, arm, 'best'))}" for arm in arms]
        end = show(against_base(results, dataset, REFERENCE, "end"))
        parts.append(f"{dataset}: {', '.join(shown)} (LoRA-all at the end: {end})")
    claim = "LoRA-all's fine-tune obeys fewer of the verifiable instructions than the base model (best checkpoint)"
    rule = "paired over the prompts: each prompt's share obeyed over the arm's seeds less the base model's verdict"
    rule += ", below −2 SE, the standard error from the spread over the prompts"
    evidence = "; ".join(parts) or "LoRA-all has not run"
    return Finding(claim, in_words(tests, results["datasets"]), evidence, rule, id="frontier-instructions")


def ila_arms_run(results: dict) -> list[str]:
    """The ILA arms with at least one run, in the plan's order."""
    return [arm for arm in ILA_ARMS if any(run["arm"] == arm for run in results["runs"])]


def judged_on_ranges(results: dict) -> dict[str, dict[str, tuple[str, str]]]:
    """The findings that match curves over a range, by `Finding.id`: their (verdict, evidence) over each of `RANGES`."""
    judged = {}
    for arm in ila_arms_run(results):
        judged[f"frontier-{arm}"] = {name: goal(results, arm, compare) for name, compare in RANGES.items()}
        if PEERS_OF[arm]:
            judged[f"frontier-peers-{arm}"] = {
                name: ahead_of_peers(results, arm, compare) for name, compare in RANGES.items()
            }
    return judged


def findings(results: dict, judged: dict | None = None) -> list[Finding]:
    """The page's findings; `judged`: `judged_on_ranges(results)` where the caller has it."""
    judged = judged_on_ranges(results) if judged is None else judged
    out = []
    for arm in ila_arms_run(results):
        claim = f"{results['labels'][arm]} forgets less than LoRA-all at matched held-out loss, learns as well"
        rule = "forgetting below −2 SE, best held-out loss and instruction score (best checkpoint) not above +2 SE"
        out.append(_on_both_ranges(claim, judged[f"frontier-{arm}"], f"{rule}; {RULE}", f"frontier-{arm}"))
        if PEERS_OF[arm]:
            claim = f"{results['labels'][arm]} forgets less than every peer selector of the same share"
            out.append(_on_both_ranges(claim, judged[f"frontier-peers-{arm}"], RULE, f"frontier-peers-{arm}"))
        verdict, evidence = trade_off_past_best(results, arm)
        claim = (
            f"Past its best checkpoint, {results['labels'][arm]} forgets less than LoRA-all at matched held-out loss"
        )
        rule = f"forgetting where both curves climb back to the same held-out loss below −2 SE; {RULE}"
        out.append(Finding(claim, verdict, evidence, rule, id=f"frontier-past-best-{arm}"))
    return [*out, fewer_instructions(results)] if out else out


def _on_both_ranges(claim: str, judged: dict[str, tuple[str, str]], rule: str, id: str) -> Finding:
    """A finding judged on each of `RANGES`: the whole range's verdict, its evidence ending with the same rule's
    verdict and evidence between the checkpoints only (`judge.between_checkpoints`: without the stretch from the
    base model to the first checkpoint, which no checkpoint measured) where that evidence differs."""
    (verdict, evidence), (between, between_evidence) = judged["whole"], judged["between"]
    if between_evidence != evidence:
        evidence += f". Between the checkpoints only, the same rule: {between}; {between_evidence}"
    return Finding(claim, verdict, evidence, rule, id=id)


def ranges_line(judged: dict[str, dict[str, tuple[str, str]]], found: list[Finding]) -> str:
    """Whether a verdict of the page's `found` changes when curves are matched between the checkpoints only instead
    of over the whole range (from the base model); `judged`: `judged_on_ranges`."""
    verdicts = {i: (ranges["whole"][0], ranges["between"][0]) for i, ranges in judged.items()}
    differ = [(n, f.id) for n, f in enumerate(found, 1) if f.id in verdicts and len(set(verdicts[f.id])) > 1]
    head = "The whole range against between the checkpoints only:"
    if not differ:
        return f"{head} no verdict differs (of the {len(verdicts)} findings matched over both).\n"
    shown = "; ".join(
        f"finding {n}: {verdicts[i][0]} over the whole range, {verdicts[i][1]} between" for n, i in differ
    )
    return f"{head} {len(differ)} of the {len(verdicts)} findings matched over both differ ({shown}).\n"


def closeness_lines(results: dict) -> list[str]:
    """How close each ILA arm came to forgetting less at matched held-out loss over the whole range: its gap to
    LoRA-all and to each peer that ran beside it, in standard errors (the findings need below −2), by dataset."""
    lines = []
    for arm in ila_arms_run(results):
        gaps = []
        for dataset in results["datasets"]:
            here = [
                f"{delta[0] / delta[1]:+.1f} against {results['labels'][other]}"
                for other in (REFERENCE, *PEERS_OF[arm])
                if (found := matched(results, dataset, arm, other)) and (delta := found["delta"]) and delta[1] > 0
            ]
            gaps += [f"{dataset}: {', '.join(here)}"] if here else []
        lines += [f"- {results['labels'][arm]}. {'; '.join(gaps)}"] if gaps else []
    head = "How close each ILA arm came to forgetting less: its gap at matched held-out loss, in standard errors"
    return [f"{head} (a finding needs below −2):", "", *lines, ""] if lines else []


# --- the plan's cost ----------------------------------------------------------------------------------------------


def cut(estimate: dict, budget_hours: float) -> dict:
    """The arms cut, in `CUT`'s order, until the plan's estimated hours are within `budget_hours` (the other
    datasets' runs never cut: they are LoRA-all, the best ILA arms and the best peer): {"cut", "hours", "before"}."""

    def hours(dropped: list[str]) -> float:
        runs = [run for run in estimate["runs"] if run["arm"] not in dropped]
        each = (estimate["step_seconds"], estimate["point_seconds"], 2 * estimate["closing_seconds"])
        return sum(r["steps"] * each[0] + r["points"] * each[1] + each[2] for r in runs) / 3600

    dropped: list[str] = []
    for arm in CUT:
        if hours(dropped) <= budget_hours:
            break
        dropped.append(arm)
    return {"cut": dropped, "hours": hours(dropped), "before": hours([]), "budget": budget_hours}


# --- the page --------------------------------------------------------------------------------------------------------


def estimate_text(estimate: dict, decided: dict) -> str:
    """The dry run's plan and cost, and what it cuts."""
    runs = estimate["runs"]
    steps, points = sum(r["steps"] for r in runs), sum(r["points"] for r in runs)
    dropped = ", ".join(decided["cut"]) or "nothing"
    return (
        f"plan: {len(runs)} runs, {steps:,} training steps at {estimate['step_seconds']:.2f} s, {points} checkpoint "
        f"evaluations at {estimate['point_seconds']:.1f} s and {2 * len(runs)} closing evaluations (instructions, "
        f"ARC-Easy, general text) at {estimate['closing_seconds']:.0f} s: about {decided['before']:.1f} h; cut to "
        f"keep within the budget of {decided['budget']:g} h: {dropped} ({decided['hours']:.1f} h left"
        + (
            "; still above the budget: every arm the issue allows to cut is cut, the rest runs over more sessions)"
            if decided["hours"] > decided["budget"]
            else ")"
        )
    )


def arm_rows(results: dict, dataset: str) -> list[dict]:
    """One row per arm that ran on `dataset`."""
    rows = []
    for arm in results["arms"]:
        runs = runs_of(results, dataset, arm)
        if not runs:
            continue
        compared = dict.fromkeys(MATCHED)  # LoRA-all: its own reference
        if arm != REFERENCE:
            compared = {key: matched(results, dataset, arm, REFERENCE, how) for key, how in MATCHED.items()}
        ends = [r["checkpoints"][-1] for r in runs]
        rows.append({
            "arm": arm,
            "label": results["labels"][arm],
            "seeds": len(runs),
            "best": statistics.mean(best_held_out(r) for r in runs),
            "best_delta": delta_text(results, dataset, arm, best_held_out) if arm != REFERENCE else "–",
            **compared,
            "forgetting_end": statistics.mean(e["forgetting"] for e in ends if e["forgetting"] is not None),
            **{f"{name}_{at}": _mean(closing(r, at, name) for r in runs) for name in CLOSING for at in ("best", "end")},
            "params": runs[0]["trainable_params"],
        })  # fmt: skip
    return rows


def _mean(values) -> float | None:
    found = [v for v in values if v is not None]
    return statistics.mean(found) if found else None


def gap_text(found: dict | None) -> str:
    """A matched comparison of two arms that ran, as the page prints it: the difference ± SE, one seed's gap, or
    why there is none."""
    if found is None:
        return "no common range"
    return show(found["delta"]) if found["delta"] else f"{mean_gap(found):+.4f} (one seed)"


def _matched_text(row: dict, key: str = "matched") -> str:
    """A row's forgetting against LoRA-all's at matched held-out loss (`key`: one of `judge.MATCHED`: on the way
    down, between the checkpoints only, or past the best), and the range of held-out loss it was matched over."""
    found = row[key]
    if found is None:
        return "–" if row["arm"] == REFERENCE else gap_text(found)
    low, high = found["range"]
    return f"{gap_text(found)} over {low:.3f}–{high:.3f}"


CLOSING = ("instructions", "knowledge", "general")


def _both(name: str, header: str, spec: str) -> Column:
    """A column of a closing measure at the best checkpoint and at the end."""
    return header, "r", lambda row: f"{number(row[f'{name}_best'], spec)} / {number(row[f'{name}_end'], spec)}"


TABLE: list[Column] = [
    ("arm", "l", lambda r: r["label"]),
    ("seeds", "r", lambda r: str(r["seeds"])),
    ("best held-out", "r", lambda r: number(r["best"], ".4f")),
    ("Δ best vs LoRA-all", "r", lambda r: r["best_delta"]),
    ("Δ forgetting at matched held-out loss", "l", _matched_text),
    ("Δ forgetting, between checkpoints only", "l", lambda r: _matched_text(r, "between_checkpoints")),
    ("Δ forgetting past the best, matched", "l", lambda r: _matched_text(r, "past_best")),
    ("forgetting at end", "r", lambda r: number(r["forgetting_end"], "+.4f")),
    _both("knowledge", "ARC-Easy: best / end", ".3f"),
    _both("general", "general-text loss: best / end", ".4f"),
    _both("instructions", "instructions: best / end", ".3f"),
    ("trainable", "r", lambda r: f"{r['params']:,}"),
]


def page(results: dict, prefix: str = "") -> str:
    """The page; `prefix`: where its plots are, from the page's folder."""
    p, base = results["settings"], results["base"]
    lines = ["# The learning–forgetting frontier", "", *_question(), ""]
    lines += _how(results), ""
    lines += [_base_line(base, p), ""]
    lines += [line for line in (_others_line(results), _under_way_line(results), _pace_line(results)) if line]
    judged = judged_on_ranges(results)
    found = findings(results, judged)
    if found:
        lines += [*findings_section(found), ranges_line(judged, found)]
        lines += closeness_lines(results)
    else:
        lines += ["## Findings", "", "No ILA arm has run yet.", ""]
    for dataset in results["datasets"]:
        rows = arm_rows(results, dataset)
        if not rows:
            continue
        lines += [f"## {dataset}", "", *columns(TABLE, rows), "", f"![frontier]({prefix}{_plot_name(dataset)})", ""]
    return "\n".join([*lines, *missing_section(results["missing"], "make bench-frontier")]) + "\n"


def _base_line(base: dict, p: dict) -> str:
    """The base model's figures: held-out losses, ARC-Easy, general text, instructions."""
    if not base:
        return "The base model's figures are not computed yet."
    losses = ", ".join(f"{name} {loss:.4f}" for name, loss in base["held_out"].items())
    text = f"The base model: held-out loss {losses}; ARC-Easy {base['knowledge']:.3f}; general text "
    text += f"{base['general']:.4f}"
    if "instructions" in base:
        follows = base["instructions"]
        text += f"; it obeys {follows['share']:.3f} ± {follows['se']:.3f} of the {p['prompts']} instructions"
    return text + "."


def _others_line(results: dict) -> str:
    """Which arms run on the other datasets, and which arms could not be ranked for it."""
    others, primary = results.get("others"), results["primary"]
    if others is None:
        return ""
    labels = "; ".join(results["labels"][arm] for arm in others)
    text = f"On {', '.join(results['datasets'][1:])}: {labels}. Chosen by forgetting at matched held-out loss on "
    text += f"{primary}."
    arms = [arm for arm in results["arms"] if arm != REFERENCE]
    unranked = [arm for arm in arms if mean_gap(matched(results, primary, arm, REFERENCE)) is None]
    if unranked:
        text += (
            f" Not ranked: {'; '.join(results['labels'][arm] for arm in unranked)}. Their curves on {primary} share "
            "no range of held-out loss with LoRA-all's, so there is no forgetting at matched loss to rank them by."
        )
    return text + "\n"


def _under_way_line(results: dict) -> str:
    """The runs started and not finished, and how far each went (its state file is kept for the next run)."""
    runs = results.get("under_way") or []
    if not runs:
        return ""
    shown = "; ".join(f"{r['dataset']}, {r['arm']}, seed {r['seed']}: step {r['step']} of {r['of']}" for r in runs)
    where = "in a state file beside the cells, which git ignores: `make bench-frontier` goes on from it in that tree"
    return f"Started, not finished when the page was written (running, or stopped; the progress is {where}): {shown}.\n"


def _pace_line(results: dict) -> str:
    """Runs done of those planned, and the hours the rest need one after another at the pace of the runs timed whole
    (training and evaluation) on this machine: their median training and evaluation times (a run's wall clock counts
    the pauses of a shared machine, and the records do not say which runs shared it)."""
    p, datasets = results["settings"], results["datasets"]
    others = len(results["others"]) if results.get("others") is not None else 4
    planned = len(results["arms"]) * len(p["seeds"]) + (len(datasets) - 1) * others * len(p["other_seeds"])
    done, timed = len(results["runs"]), [r for r in results["runs"] if "evaluation_seconds" in r]
    text = f"Runs done: {done} of the {planned} planned"
    if timed:
        train, evaluate = (statistics.median(r[key] for r in timed) / 60 for key in ("seconds", "evaluation_seconds"))
        text += f"; a run took {train + evaluate:.1f} min ({train:.1f} training, {evaluate:.1f} evaluating; median of "
        text += f"{len(timed)}, wall clock)"
        if planned > done:
            hours = (planned - done) * (train + evaluate) / 60
            text += f", so the {planned - done} left need about {hours:.1f} h of runs here (one after another; fewer "
            text += "on the clock where runs share the machine side by side, each slower)"
    return text + ".\n"


def _question() -> list[str]:
    return [
        "Along the whole training curve, does a way of choosing layers with ILA reach a better (held-out loss, "
        "forgetting) frontier than LoRA on all layers, and than the selectors a PEFT user already has for the same "
        "share of layers? Forgetting is the other datasets' mean held-out loss rise over the base model's; it is "
        "compared at matched held-out loss: each seed's curve interpolated at held-out losses every curve of both arms "
        "reaches on its way down, and averaged over them. A curve that overfits reaches a held-out loss twice: past "
        "the best checkpoints, curves are compared again where each first climbs back to the same held-out loss, "
        "which tells a better trade-off after 3 epochs from the same curve overfitting less. From the base model to "
        "its first checkpoint a curve is a straight line that no checkpoint measured, and that stretch can be most of "
        "the range matched on the way down: the tables also compare the curves between their checkpoints only, over "
        "the held-out losses every curve reaches from its first checkpoint on, to show whether a gap rests on it."
    ]


def _how(results: dict) -> str:
    p, estimate = results["settings"], results.get("estimate")
    text = (
        f"Each run: {p['epochs']} epochs at learning rate {p['lr']:g} (rank {p['r']}, alpha {p['lora_alpha']}), "
        f"{p['evals']} checkpoints, {p['grid']['eval_size']} held-out examples per dataset, "
        f"{p['grid']['questions']} ARC-Easy questions, {p['prompts']} instruction prompts (greedy, at most "
        f"{p['max_new_tokens']} new tokens), {p['general']} general-text paragraphs. Checkpoints measure held-out "
        "loss and the other datasets' (forgetting); ARC-Easy, the general text and the instructions are measured at "
        f"the end and at the checkpoint of lowest held-out loss. Seeds: {len(p['seeds'])} on the primary dataset, "
        f"{len(p['other_seeds'])} on the others."
    )
    if estimate is None:
        return text + " No estimate yet: run the dry run first."
    return (
        text
        + f" Dry run (`python -m benchmarks.frontier --preset {results['preset']} --dry-run`): "
        + estimate_text(estimate, cut(estimate, p["budget_hours"]))
        + "."
    )


def _plot_name(dataset: str) -> str:
    return f"frontier-{dataset}.png"


def plots(folder: Path, results: dict) -> None:
    """One frontier plot per dataset: every run's checkpoints, held-out loss against forgetting."""
    from peft_ila.app.plots import versus_plot

    for dataset in results["datasets"]:
        runs = [{**run, "mode": run["arm"]} for run in results["runs"] if run["dataset"] == dataset]
        if runs:
            base = {"held_out": results["base"]["held_out"][dataset]}
            arms = [arm for arm in results["arms"] if any(run["arm"] == arm for run in runs)]
            versus_plot(folder / _plot_name(dataset), runs, base, arms)
