"""Any PEFT method on an ILA selection: `Selection.to_peft_config` targets exactly the selected modules."""

import pytest
import torch
from peft import AdaLoraConfig, IA3Config, LoraConfig, VeraConfig, get_peft_model
from torch import nn

from conftest import llama_candidates, lm_batches, tiny_llama
from peft_ila.tuner.selection import Selection

SELECTED = ("model.layers.1.mlp.down_proj", "model.layers.2.self_attn.o_proj", "model.layers.3.self_attn.q_proj")
METHODS = {
    "lora": LoraConfig(r=2),
    "dora": LoraConfig(r=2, use_dora=True),
    "adalora": AdaLoraConfig(init_r=4, target_r=2, total_step=10, tinit=1, tfinal=1, deltaT=1),
    "ia3": IA3Config(feedforward_modules=["down_proj"]),
    "vera": VeraConfig(r=4),
}
MARKERS = {"lora": "lora_A", "dora": "lora_A", "adalora": "lora_A", "ia3": "ia3_l", "vera": "vera_lambda_b"}


def selection() -> Selection:
    return Selection(tuple(llama_candidates()), SELECTED)


def adapted_modules(model, marker: str) -> set[str]:
    names = {n.split(f".{marker}")[0] for n, _ in model.named_parameters() if f".{marker}" in n}
    return {n.removeprefix("base_model.model.") for n in names}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_built_from_a_selection_adapts_exactly_it_and_trains(method):
    config = selection().to_peft_config(METHODS[method])
    assert METHODS[method].target_modules is None  # the given config is left as it was
    model = get_peft_model(tiny_llama(), config)
    assert adapted_modules(model, MARKERS[method]) == set(SELECTED)
    batch = lm_batches(1)[0]
    model(**batch).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_a_name_that_merely_ends_like_a_selected_one_is_not_adapted():
    class TwoModels(nn.Module):  # the draft holds "draft.model.layers.1.mlp.down_proj": it ends like a selected name
        def __init__(self):
            super().__init__()
            self.model, self.draft = tiny_llama().model, tiny_llama(seed=1)

    model = get_peft_model(TwoModels(), selection().to_peft_config(LoraConfig(r=2)))
    assert adapted_modules(model, "lora_A") == set(SELECTED)
    plain = get_peft_model(TwoModels(), LoraConfig(r=2, target_modules=list(SELECTED)))  # what suffixes would do
    assert len(adapted_modules(plain, "lora_A")) == 2 * len(SELECTED)


def test_target_modules_narrows_a_module_selection_and_is_required_for_blocks():
    narrowed = selection().to_peft_config(LoraConfig(r=2, target_modules=["q_proj", "o_proj"]))
    assert adapted_modules(get_peft_model(tiny_llama(), narrowed), "lora_A") == set(SELECTED[1:])
    blocks = Selection(("model.layers.0", "model.layers.1", "model.layers.2"), ("model.layers.1",))
    with pytest.raises(ValueError, match=r"selection is of blocks \(model.layers.1, ...\); name the modules"):
        blocks.to_peft_config(LoraConfig(r=2))
    in_block = blocks.to_peft_config(LoraConfig(r=2, target_modules=["q_proj", "down_proj"]))
    wanted = {"model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"}
    assert adapted_modules(get_peft_model(tiny_llama(), in_block), "lora_A") == wanted


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (LoraConfig(r=2, layers_to_transform=[1]), "leave `layers_to_transform` None"),
        (LoraConfig(r=2, target_modules=r".*q_proj"), "is a regular expression; pass None, 'all-linear' or a list"),
        (LoraConfig(r=2, target_modules=["k_proj"]), r"none of the 3 selected layers ends in one of \['k_proj'\]"),
    ],
)
def test_configs_that_cannot_say_the_selection_are_refused_with_the_fix(config, message):
    with pytest.raises(ValueError, match=message):
        selection().to_peft_config(config)


def test_adalora_on_a_selection_reallocates_its_budget():
    config = selection().to_peft_config(METHODS["adalora"])  # init_r 4, target_r 2: the budget halves
    model = get_peft_model(tiny_llama(), config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step, batch in enumerate(lm_batches(5) * 2):  # total_step 10: the final ranks are fixed at step 9
        model(**batch).loss.backward()
        optimizer.step()
        model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    pattern = model.peft_config["default"].rank_pattern
    assert {name.split(".lora_E")[0] for name in pattern} == set(SELECTED)
    kept = [sum(mask) for mask in pattern.values()]
    assert sum(kept) == 2 * len(SELECTED) and len(set(kept)) > 1  # half the ranks, not the same in every layer


def test_ila_callback_runs_adaloras_budget_steps_in_a_trainer(tmp_path):
    from transformers import Trainer, default_data_collator

    from conftest import lm_dataset, trainer_args
    from peft_ila import ILACallback

    model = get_peft_model(tiny_llama(), selection().to_peft_config(METHODS["adalora"]))  # total_step 10
    trainer = Trainer(model, trainer_args(tmp_path, max_steps=10), train_dataset=lm_dataset(10))
    trainer.data_collator = default_data_collator
    trainer.add_callback(ILACallback(trainer))
    trainer.train()
    pattern = model.peft_config["default"].rank_pattern  # fixed by update_and_allocate at the last step
    assert pattern is not None and sum(sum(mask) for mask in pattern.values()) == 2 * len(SELECTED)
