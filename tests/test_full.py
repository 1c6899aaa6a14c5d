"""Full fine-tuning of a selection: exactly the selected weights change, and the checkpoint keeps its mask."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import llama_candidates, lm_batches, tiny_llama
from peft_ila import (
    Selection,
    load_changed_weights,
    load_selection,
    save_with_selection,
    top_within_parameters,
    train_only_selected,
)

SELECTED = ("model.layers.1.mlp.down_proj", "model.layers.2.self_attn.o_proj", "model.layers.3.self_attn.q_proj")


def train(model, params, steps: int = 3) -> None:
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    for batch in lm_batches(steps):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_exactly_the_selected_weights_change_and_the_checkpoint_reloads_with_its_mask(tmp_path):
    selection = Selection(tuple(llama_candidates()), SELECTED, {name: 1.0 for name in SELECTED})
    model = tiny_llama()
    before = {name: p.detach().clone() for name, p in model.state_dict().items()}
    params = train_only_selected(model, selection)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [f"{n}.weight" for n in sorted(SELECTED)]
    assert len(params) == len(SELECTED)
    model.train()
    train(model, params)
    after = model.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == {f"{name}.weight" for name in SELECTED}  # every other tensor bit-identical
    save_with_selection(model, selection, tmp_path / "full")
    assert sorted(p.name for p in (tmp_path / "full").glob("*.safetensors")) == [
        "ila_mask.safetensors",
        "model.safetensors",
    ]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "full")
    assert all(torch.equal(reloaded.state_dict()[name], value) for name, value in after.items())
    assert load_selection(tmp_path / "full").differences(selection) == []


def test_a_selected_block_trains_whole_and_backward_stops_below_the_lowest_selected_layer():
    model = tiny_llama()
    blocks = tuple(f"model.layers.{i}" for i in range(4))
    params = train_only_selected(model, Selection(blocks, ("model.layers.2",)))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if n.startswith("model.layers.2.")
    }
    seen = []
    model.model.layers[1].register_forward_hook(lambda m, args, out: seen.append(out[0].requires_grad))
    model(**lm_batches(1)[0]).loss.backward()
    assert seen == [False] and all(p.grad is not None for p in params)


def test_a_selection_from_another_model_is_refused_by_name():
    other = Selection(("model.layers.9.mlp.up_proj",), ("model.layers.9.mlp.up_proj",))
    with pytest.raises(ValueError, match=r"no module 'model.layers.9.mlp.up_proj' \(1 of 1 selected layers missing\)"):
        train_only_selected(tiny_llama(), other)


def test_a_changed_only_save_holds_just_the_selected_tensors_and_restores_the_fine_tune_on_its_base(tmp_path):
    selection = Selection(tuple(llama_candidates()), SELECTED, {name: 1.0 for name in SELECTED})
    model = tiny_llama()
    model.train()
    train(model, train_only_selected(model, selection))
    save_with_selection(model, selection, tmp_path / "changed", changed_only=True)
    assert sorted(p.name for p in (tmp_path / "changed").iterdir()) == [
        "ila_changed.safetensors",
        "ila_mask.safetensors",
    ]
    base = tiny_llama()  # the same seed: the weights the fine-tune started from
    assert not torch.equal(base.state_dict()[f"{SELECTED[0]}.weight"], model.state_dict()[f"{SELECTED[0]}.weight"])
    assert load_changed_weights(base, tmp_path / "changed").differences(selection) == []
    assert all(torch.equal(base.state_dict()[name], value) for name, value in model.state_dict().items())


def test_changed_weights_refuse_another_base_and_leave_it_untouched(tmp_path):
    selection = Selection(tuple(llama_candidates()), SELECTED)
    model = tiny_llama()
    save_with_selection(model, selection, tmp_path / "changed", changed_only=True)
    other = tiny_llama()
    with torch.no_grad():
        other.model.layers[0].mlp.up_proj.weight.add_(1.0)  # not a selected layer: another base
    before = {name: value.clone() for name, value in other.state_dict().items()}
    with pytest.raises(ValueError, match="trained from other weights than this model's"):
        load_changed_weights(other, tmp_path / "changed")
    assert all(torch.equal(before[name], value) for name, value in other.state_dict().items())
    with pytest.raises(FileNotFoundError, match="was not saved with changed_only=True"):
        load_changed_weights(other, tmp_path)


def test_the_top_layers_within_a_parameter_budget_skip_one_too_large_for_what_is_left():
    model, candidates = tiny_llama(), llama_candidates()
    q, gate, k = "model.layers.1.self_attn.q_proj", "model.layers.0.mlp.gate_proj", "model.layers.2.self_attn.k_proj"
    ranked = (q, gate, k, *(name for name in candidates if name not in (q, gate, k)))
    selection = Selection(tuple(candidates), (q,), ranking=ranked)
    size = {name: model.get_submodule(name).weight.numel() for name in (q, gate, k)}
    assert size[gate] > size[k]
    chosen = top_within_parameters(model, selection, size[q] + size[k])
    assert chosen.selected == (q, k) and chosen.candidates == selection.candidates
    assert top_within_parameters(model, selection, size[q] + size[gate]).selected[:2] == (q, gate)
    with pytest.raises(ValueError, match="no layer fits in 10 parameters"):
        top_within_parameters(model, selection, 10)
