"""Cost-aware selection: the step-cost model and the best layers within a budget (no timing is asserted)."""

import itertools
import json

import pytest
import torch
from peft import PeftModel, get_peft_model

from conftest import identify, llama_candidates, lm_batches, tiny_llama
from peft_ila import ILAConfig, Selection, identify_important_layers
from peft_ila.identification.cost import StepCost, _fit, measure_step_cost, within_budget

BLOCKS = tuple(f"model.layers.{i}" for i in range(4))
PROBE = dict(r=2, top_k=4, stage1_max_steps=4, stage2_steps=3, seed=0)


def synthetic_cost(fixed: float = 1.0, per_block: float = 1.0) -> StepCost:
    """Seconds and MB both fixed + per_block * blocks: adapting from block L costs (5 - L) / 5 of all four."""
    return StepCost(BLOCKS, ((0, 5.0, 5.0), (3, 2.0, 2.0)), (fixed, per_block), (fixed, per_block))


def ranked(seed: int = 0) -> Selection:
    """Every candidate of a 4-block tiny Llama scored at random, the best 4 selected."""
    candidates = llama_candidates()
    scores = torch.rand(len(candidates), generator=torch.Generator().manual_seed(seed)).tolist()
    scored = Selection(tuple(candidates), tuple(candidates[:1]), dict(zip(candidates, scores, strict=True)))
    order = sorted(candidates, key=lambda name: -scored.scores[name])
    return Selection(tuple(candidates), tuple(order[:4]), scored.scores, tuple(order))


def block(name: str) -> int:
    return int(name.split(".")[2])


def test_measure_step_cost_counts_fewer_activations_the_higher_the_lowest_trainable_block():
    model = get_peft_model(tiny_llama(), ILAConfig(r=2)).train()
    before = {name: (p.requires_grad, p.detach().clone()) for name, p in model.named_parameters()}
    cost = measure_step_cost(model, lm_batches(1)[0], cutoffs=4, repeats=1)
    assert cost.blocks == BLOCKS
    lows, seconds, memory = zip(*cost.measured, strict=True)
    assert lows == (0, 1, 2, 3) and all(s > 0 for s in seconds)
    assert all(a > b > 0 for a, b in itertools.pairwise(memory))  # exact bytes: one block less, fewer saved tensors
    assert cost.memory_mb[1] > 0 and cost.fraction("memory", 0) == 1.0
    after = dict(model.named_parameters())
    assert all(after[n].requires_grad == rg and torch.equal(after[n], v) for n, (rg, v) in before.items())
    assert all(p.grad is None for p in model.parameters())  # nothing left behind
    assert StepCost.from_json(json.loads(json.dumps(cost.to_json()))) == cost


def test_measure_step_cost_runs_under_gradient_checkpointing_and_needs_adapters_in_two_blocks():
    base = tiny_llama()
    base.activation_checkpointing_enable({"use_reentrant": True})
    cost = measure_step_cost(get_peft_model(base, ILAConfig(r=2)), lm_batches(1)[0], repeats=1)
    assert [row[0] for row in cost.measured] == [0, 2, 3] and cost.seconds[1] >= 0
    one_block = get_peft_model(tiny_llama(), ILAConfig(r=2, selected_layers=["model.layers.2.mlp.up_proj"]))
    with pytest.raises(ValueError, match="adapters in at least two"):
        measure_step_cost(one_block, lm_batches(1)[0])


def test_within_budget_keeps_the_best_layers_at_or_above_the_lowest_block_the_budget_allows():
    selection, cost = ranked(), synthetic_cost()
    budgeted = within_budget(selection, cost, "time:0.6", 4)  # (5 - L) / 5 <= 0.6: L >= 2
    allowed = [name for name in selection.ranking if block(name) >= 2]
    assert budgeted.selected == tuple(allowed[:4]) and budgeted.ranking[:4] == budgeted.selected
    assert sorted(budgeted.ranking) == sorted(selection.candidates) and budgeted.scores == selection.scores
    note = budgeted.provenance["budget"]
    assert note["lowest_block"] == "model.layers.2" and note["predicted_fraction"] == pytest.approx(0.6)
    assert within_budget(selection, cost, "memory:1.0", 4).selected == selection.selected  # no budget: plain top-k


@pytest.mark.parametrize("seed", range(5))
def test_no_k_layers_within_the_budget_score_higher_than_the_budgeted_selection(seed):
    selection, cost = ranked(seed), synthetic_cost(fixed=0.5, per_block=1.0)
    budgeted = within_budget(selection, cost, "time:0.7", 3)
    lowest = min(block(name) for name in budgeted.selected)
    assert cost.fraction("time", lowest) <= 0.7
    total = sum(selection.scores[name] for name in budgeted.selected)
    for subset in itertools.combinations(selection.candidates, 3):  # all 3-subsets of 28 layers
        if cost.fraction("time", min(block(name) for name in subset)) <= 0.7:
            assert sum(selection.scores[name] for name in subset) <= total + 1e-9


def test_a_budget_below_the_top_block_is_refused_and_a_tight_one_selects_fewer_with_a_warning():
    selection, cost = ranked(), synthetic_cost()
    with pytest.raises(ValueError, match=r"use a budget of at least time:0\.40"):
        within_budget(selection, cost, "time:0.3", 4)
    with pytest.warns(UserWarning, match="allows only the 7 candidate layers from model.layers.3 up"):
        tight = within_budget(selection, cost, "time:0.4", 10)
    assert {block(name) for name in tight.selected} == {3} and len(tight.selected) == 7


@pytest.mark.parametrize("budget", ["time", "time:0", "time:1.5", "speed:0.5", "memory:x", 0.6])
def test_invalid_budgets_are_refused_with_the_accepted_form(budget):
    with pytest.raises(ValueError, match=r"ILAConfig.budget=.* 'time:F' or 'memory:F' with F in \(0, 1\]"):
        ILAConfig(budget=budget)


def test_identification_with_a_budget_selects_within_it_and_saves_its_cost_model(tmp_path):
    model = get_peft_model(tiny_llama(), ILAConfig(**PROBE, budget="memory:0.6"))
    result = identify_important_layers(model, lm_batches(4), progress=False)
    note = result.selection.provenance["budget"]
    cost = StepCost.from_json(note["cost"])
    lowest = cost.blocks.index(note["lowest_block"])
    assert cost.fraction("memory", lowest) <= 0.6 < cost.fraction("memory", lowest - 1)
    assert len(result.selected) == 4 and all(block(name) >= lowest for name in result.selected)
    assert model.peft_config["default"].selected_layers == result.selected
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert loaded.peft_config["default"].budget == "memory:0.6"
    assert loaded.peft_config["default"].provenance["budget"]["lowest_block"] == note["lowest_block"]


def test_identify_on_the_command_line_with_a_budget_records_and_prints_it(work, tmp_path, capsys):
    identify(work, tmp_path / "run", "--budget", "memory:0.75", "--top-k", "3")
    record = json.loads((tmp_path / "run" / "importance.json").read_text())
    note = record["provenance"]["budget"]
    assert note["budget"] == "memory:0.75" and record["config"]["budget"] == "memory:0.75"
    assert all(int(name.split(".")[2]) >= int(note["lowest_block"].split(".")[2]) for name in record["selected"])
    assert f"within --budget memory:0.75: layers from {note['lowest_block']} up" in capsys.readouterr().out


def test_the_cost_fit_keeps_both_parts_of_a_cost_non_negative():
    assert _fit([3, 2, 1], [4.0, 3.0, 2.0]) == pytest.approx((1.0, 1.0))  # exact: fixed 1, 1 per block
    assert _fit([3, 2, 1], [1.0, 2.0, 3.0]) == pytest.approx((2.0, 0.0))  # falling with depth: noise, flat
    assert _fit([4, 2, 1], [0.4, 0.2, 0.05]) == pytest.approx((0.0, 2.05 / 21))  # through the origin
