"""ILA rank re-allocation: ranks from importance within LoRA-all's trainable parameters, capped like EVA's rho, as a
plain peft LoRA adapter that saves and reloads."""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key
from torch import nn

from conftest import llama_candidates, tiny_gpt2, tiny_llama
from peft_ila import ILAConfig, Selection, allocate_ranks, importance_lora_config
from peft_ila.tuner.model import find_candidates
from peft_ila.tuner.ranks import linear_costs, rank_parameter_count

COSTS = {"a": 10, "b": 10, "c": 30, "d": 7, "e": 13}


def assert_fills_within_cap(ranks: dict[str, int], costs: dict[str, int], r: int, rho: float) -> None:
    """Within the budget r x sum(costs), every rank in [1, floor(rho x r)], and no layer could take one more."""
    budget, cap = r * sum(costs.values()), math.floor(rho * r)
    used = rank_parameter_count(ranks, costs)
    assert used <= budget and all(1 <= rank <= cap for rank in ranks.values())
    assert not [name for name in costs if ranks[name] < cap and costs[name] <= budget - used]


def lora_ranks(peft_model: PeftModel, names: list[str]) -> dict[str, int]:
    return {name: peft_model.base_model.model.get_submodule(name).lora_A["default"].weight.shape[0] for name in names}


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --- allocate_ranks ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rho", [1.0, 1.5, 2.0, 4.0])
@pytest.mark.parametrize("scores", [[1.0, 0.5, 0.25, 0.0, 0.9], [0.2, 0.2, 0.2, 0.2, 0.9], [0.0, 0.0, 0.0, 1e-6, 1.0]])
def test_ranks_fill_the_budget_as_far_as_whole_ranks_allow_within_the_cap(scores, rho):
    assert_fills_within_cap(allocate_ranks(dict(zip(COSTS, scores, strict=True)), COSTS, 4, rho), COSTS, 4, rho)


@given(
    layers=st.lists(st.tuples(st.floats(0, 1), st.integers(1, 60)), min_size=1, max_size=12),
    r=st.integers(1, 16),
    rho=st.floats(1, 4),
    equal_costs=st.booleans(),
)
def test_any_scores_fill_the_budget_within_the_cap_and_equal_costs_keep_the_score_order(layers, r, rho, equal_costs):
    scores = {f"l{i}": score for i, (score, _) in enumerate(layers)}
    costs = {f"l{i}": 20 if equal_costs else cost for i, (_, cost) in enumerate(layers)}
    ranks = allocate_ranks(scores, costs, r, rho)
    assert_fills_within_cap(ranks, costs, r, rho)
    if equal_costs:
        by_score = sorted(scores, key=lambda name: (scores[name], ranks[name]))  # equal scores: any order
        assert [ranks[name] for name in by_score] == sorted(ranks.values())


def test_ranks_follow_importance_and_equal_scores_give_the_uniform_rank():
    costs = dict.fromkeys("abcd", 10)
    ranks = allocate_ranks({"a": 0.9, "b": 0.6, "c": 0.3, "d": 0.1}, costs, 8, rho=2.0)
    assert ranks["a"] > ranks["b"] > ranks["c"] > ranks["d"]
    assert sum(ranks.values()) == 32  # equal costs: the ranks add up to 4 x 8
    capped = allocate_ranks({"a": 0.9, "b": 0.1, "c": 0.1, "d": 0.1}, costs, 8, rho=2.0)
    assert capped["a"] == 16 and sorted(capped.values()) == [5, 5, 6, 16]  # the excess goes to the others
    assert allocate_ranks(dict.fromkeys(COSTS, 0.5), COSTS, 8) == dict.fromkeys(COSTS, 8)  # unequal costs too
    assert allocate_ranks(dict.fromkeys(COSTS, 0.0), COSTS, 8) == dict.fromkeys(COSTS, 8)


@pytest.mark.parametrize(
    ("scores", "costs", "r", "rho", "message"),
    [
        ({}, {}, 8, 2.0, "are empty; give at least one layer"),
        ({"a": 1.0}, {"b": 3}, 8, 2.0, r"`scores` lacks \[b\] and `costs` lacks \[a\]"),
        ({"a": 1.0}, {"a": 3}, 0, 2.0, "`r`=0; .* an int >= 1"),
        ({"a": 1.0}, {"a": 3}, True, 2.0, "`r`=True; .* an int >= 1"),
        ({"a": 1.0}, {"a": 3}, 8, 0.5, "`rho`=0.5; .* use 1 <= rho < inf"),
        ({"a": 1.0}, {"a": 3}, 8, math.inf, "`rho`=inf; .* use 1 <= rho < inf"),
        ({"a": -1.0}, {"a": 3}, 8, 2.0, "`scores` must be finite numbers >= 0; a=-1.0"),
        ({"a": math.nan}, {"a": 3}, 8, 2.0, "`scores` must be finite numbers >= 0; a=nan"),
        ({"a": 1.0}, {"a": 0}, 8, 2.0, "`costs` must be ints >= 1"),
    ],
)
def test_bad_input_is_refused_naming_the_argument(scores, costs, r, rho, message):
    with pytest.raises(ValueError, match=message):
        allocate_ranks(scores, costs, r, rho)


# --- importance_lora_config ----------------------------------------------------------------------------------------


def test_the_config_gives_each_layer_its_rank_within_lora_all_and_keeps_the_scaling():
    model, candidates = tiny_llama(0, layers=2), llama_candidates(2)
    scores = {name: (index + 1) / len(candidates) for index, name in enumerate(candidates)}  # deeper: more
    costs = linear_costs(model, candidates)
    ranks = allocate_ranks(scores, costs, 4)
    ranked = get_peft_model(model, importance_lora_config(model, Selection(candidates, candidates, scores), 4, 8))
    assert lora_ranks(ranked, candidates) == ranks and len(set(ranks.values())) > 2
    for name in candidates:
        assert ranked.base_model.model.get_submodule(name).scaling["default"] == pytest.approx(2.0), name  # 8 / 4
    everywhere = get_peft_model(tiny_llama(0, layers=2), LoraConfig(r=4, lora_alpha=8, target_modules=candidates))
    room = min(cost for name, cost in costs.items() if ranks[name] < 8)  # the cheapest layer under the cap, 2 x 4
    assert trainable(everywhere) - room < trainable(ranked) <= trainable(everywhere)
    assert trainable(ranked) == rank_parameter_count(ranks, costs)


def test_with_rslora_the_scaling_stays_that_of_the_uniform_rank():
    model, candidates = tiny_llama(0, layers=2), llama_candidates(2)
    scores = {name: (index % 7 + 1) / 7 for index, name in enumerate(candidates)}
    config = importance_lora_config(model, Selection(candidates, candidates, scores), 4, 8, use_rslora=True)
    ranked = get_peft_model(model, config)
    assert len(set(lora_ranks(ranked, candidates).values())) > 2
    for name in candidates:
        assert ranked.base_model.model.get_submodule(name).scaling["default"] == pytest.approx(8 / 2), name


def test_the_adapter_saves_and_reloads_with_its_ranks_and_outputs(tmp_path):
    candidates = llama_candidates(2)
    scores = {name: (index % 5) / 4 for index, name in enumerate(candidates)}
    config = importance_lora_config(tiny_llama(0, layers=2), Selection(candidates, candidates, scores), 4, 8)
    ranked = get_peft_model(tiny_llama(0, layers=2), config)
    with torch.no_grad():
        for p in ranked.parameters():
            if p.requires_grad:
                p.normal_(0, 0.02)  # an update that changes the outputs
    ids = torch.arange(12)[None] % 50
    expected = ranked(input_ids=ids).logits
    assert not torch.allclose(expected, tiny_llama(0, layers=2)(input_ids=ids).logits, atol=1e-4)
    ranked.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(tiny_llama(0, layers=2), tmp_path / "adapter")
    assert lora_ranks(reloaded, candidates) == lora_ranks(ranked, candidates)
    assert torch.allclose(reloaded(input_ids=ids).logits, expected, atol=1e-6)


def test_layer_1_is_not_matched_by_layer_11_nor_layer_11_by_layer_1():
    model, candidates = tiny_llama(0, layers=12), llama_candidates(12)
    scores = {name: (index + 1) / len(candidates) for index, name in enumerate(candidates)}  # deeper: more
    config = importance_lora_config(model, Selection(candidates, candidates, scores), 2, 4, rho=8)
    allocated = allocate_ranks(scores, linear_costs(model, candidates), 2, 8)
    keys = {name: get_pattern_key(config.rank_pattern, name) for name in candidates}  # peft's own matching
    assert len(set(keys.values())) == len(candidates)  # each layer its own key
    assert {name: config.rank_pattern[key] for name, key in keys.items()} == allocated
    assert all(get_pattern_key(config.alpha_pattern, name) == key for name, key in keys.items())
    ranked = get_peft_model(model, config)
    one, eleven = "model.layers.1.self_attn.q_proj", "model.layers.11.self_attn.q_proj"
    ranks = lora_ranks(ranked, [one, eleven])
    assert ranks[one] == config.rank_pattern[keys[one]] != ranks[eleven] == config.rank_pattern[keys[eleven]]


class Twin(nn.Module):
    """A Llama body, and a second one under `shadow` whose module names end in the names of the first."""

    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_llama(0, layers=2).model
        self.shadow = tiny_llama(1, layers=2)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).last_hidden_state + self.shadow.model(input_ids).last_hidden_state


def test_only_the_candidates_are_adapted_even_where_other_names_end_in_theirs():
    own = llama_candidates(2)
    shadow = [f"shadow.{name}" for name in own]
    model = Twin()
    config = importance_lora_config(model, Selection(own, own, dict.fromkeys(own, 0.5)), 4, 8)
    assert [name for name, _ in model.named_modules() if check_target_module_exists(config, name)] == own
    scores = {**{name: 0.1 for name in own}, **{name: 1.0 for name in shadow}}
    both = own + shadow
    ranked = get_peft_model(Twin(), importance_lora_config(Twin(), Selection(both, both, scores), 4, 8))
    ranks = lora_ranks(ranked, both)
    assert ranks == allocate_ranks(scores, linear_costs(model, both), 4)
    assert all(ranks[name] < ranks[f"shadow.{name}"] for name in own)


def test_conv1d_layers_get_their_ranks():
    model = tiny_gpt2()
    candidates = find_candidates(model, ILAConfig())
    scores = {name: (index + 1) / len(candidates) for index, name in enumerate(candidates)}
    costs = linear_costs(model, candidates)
    assert costs["transformer.h.0.attn.c_attn"] == 32 + 96
    config = importance_lora_config(model, Selection(candidates, candidates, scores), 4, 8)
    assert config.fan_in_fan_out  # Conv1D keeps its weight as (in, out)
    assert lora_ranks(get_peft_model(model, config), candidates) == allocate_ranks(scores, costs, 4)


@pytest.mark.parametrize(
    ("name", "message"),
    [("model.layers.0.input_layernorm", "is a LlamaRMSNorm, not a linear layer"), ("model.layers.0", "granularity")],
)
def test_a_layer_that_is_not_linear_is_refused(name, message):
    model = tiny_llama(0, layers=2)
    with pytest.raises(ValueError, match=message):
        importance_lora_config(model, Selection([name], [name], {name: 1.0}), 4, 8)


def test_fields_the_config_sets_itself_are_refused():
    model, candidates = tiny_llama(0, layers=2), llama_candidates(2)
    with pytest.raises(ValueError, match=re.escape("sets ['target_modules']")):
        importance_lora_config(model, Selection.everything(candidates), 4, 8, target_modules=["q_proj"])
