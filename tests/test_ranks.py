"""ILA rank re-allocation: ranks from importance within LoRA-all's trainable parameters, capped like EVA's rho, as a
plain peft LoRA adapter that saves and reloads."""

from __future__ import annotations

import math

import pytest
import torch
from peft import PeftModel, get_peft_model

from conftest import tiny_llama
from peft_ila import Selection, allocate_ranks, importance_lora_config
from peft_ila.tuner.config import ILAConfig
from peft_ila.tuner.model import find_candidates
from peft_ila.tuner.ranks import linear_costs, rank_parameter_count

COSTS = {"a": 10, "b": 10, "c": 30, "d": 7, "e": 13}


@pytest.mark.parametrize("rho", [1.0, 1.5, 2.0, 4.0])
@pytest.mark.parametrize("scores", [[1.0, 0.5, 0.25, 0.0, 0.9], [0.2, 0.2, 0.2, 0.2, 0.9], [0.0, 0.0, 0.0, 1e-6, 1.0]])
def test_ranks_fill_the_budget_as_far_as_whole_ranks_allow_within_the_cap(scores, rho):
    r = 4
    ranks = allocate_ranks(dict(zip(COSTS, scores, strict=True)), COSTS, r, rho)
    budget, cap = r * sum(COSTS.values()), math.floor(rho * r)
    used = rank_parameter_count(ranks, COSTS)
    assert used <= budget and all(1 <= rank <= cap for rank in ranks.values())
    assert not [n for n in COSTS if ranks[n] < cap and COSTS[n] <= budget - used]  # none could take one more


def test_ranks_follow_importance_and_equal_scores_give_the_uniform_rank():
    costs = dict.fromkeys("abcd", 10)
    ranks = allocate_ranks({"a": 0.9, "b": 0.6, "c": 0.3, "d": 0.1}, costs, 8, rho=2.0)
    assert ranks["a"] >= ranks["b"] >= ranks["c"] >= ranks["d"] and ranks["a"] > ranks["d"]
    assert sum(ranks.values()) == 32  # equal costs: the ranks add up to 4 x 8
    capped = allocate_ranks({"a": 0.9, "b": 0.1, "c": 0.1, "d": 0.1}, costs, 8, rho=2.0)
    assert capped["a"] == 16 and sorted(capped.values()) == [5, 5, 6, 16]  # the excess goes to the others
    assert allocate_ranks(dict.fromkeys("abcd", 0.5), costs, 8) == dict.fromkeys("abcd", 8)
    assert allocate_ranks(dict.fromkeys("abcd", 0.0), costs, 8) == dict.fromkeys("abcd", 8)


@pytest.mark.parametrize(
    ("scores", "costs", "r", "rho", "message"),
    [
        ({}, {}, 8, 2.0, "`costs` is empty"),
        ({"a": 1.0}, {"b": 3}, 8, 2.0, "must name the same layers"),
        ({"a": 1.0}, {"a": 3}, 0, 2.0, "an int >= 1"),
        ({"a": 1.0}, {"a": 3}, 8, 0.5, "use >= 1"),
        ({"a": -1.0}, {"a": 3}, 8, 2.0, "numbers >= 0"),
        ({"a": float("nan")}, {"a": 3}, 8, 2.0, "numbers >= 0"),
    ],
)
def test_bad_input_is_refused_naming_the_argument(scores, costs, r, rho, message):
    with pytest.raises(ValueError, match=message):
        allocate_ranks(scores, costs, r, rho)


def test_the_config_gives_each_layer_its_rank_keeps_the_scaling_and_saves_and_reloads(tmp_path):
    model = tiny_llama(0, layers=12)  # layers.1 must not match layers.11
    candidates = find_candidates(model, ILAConfig())
    scores = {name: (index + 1) / len(candidates) for index, name in enumerate(candidates)}  # deeper: more
    config = importance_lora_config(model, Selection(candidates, candidates, scores), r=4, lora_alpha=8)
    ranks = allocate_ranks(scores, linear_costs(model, candidates), 4)
    peft_model = get_peft_model(model, config)
    for name in candidates:
        layer = peft_model.base_model.model.get_submodule(name)
        assert layer.lora_A["default"].weight.shape[0] == ranks[name], name
        assert layer.scaling["default"] == pytest.approx(2.0), name  # alpha / rank as at rank 4, alpha 8
    trained = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert (
        trained
        == rank_parameter_count(ranks, linear_costs(model, candidates))
        <= 4 * sum(linear_costs(model, candidates).values())
    )
    assert ranks["model.layers.1.self_attn.q_proj"] != ranks["model.layers.11.self_attn.q_proj"]
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.02)  # an update that changes the outputs
    ids = torch.arange(12)[None] % 50
    expected = peft_model(input_ids=ids).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(tiny_llama(0, layers=12), tmp_path / "adapter")
    assert torch.allclose(reloaded(input_ids=ids).logits, expected, atol=1e-6)
    again = reloaded.base_model.model.get_submodule("model.layers.11.self_attn.q_proj")
    assert again.lora_A["default"].weight.shape[0] == ranks["model.layers.11.self_attn.q_proj"]


def test_a_layer_that_is_not_linear_is_refused():
    model = tiny_llama(0, layers=2)
    with pytest.raises(ValueError, match="not a linear layer"):
        linear_costs(model, ["model.layers.0.input_layernorm"])
