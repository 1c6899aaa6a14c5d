"""The learning–forgetting frontier: curves compared at matched held-out loss, the executor's checkpoints and
instruction scores, the peer and rank recipes, and the study's smoke run on the tiny model."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_benchmarks import knowledge_file
from test_cli import stop_at_step

import peft_ila.app.pipeline
from conftest import alpaca_rows, tiny_lm_dir
from peft_ila.app.executor import Best, Evaluation, Schedule, run_recipe
from peft_ila.app.instructions import InstructionProbe
from peft_ila.app.judge import LEVELS, along, at_matched_loss, between_checkpoints, matched_range, past_best, rising
from peft_ila.app.pipeline import prepare
from peft_ila.app.recipe import Recipe
from peft_ila.identification.checkpoint import checkpoint_record
from peft_ila.tuner.config import ILAConfig
from peft_ila.tuner.ranks import linear_costs
from peft_ila.tuner.selection import Selection

# --- the judge ---------------------------------------------------------------------------------------------------


def test_a_curve_is_read_where_its_held_out_loss_first_reaches_a_level():
    curve = [(2.0, 0.0), (1.6, 0.2), (1.4, 0.6), (1.5, 0.9), (1.2, 1.0)]
    assert along(curve, 2.0) == 0.0
    assert along(curve, 1.8) == pytest.approx(0.1)  # halfway between the first two checkpoints
    assert along(curve, 1.5) == pytest.approx(0.4)  # reached on the way down, before the rise at step 3
    assert along(curve, 1.3) == pytest.approx(0.9 + 0.1 * (1.5 - 1.3) / 0.3)  # below the dip: on the way down again
    assert along(curve, 1.1) is None


def test_curves_are_compared_over_the_held_out_losses_every_one_reaches():
    slow = [[(2.0, 0.0), (1.5, 0.25), (1.0, 0.5)], [(2.0, 0.0), (1.5, 0.35), (1.0, 0.7)]]  # forgetting rises fast
    kind = [[(2.0, 0.0), (1.2, 0.2)], [(2.0, 0.0), (1.4, 0.1)]]  # reaches 1.2 and 1.4 only
    assert matched_range([*slow, *kind]) == (1.4, 2.0)
    found = at_matched_loss(kind, slow)
    assert found["range"] == (1.4, 2.0)
    levels = [1.4 + 0.6 * i / (LEVELS - 1) for i in range(LEVELS)]
    expected = sum(along(slow[0], level) for level in levels) / LEVELS
    assert found["b"][0] == pytest.approx(expected) and found["b"][0] == pytest.approx(0.5 * 0.3)  # linear: mid-range
    value, error = found["delta"]
    assert value < 0 and error > 0  # the kind arm forgets less at the same held-out loss
    assert at_matched_loss(kind[:1], slow[:1])["delta"] is None  # one seed each: no noise estimate
    assert at_matched_loss([[(2.0, 0.0), (1.9, 0.1)]], [[(1.5, 0.0), (1.0, 0.1)]]) is None  # no common range


def test_a_gap_that_rests_on_the_line_from_the_base_model_goes_between_the_checkpoints():
    early = [[(2.0, 0.0), (1.6, -0.4), (1.2, 0.0)], [(2.0, 0.0), (1.6, -0.5), (1.2, 0.1)]]  # y = 1.2 - h from 1.6
    late = [[(2.0, 0.0), (1.5, -0.3), (1.2, 0.0)], [(2.0, 0.0), (1.5, -0.3), (1.2, 0.0)]]  # the same line from 1.5
    whole = at_matched_loss(early, late)
    assert whole["range"] == (1.2, 2.0) and whole["delta"][0] < 0  # early's deeper dip, on the straight lines
    found = between_checkpoints(early, late)
    assert found["range"] == (1.2, 1.5)  # from the lower of the first checkpoints down
    assert found["b"] == pytest.approx([-0.15, -0.15]) and found["a"][0] == pytest.approx(-0.15)  # one line
    assert found["delta"][0] == pytest.approx(0.0125)  # seed 1: y = 1.9 - 1.5 h from 1.6, -0.125 on average
    assert between_checkpoints([[(2.0, 0.0), (1.9, 0.1)]], late) is None  # no checkpoint below 1.5: no common range


def test_curves_past_their_best_are_read_where_their_held_out_loss_first_climbs_back():
    overfits = [(2.0, 0.0), (1.0, -0.1), (1.5, 0.2), (2.0, 0.5)]  # y = -0.1 + 0.6 (h - 1.0) on its climb
    late = [(2.0, 0.0), (1.2, -0.1), (1.4, 0.1)]  # y = h - 1.3 on its climb
    found = past_best([overfits], [late])
    assert found["range"] == pytest.approx((1.2, 1.4))  # from the higher best to the lower top after it
    assert found["a"][0] == pytest.approx(0.08) and found["b"][0] == pytest.approx(0.0, abs=1e-12)  # mid-range
    assert found["delta"] is None  # one seed each
    wavers = [(2.0, 0.0), (1.0, 0.0), (1.6, 0.6), (1.3, 0.3), (1.8, 0.8)]
    assert along(rising(wavers), -1.4) == pytest.approx(0.4)  # the first climb to 1.4, not the second
    assert along(wavers, 1.4) == pytest.approx(0.0)  # on the way down, as `at_matched_loss` reads it
    assert past_best([[(2.0, 0.0), (1.1, 0.1)]], [late]) is None  # still falling at its end: nothing past its best


def test_the_page_names_the_arms_the_other_datasets_run_and_those_it_could_not_rank():
    from benchmarks.frontier_report import _others_line

    def run(arm: str, losses: list[float]) -> dict:
        points = [{"held_out": loss, "forgetting": 2.0 - loss} for loss in losses]
        return {"dataset": "alpaca", "arm": arm, "checkpoints": points}

    runs = [run("lora-all", [1.8, 1.5]), run("ila-75", [1.7, 1.6]), run("kappa-75", [2.1, 2.2])]  # kappa: no fall
    labels = {"lora-all": "LoRA-all", "ila-75": "ILA 75%, fresh", "kappa-75": "KappaTune 75%"}
    results = {"primary": "alpaca", "datasets": ["alpaca", "lima", "dolly"], "base": {"held_out": {"alpaca": 2.0}}}
    results.update(runs=runs, labels=labels, arms=list(labels), others=["lora-all", "ila-75"])
    line = _others_line(results)
    assert line.startswith("On lima, dolly: LoRA-all; ILA 75%, fresh. Chosen by forgetting at matched held-out loss")
    assert "Not ranked: KappaTune 75%. Their curves on alpaca share no range of held-out loss" in line
    assert _others_line({**results, "others": None}) == ""  # not chosen yet: the missing list says why


def test_the_pace_line_counts_the_runs_left_at_the_median_run_one_after_another():
    from benchmarks.frontier_report import _pace_line

    timed = [{"seconds": s * 60, "evaluation_seconds": 30 * 60} for s in (40, 50, 90)]  # median: 50 + 30 min
    results = {"settings": {"seeds": [0, 1, 2], "other_seeds": [0, 1]}, "datasets": ["alpaca", "lima", "dolly"]}
    results.update(arms=["lora-all", "ila-75"], others=["lora-all", "ila-75"], runs=[*timed, {"seconds": 1.0}])
    line = _pace_line(results)  # planned: 2 arms x 3 seeds + 2 datasets x 2 arms x 2 seeds = 14; 4 done, 10 left
    assert line.startswith("Runs done: 4 of the 14 planned; a run took 80.0 min (50.0 training, 30.0 evaluating; ")
    assert "median of 3, wall clock), so the 10 left need about 13.3 h of runs here (one after another;" in line


def test_a_finding_holds_fails_or_waits_for_its_figures():
    from benchmarks.frontier_report import UNDECIDED, findings

    def run(arm: str, seed: int, slope: float) -> dict:
        points = [{"held_out": loss, "forgetting": slope * (2.0 - loss)} for loss in (1.8, 1.5)]
        closing = {"best": {"instructions": {"share": 0.3}, "step": 2}, "end": {"instructions": {"share": 0.3}}}
        return {"dataset": "alpaca", "arm": arm, "seed": seed, "checkpoints": points, "closing": closing}

    def judged(slopes: dict[str, list[float]]):
        runs = [run(arm, seed, slope) for arm, seeds in slopes.items() for seed, slope in enumerate(seeds)]
        results = {"datasets": ["alpaca"], "base": {"held_out": {"alpaca": 2.0}}, "runs": runs}
        results |= {"primary": "alpaca", "settings": {"seeds": [0, 1], "other_seeds": [0]}}
        results["labels"] = {"lora-all": "LoRA-all", "ila-75": "ILA 75%"}
        return next(f for f in findings(results) if f.id == "frontier-ila-75")

    def verdict(slopes: dict[str, list[float]]) -> str:
        return judged(slopes).verdict

    assert verdict({"lora-all": [1.0, 1.1], "ila-75": [0.3, 0.35]}) == "holds on every dataset"
    assert verdict({"lora-all": [0.3, 0.35], "ila-75": [1.0, 1.1]}) == "does not hold on alpaca"
    one_seed = judged({"lora-all": [1.0], "ila-75": [0.3]})
    assert one_seed.verdict == UNDECIDED  # one seed each: no noise estimate, but the gaps are shown
    # forgetting: 0.25 (0.3 - 1.0), its mean over 1.5-2.0
    gaps = "forgetting -0.1750 (one seed), best held-out +0.0000 (one seed), instructions +0.0000 (one seed)"
    assert one_seed.evidence.startswith(f"alpaca: {gaps}. Between the checkpoints only, the same rule: not decided")
    early = judged({"lora-all": [0.3, 0.35], "ila-75": [1.0]})  # a noise estimate, but a planned seed to come
    assert early.verdict == UNDECIDED and "±" in early.evidence


def test_a_finding_gives_its_verdict_between_the_checkpoints_only_beside_the_whole_range():
    from benchmarks.frontier_report import findings, judged_on_ranges, ranges_line

    def run(arm: str, seed: int, first: float, last: float) -> dict:  # forgetting at held-out 1.8, then at 1.5
        points = [{"held_out": 1.8, "forgetting": first + 0.01 * seed}, {"held_out": 1.5, "forgetting": last}]
        closing = {"best": {"instructions": {"share": 0.3}, "step": 2}, "end": {"instructions": {"share": 0.3}}}
        return {"dataset": "alpaca", "arm": arm, "seed": seed, "checkpoints": points, "closing": closing}

    # ILA forgets nothing by its first checkpoint, LoRA-all 0.3; from there to the end ILA forgets more (0 -> 0.95
    # against 0.3 -> 0.6): lower over the whole range from the base model, higher between the checkpoints
    runs = [run("lora-all", seed, 0.3, 0.6) for seed in (0, 1)] + [run("ila-75", seed, 0.0, 0.95) for seed in (0, 1)]
    results = {"datasets": ["alpaca"], "base": {"held_out": {"alpaca": 2.0}}, "runs": runs, "primary": "alpaca"}
    results |= {"settings": {"seeds": [0, 1], "other_seeds": [0]}, "labels": {"lora-all": "LoRA", "ila-75": "ILA"}}
    found = next(f for f in findings(results) if f.id == "frontier-ila-75")
    assert found.verdict == "holds on every dataset"
    whole, between = found.evidence.split(". Between the checkpoints only, the same rule: ")
    assert whole.startswith("alpaca: forgetting -0.0") and between.startswith("does not hold on alpaca; ")
    assert "alpaca: forgetting +0.0" in between
    head = "The whole range against between the checkpoints only: "
    shown = "finding 1: holds on every dataset over the whole range, does not hold on alpaca between"
    judged = judged_on_ranges(results)
    assert (
        ranges_line(judged, findings(results, judged))
        == f"{head}1 of the 2 findings matched over both differ ({shown}).\n"
    )
    results["runs"] = [run(arm, seed, 0.3, 0.6) for arm in ("lora-all", "ila-75") for seed in (0, 1)]  # alike
    judged = judged_on_ranges(results)
    assert (
        ranges_line(judged, findings(results, judged))
        == f"{head}no verdict differs (of the 2 findings matched over both).\n"
    )


def test_the_goal_names_the_datasets_where_it_fails_while_others_wait_for_their_runs():
    from benchmarks.frontier_report import findings

    def run(dataset: str, arm: str, seed: int, slope: float) -> dict:
        points = [{"held_out": loss, "forgetting": slope * (2.0 - loss)} for loss in (1.8, 1.5)]
        closing = {"best": {"instructions": {"share": 0.3}, "step": 2}, "end": {"instructions": {"share": 0.3}}}
        return {"dataset": dataset, "arm": arm, "seed": seed, "checkpoints": points, "closing": closing}

    def verdict(slopes: dict[tuple[str, str], list[float]]) -> str:
        runs = [run(*key, seed, slope) for key, seeds in slopes.items() for seed, slope in enumerate(seeds)]
        results = {"datasets": ["alpaca", "lima", "dolly"], "runs": runs, "primary": "alpaca"}
        results |= {"base": {"held_out": {"alpaca": 2.0, "lima": 2.0, "dolly": 2.0}}}
        results |= {"settings": {"seeds": [0, 1], "other_seeds": [0, 1]}, "labels": {"lora-all": "L", "ila-75": "I"}}
        return next(f for f in findings(results) if f.id == "frontier-ila-75").verdict

    lower, higher = [0.3, 0.35], [1.0, 1.1]  # ILA's forgetting slopes against LoRA-all's [1.0, 1.1] and [0.3, 0.35]
    alpaca = {("alpaca", "lora-all"): [1.0, 1.1], ("alpaca", "ila-75"): lower}
    lima_fails = {("lima", "lora-all"): [0.3, 0.35], ("lima", "ila-75"): higher}
    assert verdict(alpaca | lima_fails) == "does not hold on lima (holds on alpaca)"  # dolly has not run: decided
    dolly_fails = {("dolly", "lora-all"): [0.3, 0.35], ("dolly", "ila-75"): higher}
    assert verdict(alpaca | lima_fails | dolly_fails) == "does not hold on lima, dolly (holds on alpaca)"
    dolly_holds = {("dolly", "lora-all"): [1.0, 1.1], ("dolly", "ila-75"): lower}
    lima_holds = {("lima", "lora-all"): [1.0, 1.1], ("lima", "ila-75"): lower}
    assert verdict(alpaca | lima_holds | dolly_holds) == "holds on every dataset"


def test_ila_against_its_peers_names_the_datasets_judged_and_those_where_it_fails():
    from benchmarks.frontier_report import UNDECIDED, findings

    def run(dataset: str, arm: str, seed: int, slope: float) -> dict:
        points = [{"held_out": loss, "forgetting": slope * (2.0 - loss)} for loss in (1.8, 1.5)]
        closing = {"best": {"instructions": {"share": 0.3}, "step": 2}, "end": {"instructions": {"share": 0.3}}}
        return {"dataset": dataset, "arm": arm, "seed": seed, "checkpoints": points, "closing": closing}

    def peers(slopes: dict[tuple[str, str], list[float]]):
        runs = [run(*key, seed, slope) for key, seeds in slopes.items() for seed, slope in enumerate(seeds)]
        results = {"datasets": ["alpaca", "lima", "dolly"], "runs": runs, "primary": "alpaca"}
        results |= {"base": {"held_out": {"alpaca": 2.0, "lima": 2.0, "dolly": 2.0}}}
        results |= {"settings": {"seeds": [0, 1], "other_seeds": [0, 1]}, "labels": {"ila-75": "I"}}
        return next(f for f in findings(results) if f.id == "frontier-peers-ila-75")

    lower, higher = [0.3, 0.35], [1.0, 1.1]  # ILA's forgetting slopes against the peers'
    alpaca = {("alpaca", "ila-75"): lower, ("alpaca", "random-75"): higher, ("alpaca", "kappa-75"): higher}
    assert peers(alpaca).verdict == "holds on alpaca"  # lima and dolly: no peer ran there, not judged
    lima = {("lima", "ila-75"): higher, ("lima", "kappa-75"): lower}
    found = peers(alpaca | lima)
    assert found.verdict == "does not hold on lima (holds on alpaca)" and "lima vs random-75" not in found.evidence
    dolly = {("dolly", "ila-75"): lower, ("dolly", "kappa-75"): higher[:1]}  # a planned seed to come
    assert peers(alpaca | dolly).verdict == UNDECIDED
    assert peers({("alpaca", "ila-75"): lower}).evidence == "no peer ran"


def test_the_page_says_how_close_each_ila_arm_came_in_standard_errors():
    from benchmarks.frontier_report import closeness_lines

    def run(arm: str, seed: int, slope: float) -> dict:  # forgetting slope * (2 - held-out): its mean slope / 4
        points = [{"held_out": loss, "forgetting": slope * (2.0 - loss)} for loss in (1.8, 1.5)]
        return {"dataset": "alpaca", "arm": arm, "seed": seed, "checkpoints": points}

    slopes = {"lora-all": [1.0, 1.1], "ila-75": [0.3, 0.35], "random-75": [0.5, 0.6], "ila-ranks": [0.3]}
    runs = [run(arm, seed, slope) for arm, seeds in slopes.items() for seed, slope in enumerate(seeds)]
    results = {"datasets": ["alpaca", "lima"], "base": {"held_out": {"alpaca": 2.0, "lima": 3.0}}, "runs": runs}
    results["labels"] = {"lora-all": "LoRA-all", "ila-75": "ILA 75%", "random-75": "random 75%", "ila-ranks": "R"}
    # gaps (0.325 - 1.05) / 4 and (0.325 - 0.55) / 4, each seed's spread 0.0125 or 0.025 (/ 4): SE 0.01398
    shown = ["- ILA 75%. alpaca: -13.0 against LoRA-all, -4.0 against random 75%"]
    shown += ["- R. alpaca: -8.7 against LoRA-all"]  # one seed: (0.3 - 1.05) / 4, SE from LoRA-all's spread alone
    head = "How close each ILA arm came to forgetting less: its gap at matched held-out loss, in standard errors"
    assert closeness_lines(results) == [f"{head} (a finding needs below −2):", "", *shown, ""]
    results["runs"] = [r for r in runs if r["arm"] not in ("ila-75", "ila-ranks")]
    assert closeness_lines(results) == []


def test_the_instruction_score_is_compared_with_the_base_model_s_prompt_by_prompt():
    from benchmarks.core.stats import paired_difference
    from benchmarks.frontier_report import findings

    def run(dataset: str, arm: str, seed: int, obeyed: str) -> dict:
        points = [{"held_out": loss, "forgetting": 2.0 - loss} for loss in (1.8, 1.5)]
        score = {"share": obeyed.count("1") / len(obeyed), "obeyed": obeyed}
        closing = {"best": {"instructions": score, "step": 2}, "end": {"instructions": score}}
        return {"dataset": dataset, "arm": arm, "seed": seed, "checkpoints": points, "closing": closing}

    runs = [run("alpaca", "lora-all", 0, "01110000"), run("alpaca", "lora-all", 1, "00110000")]
    runs += [run("alpaca", "ila-75", seed, "11110000") for seed in (0, 1)]
    runs += [run("lima", "lora-all", seed, "00000000") for seed in (0, 1)] + [run("dolly", "lora-all", 0, "0" * 8)]
    results = {"datasets": ["alpaca", "lima", "dolly"], "runs": runs, "primary": "alpaca"}
    results |= {"base": {"held_out": dict.fromkeys(results["datasets"], 2.0), "instructions": {"obeyed": "11110000"}}}
    results |= {"settings": {"seeds": [0, 1], "other_seeds": [0, 1]}, "arms": ["lora-all", "ila-75"]}
    results["labels"] = {"lora-all": "LoRA-all", "ila-75": "ILA 75%"}
    found = next(f for f in findings(results) if f.id == "frontier-instructions")
    # alpaca: prompt by prompt -1, -0.5 and six 0 (-1.4 SE); lima: four -1 and four 0 (-2.6 SE); dolly: one seed of 2
    assert found.verdict == "does not hold on alpaca (holds on lima)"
    alpaca = "alpaca: lora-all -0.1875 ± 0.1315, ila-75 +0.0000 ± 0.0000 (LoRA-all at the end: -0.1875 ± 0.1315)"
    assert found.evidence.startswith(f"{alpaca}; lima: lora-all -0.5000 ± 0.1890")
    with pytest.raises(ValueError, match="paired_difference: 2 items against 3; pair every item once"):
        paired_difference([1.0, 0.0], [1.0, 0.0, 1.0])


def test_past_its_best_an_arm_forgets_less_than_lora_all_or_not_by_the_rule():
    from benchmarks.frontier_report import UNDECIDED, findings

    def run(arm: str, seed: int, slope: float) -> dict:  # best at 1.5, then climbs to 1.7 as forgetting rises
        points = [{"held_out": h, "forgetting": f} for h, f in ((1.5, -0.1), (1.7, -0.1 + 0.2 * slope))]
        closing = {"best": {"instructions": {"share": 0.3}, "step": 1}, "end": {"instructions": {"share": 0.3}}}
        return {"dataset": "alpaca", "arm": arm, "seed": seed, "checkpoints": points, "closing": closing}

    def judged(slopes: dict[str, list[float]]):
        runs = [run(arm, seed, slope) for arm, seeds in slopes.items() for seed, slope in enumerate(seeds)]
        results = {"datasets": ["alpaca", "lima"], "base": {"held_out": {"alpaca": 2.0, "lima": 3.0}}, "runs": runs}
        results |= {"primary": "alpaca", "settings": {"seeds": [0, 1], "other_seeds": [0]}}
        results["labels"] = {"lora-all": "LoRA-all", "ila-75": "ILA 75%"}
        return next(f for f in findings(results) if f.id == "frontier-past-best-ila-75")

    found = judged({"lora-all": [1.0, 1.1], "ila-75": [0.3, 0.35]})
    assert found.verdict == "holds on alpaca" and found.evidence.startswith("alpaca: -0.0")  # lima: not run there
    assert "lima" not in found.evidence
    assert judged({"lora-all": [0.3, 0.35], "ila-75": [1.0, 1.1]}).verdict == "does not hold on alpaca"
    one_seed = judged({"lora-all": [1.0], "ila-75": [0.3]})
    assert one_seed.verdict == UNDECIDED and one_seed.evidence == "alpaca: -0.0700 (one seed)"  # 0.1 (0.3 - 1.0)
    assert judged({"ila-75": [0.3, 0.35]}).evidence == "not run beside LoRA-all"


# --- recipes and the executor ------------------------------------------------------------------------------------


def test_ranks_from_importance_need_every_layer_of_an_identification():
    with pytest.raises(ValueError, match=r"ranks from importance need layers 'identify' with top_k 1\.0"):
        Recipe("x", "identify", top_k=0.75, ranks="importance")
    with pytest.raises(ValueError, match="layers must be one of"):
        Recipe("x", "sideways")
    assert not Recipe("x", "identify", ranks="importance").selects and Recipe("x", "kappa", top_k=0.5).selects


def test_the_best_checkpoint_s_weights_come_back():
    weight = torch.nn.Parameter(torch.zeros(2))
    best = Best([weight])
    for step, loss in ((1, 3.0), (2, 1.0), (3, 2.0)):
        with torch.no_grad():
            weight.fill_(step)
        best.offer({"step": step, "held_out": loss})
    best.restore()
    assert best.point["step"] == 2 and weight.tolist() == [2.0, 2.0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("frontier")
    (root / "data.json").write_text(json.dumps(alpaca_rows(40)))
    prepared = prepare(str(tiny_lm_dir(root / "lm", layers=4)), str(root / "data.json"), max_length=64, eval_size=8)
    return prepared


def executed(
    tiny, recipe: Recipe, steps: int = 6, ranking: Selection | None = None, state=None, at: tuple = (2, 4)
) -> tuple[dict, Evaluation]:
    """`recipe` run on a fresh copy of the tiny model, checkpoints at the steps `at` and the end, 3 instruction
    prompts, identification's stage 1 2 steps; its progress kept in `state` while it runs."""
    import copy

    prepared = replace(tiny, model=copy.deepcopy(tiny.model))
    probe = InstructionProbe.of([tiny.held_out_conversations], tiny.tokenizer, tiny.plain, 3, max_new_tokens=4)
    held_out = tiny.batches(4, 0, held_out=True)
    measures = {"norm": lambda model: sum(float(p.detach().norm()) for p in model.parameters() if p.requires_grad)}
    closing = {"instructions": probe.score}
    evaluation = Evaluation(held_out, {"same": held_out}, [*at, steps], None, measures=measures, closing=closing)
    evaluation.base = evaluation.point(tiny.model, 0)
    config = ILAConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, stage1_max_steps=2, stage2_steps=1)
    record = run_recipe(
        recipe, prepared, config, Schedule(steps, 1e-2, 1e-3, 0.1, 4), 0, evaluation, False, None, ranking, state
    )
    return record, evaluation


def test_a_run_is_measured_at_its_checkpoints_and_scored_on_instructions_at_the_end_and_at_its_best(tiny):
    record, evaluation = executed(tiny, Recipe("LoRA-all"))
    assert [c["step"] for c in record["checkpoints"]] == [2, 4, 6]
    assert all(set(c["measures"]) == {"norm"} and c["forgetting"] is not None for c in record["checkpoints"])
    norms = [c["measures"]["norm"] for c in record["checkpoints"]]
    assert len(set(norms)) == 3  # measured on the weights of each step, not once
    best = min(record["checkpoints"], key=lambda c: c["held_out"])
    closing = record["closing"]
    assert closing["best"]["step"] == best["step"] and len(closing["end"]["instructions"]["obeyed"]) == 3
    assert 0 <= closing["end"]["instructions"]["share"] <= 1
    assert 0 < record["evaluation_seconds"] < evaluation.seconds  # the base model's point was measured before


def test_peer_and_ranked_recipes_train_what_they_chose(tiny):
    kappa, _ = executed(tiny, Recipe("KappaTune 50%", "kappa", top_k=0.5))
    assert len(kappa["identification"]["selected"]) == 14  # half of 4 blocks x 7 projections
    candidates = [n for n, m in tiny.model.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n]
    scores = {name: (i % 7 + 1) / 7 for i, name in enumerate(candidates)}
    ranking = Selection(candidates, candidates, scores)
    ranked, _ = executed(tiny, Recipe("ranks", "identify", ranks="importance"), ranking=ranking)
    everywhere, _ = executed(tiny, Recipe("LoRA-all"))
    identified, _ = executed(tiny, Recipe("ranks", "identify", ranks="importance"))  # identifies, then ranks
    assert identified["identification"]["stage1_steps"] == 2 and len(identified["identification"]["selected"]) == 28
    largest = max(linear_costs(tiny.model, candidates).values())  # parameters per unit of rank
    for run in (ranked, identified):
        assert everywhere["trainable_params"] - largest < run["trainable_params"] <= everywhere["trainable_params"]
    assert ranked["checkpoints"][-1]["held_out"] != everywhere["checkpoints"][-1]["held_out"]


def test_an_identification_inside_is_measured_at_the_checkpoints_of_its_stage_1_and_trains_as_unmeasured(tiny):
    recipe = Recipe("inside", "inside", top_k=0.5)
    measured, _ = executed(tiny, recipe, at=(1, 2, 4))
    unmeasured, _ = executed(tiny, recipe, at=(4,))
    assert measured["identification"]["stage1_steps"] == 2  # steps 1 and 2 are stage 1's, on every layer
    assert [c["step"] for c in measured["checkpoints"]] == [1, 2, 4, 6]
    assert measured["checkpoints"][2:] == unmeasured["checkpoints"]  # measuring changed nothing
    assert measured["identification"]["selected"] == unmeasured["identification"]["selected"]


@pytest.mark.parametrize("recipe", [Recipe("LoRA-all"), Recipe("inside", "inside", top_k=0.5)], ids=lambda r: r.label)
def test_an_interrupted_run_goes_on_from_its_state_to_the_uninterrupted_record(tiny, recipe, tmp_path, monkeypatch):
    whole, _ = executed(tiny, recipe)
    state = tmp_path / "run.running.safetensors"
    started = tmp_path / "started.running.safetensors"
    with monkeypatch.context() as patch:
        stop_at_step(patch, peft_ila.app.pipeline, 1)  # saved at the fine-tune's start only
        with pytest.raises(KeyboardInterrupt):
            executed(tiny, recipe, state=started)
    assert checkpoint_record(started)["notes"]["step"] == whole["identification"].get("stage1_steps", 0)
    with monkeypatch.context() as patch:
        stop_at_step(patch, peft_ila.app.pipeline, 3)  # one step past a save: that step is trained again
        with pytest.raises(KeyboardInterrupt):
            executed(tiny, recipe, state=state)
    saved = checkpoint_record(state)["notes"]
    offset = whole["identification"].get("stage1_steps", 0)
    assert saved["step"] == offset + 2  # the run's step: an inside stage 1's counted
    assert saved["checkpoints"] == [c for c in whole["checkpoints"] if c["step"] <= saved["step"]]  # figures saved
    resumed, _ = executed(tiny, recipe, state=state)
    assert not state.exists() and (whole["resumed"], resumed["resumed"]) == (0, 1)
    timing = ("seconds", "evaluation_seconds", "median_step_seconds", "memory", "resumed")
    for run in (whole, resumed):
        run["identification"].pop("seconds", None)  # an identification's own time
    assert {k: v for k, v in resumed.items() if k not in timing} == {k: v for k, v in whole.items() if k not in timing}


def test_a_fine_tune_s_checkpoint_keeps_the_caller_s_tensors_and_notes_as_its_on_step_left_them(tiny, tmp_path):
    import copy

    from peft_ila.app.checkpoints import FinetuneCheckpoint
    from peft_ila.app.pipeline import finetune, wrap
    from peft_ila.identification.checkpoint import FINETUNE_FORMAT, load_checkpoint

    def tune(resume: bool, stop: int | None = None) -> list[float]:
        """Five steps, the caller's tensor and notes set to the step count after each; what the tensor held
        before each step's hook."""
        model = wrap(
            copy.deepcopy(tiny.model),
            ILAConfig(task_type="CAUSAL_LM", r=4, selected_layers=["model.layers.0.self_attn.q_proj"]),
        )
        kept, notes, seen = torch.zeros(3), {}, []
        checkpoint = FinetuneCheckpoint(tmp_path / "c.safetensors", 2, resume, notes, {"mark": kept})

        def on_step(stats):
            seen.append(kept[0].item())
            kept.fill_(stats.steps)
            notes["steps"] = stats.steps
            if stats.steps == stop:
                raise KeyboardInterrupt

        finetune(model, tiny, 5, 1e-3, 4, 0, progress=False, on_step=on_step, loss_before=1.0, checkpoint=checkpoint)
        return seen

    with pytest.raises(KeyboardInterrupt):
        tune(False, stop=3)
    tensors, record = load_checkpoint(tmp_path / "c.safetensors", FINETUNE_FORMAT)
    assert tensors["kept.mark"].tolist() == [2.0] * 3 and record["notes"] == {"steps": 2}  # saved after on_step
    assert tune(True) == [2.0, 3.0, 4.0]  # back in the caller's tensor before the first step after the save


def test_a_run_s_state_must_be_a_file_it_wrote(tiny, tmp_path):
    state = tmp_path / "notes.txt"
    state.write_text("mine")
    with pytest.raises(ValueError, match=r"notes\.txt is not a run's state that peft-ila wrote: give .* another path"):
        executed(tiny, Recipe("LoRA-all"), state=state)
    assert state.read_text() == "mine"


# --- the study ---------------------------------------------------------------------------------------------------


def general_text(folder):
    """Two sections of two articles, a title line and paragraphs of 50 words and more (and one shorter)."""
    for section in ("news", "sport"):
        (folder / section).mkdir(parents=True)
        for number in (1, 2):
            long = " ".join(f"{section}{number}word{i}" for i in range(60))
            (folder / section / f"00{number}.txt").write_text(f"A title\n\n{long}\n\nToo short.\n\n{long} again")
    return folder


def test_general_text_takes_the_sections_in_turn_and_skips_short_and_repeated_paragraphs(tmp_path):
    from benchmarks.general_text import paragraphs

    texts = paragraphs(general_text(tmp_path / "bbc"), 5)
    assert [t.split("word")[0] for t in texts] == ["news1", "news1", "sport1", "sport1", "news2"]
    assert all(len(t.split()) >= 50 for t in texts) and len(set(texts)) == 5


def test_the_frontier_study_runs_every_arm_judges_them_and_reads_its_cells_back(tmp_path):
    from benchmarks import frontier

    lm = tiny_lm_dir(tmp_path / "lm", layers=4)
    for name, n in (("alpaca", 30), ("lima", 24)):
        (tmp_path / f"{name}.json").write_text(json.dumps(alpaca_rows(n)))
    args = ["--preset", "smoke", "--model", str(lm), "--datasets", "alpaca,lima", "--shared", "/nowhere"]
    args += [f"--data={name}={tmp_path / f'{name}.json'}" for name in ("alpaca", "lima")]
    args += ["--knowledge", str(knowledge_file(tmp_path / "arc.jsonl.gz")), "--grid-cells", str(tmp_path / "grid")]
    args += ["--cells", str(tmp_path / "cells"), "--general-text", str(general_text(tmp_path / "bbc"))]
    estimate = frontier.Frontier.main([*args, "--dry-run"])
    assert len(estimate["runs"]) == len(frontier.ARMS) + 4 and estimate["step_seconds"] > 0
    results = frontier.Frontier.main(args)
    assert not results["missing"], results["missing"]
    ran = {(r["dataset"], r["arm"]) for r in results["runs"]}
    assert {("alpaca", arm) for arm in frontier.ARMS} <= ran and len(ran) == len(frontier.ARMS) + 4
    for run in results["runs"]:
        score = run["closing"]["end"]["instructions"]  # its verdicts: one "1" or "0" per prompt
        assert run["checkpoints"][-1]["step"] == 3 and len(score["obeyed"]) == results["settings"]["prompts"]
        assert set(score["obeyed"]) <= {"0", "1"}
        assert score["obeyed"].count("1") / len(score["obeyed"]) == score["share"]
        assert set(run["closing"]["best"]) == {"step", "instructions", "knowledge", "general"}
    ids = {"frontier-ila-75", "frontier-peers-ila-75", "frontier-ila-ranks", "frontier-instructions"}
    assert ids <= {f["id"] for f in results["findings"]}
    folder = tmp_path / "cells" / "smoke"
    assert not list(folder.glob("*.running.safetensors"))  # a run's state goes once its cell is written
    page = (folder / "FRONTIER.md").read_text()
    assert "## lima" in page and (folder / "frontier-alpaca.png").read_bytes()[:4] == b"\x89PNG"
    again = frontier.Frontier.main([*args, "--existing-only"])
    assert again["runs"] == results["runs"]
    assert f"On lima: {'; '.join(again['labels'][arm] for arm in again['others'])}. Chosen by" in page
    ran = len(results["runs"])
    assert (
        f"Runs done: {ran} of the {ran} planned; a run took " in page
        and f"evaluating; median of {ran}, wall clock).\n" in page
    )


def _two_dataset_args(tmp_path: Path, arms: str) -> list[str]:
    """The smoke preset's arguments on a tiny model with alpaca and lima (made-up rows), computing `arms` only."""
    lm = tiny_lm_dir(tmp_path / "lm", layers=4)
    for name, n in (("alpaca", 30), ("lima", 24)):
        (tmp_path / f"{name}.json").write_text(json.dumps(alpaca_rows(n)))
    args = ["--preset", "smoke", "--model", str(lm), "--datasets", "alpaca,lima", "--shared", "/nowhere"]
    args += [f"--data={name}={tmp_path / f'{name}.json'}" for name in ("alpaca", "lima")]
    args += ["--grid-cells", str(tmp_path / "grid")]
    args += ["--knowledge", str(knowledge_file(tmp_path / "arc.jsonl.gz")), "--cells", str(tmp_path / "cells")]
    return [*args, "--general-text", str(general_text(tmp_path / "bbc")), "--arms", arms]


def test_a_frontier_run_cut_short_shows_how_far_it_went_and_goes_on_from_there(tmp_path, monkeypatch):
    from benchmarks import frontier

    args = _two_dataset_args(tmp_path, "lora-all")
    frontier.Frontier.main([*args, "--dry-run"])
    with monkeypatch.context() as patch:
        stop_at_step(patch, peft_ila.app.pipeline, 2)
        with pytest.raises(KeyboardInterrupt):
            frontier.Frontier.main(args)
    shown = frontier.Frontier.main([*args, "--existing-only"])
    assert shown["under_way"] == [{"dataset": "alpaca", "arm": "lora-all", "seed": 0, "step": 2, "of": 3}]
    page = (tmp_path / "cells" / "smoke" / "FRONTIER.md").read_text()
    assert (
        "Started, not finished when the page was written (running, or stopped; the progress is in a state file beside "
        "the cells, which git ignores: "
        "`make bench-frontier` goes on from it in that tree): alpaca, lora-all, seed 0: step 2 of 3." in page
    )
    finished = frontier.Frontier.main(args)
    assert not finished["under_way"] and [(r["dataset"], r["arm"]) for r in finished["runs"]] == [
        ("alpaca", "lora-all"),
        ("lima", "lora-all"),  # LoRA-all runs on every dataset before the arms there are chosen
    ]
    cells = [json.loads(path.read_text()) for path in (tmp_path / "cells" / "smoke").glob("run-*.json")]
    assert sorted((c["settings"]["dataset"], c["resumed"]) for c in cells) == [("alpaca", 1), ("lima", 0)]
    with pytest.raises(SystemExit):
        frontier.Frontier.main([*args[:-2], "--arms", "lora-all,sideways"])


def test_a_frontier_process_given_arms_and_seeds_chooses_the_other_datasets_arms_on_the_whole_plan(tmp_path):
    from benchmarks import frontier

    args = _two_dataset_args(tmp_path, "random-75")
    frontier.Frontier.main([*args, "--dry-run"])
    with pytest.raises(SystemExit):
        frontier.Frontier.main([*args, "--seeds", "zero"])
    with pytest.raises(SystemExit, match=r"--seeds \[1\]: the smoke preset plans seeds \[0\]"):
        frontier.Frontier.main([*args, "--seeds", "0,1"])
    leaves_seed_0 = frontier.Frontier.__new__(frontier.Frontier)
    leaves_seed_0.args = argparse.Namespace(arms=None, seeds=[1])
    assert not leaves_seed_0.computes("random-75", 0) and leaves_seed_0.computes("random-75", 1)
    results = frontier.Frontier.main([*args, "--seeds", "0"])
    assert results["arms"] == frontier.PRESETS["smoke"]["arms"]  # the plan, not the process's share of it
    assert [(r["dataset"], r["arm"]) for r in results["runs"]] == [("alpaca", "random-75")]
    assert results["others"] is None  # the other arms on alpaca are not in: nothing is chosen, nothing run on lima
    assert any(line.startswith("the arms on the other datasets (it waits for") for line in results["missing"])
    assert any(line.startswith("lima: lora-all, seed 0 (run-") for line in results["missing"])
