"""ILA inside transformers.Trainer and TRL's SFTTrainer; gradient checkpointing and bf16 in both states."""

from __future__ import annotations

import json
import types

import datasets
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from peft import PeftModel, get_peft_model
from transformers import Trainer, TrainerCallback, default_data_collator

from conftest import alpaca_rows, lm_batches, lm_dataset, tiny_llama, tiny_lm_dir, trainer_args
from peft_ila import ILACallback, ILAConfig, ILALoadError, identify_important_layers
from peft_ila.identification.callback import REPORT_NAME, keep_trainable_only
from peft_ila.identification.training import cycle, train_steps

PROBE = dict(r=2, top_k=4, stage1_max_steps=12, stability_window=3, stage2_steps=6, gate_lr=0.2, seed=1)


class Snapshot(TrainerCallback):
    """Records the model's parameters as the fine-tune starts (after ILACallback, which runs before it)."""

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.params = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.optimizer_params = {id(p) for g in optimizer.param_groups for p in g["params"]}
        self.trainable = {n for n, p in model.named_parameters() if p.requires_grad}


def test_trainer_identifies_first_then_trains_only_the_selected_layers(tmp_path):
    model = get_peft_model(tiny_llama(), ILAConfig(**PROBE))
    args = trainer_args(tmp_path / "out")
    trainer = Trainer(model, args, train_dataset=lm_dataset(), data_collator=default_data_collator)
    ila, snapshot = ILACallback(trainer), Snapshot()
    trainer.add_callback(ila)
    trainer.add_callback(snapshot)
    trainer.train()

    selected = ila.result.selected
    assert len(selected) == 4 and model.peft_config["default"].selected_layers == selected
    owners = {n.split(".ila_")[0].removeprefix("base_model.model.") for n in snapshot.trainable}
    assert owners == set(selected)  # after identification only the selected layers carry trainable parameters
    assert snapshot.optimizer_params == {id(p) for p in model.parameters() if p.requires_grad}  # no gates, no rest
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, snapshot.params[n])}
    assert changed == snapshot.trainable  # the selected adapters moved, nothing else did
    assert trainer.state.global_step == 4  # identification steps are not counted as training steps
    logged = next(h for h in trainer.state.log_history if "ila/stage1_steps" in h)
    assert logged["ila/stage1_steps"] == ila.result.stage1.steps > 0 and logged["ila/selected_layers"] == 4
    report = json.loads((tmp_path / "out" / REPORT_NAME).read_text())
    assert report["selected"] == selected and report["stage2"]["steps"] == 6
    assert trainer.accelerator.gradient_accumulation_steps == 1  # the trainer's loss scaling is untouched
    trainer.save_model(str(tmp_path / "saved"))
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "saved")
    assert loaded.peft_config["default"].selected_layers == selected


def test_resuming_from_a_checkpoint_keeps_the_selection_and_ends_as_the_uninterrupted_run(tmp_path):
    def run(resume_from=None):
        model = get_peft_model(tiny_llama(), ILAConfig(**PROBE))
        if resume_from is not None:  # the checkpoint was taken after ILACallback selected: take its selection first
            assert model.base_model.select_as_saved(resume_from)
        args = trainer_args(tmp_path / "out", save_strategy="steps", save_steps=2)
        trainer = Trainer(model, args, train_dataset=lm_dataset(), data_collator=default_data_collator)
        ila = ILACallback(trainer)
        trainer.add_callback(ila)
        trainer.train(resume_from_checkpoint=resume_from)
        return model, ila.result

    whole, result = run()
    resumed, again = run(tmp_path / "out" / "checkpoint-2")  # a fresh probe model, as a restarted job builds it
    assert again is None  # no second identification: the model already has the checkpoint's selection
    assert resumed.peft_config["default"].selected_layers == result.selected
    assert resumed.peft_config["default"].layer_scores == result.scores
    final, expected = dict(resumed.named_parameters()), dict(whole.named_parameters())
    assert final.keys() == expected.keys() and all(torch.equal(final[n], expected[n]) for n in final)
    assert resumed.peft_config["default"].provenance == whole.peft_config["default"].provenance


def test_loading_a_selection_into_a_probe_model_is_refused_and_names_the_step_that_applies_it(tmp_path):
    model = get_peft_model(tiny_llama(), ILAConfig(**PROBE))
    model.save_pretrained(tmp_path / "probe")
    identify_important_layers(model, lm_batches(4), progress=False)
    model.save_pretrained(tmp_path / "selected")
    probe = get_peft_model(tiny_llama(), ILAConfig(**PROBE))
    with pytest.raises(ILALoadError, match=r"select_as_saved\(<that directory>, 'default'\)"):
        probe.load_adapter(tmp_path / "selected", "default")
    assert probe.peft_config["default"].selected_layers is None  # loading only checked: still the probe state
    assert not probe.base_model.select_as_saved(tmp_path / "probe")  # a probe save holds no selection
    assert probe.base_model.select_as_saved(tmp_path / "selected")
    probe.load_adapter(tmp_path / "selected", "default")
    assert probe.base_model.selection() == model.base_model.selection()


def test_callback_without_trainer_uses_accumulation_and_logs_to_state(tmp_path):
    model = get_peft_model(tiny_llama(), ILAConfig(**PROBE))
    args = trainer_args(tmp_path / "out", max_steps=2, gradient_accumulation_steps=2)
    trainer = Trainer(model, args, train_dataset=lm_dataset(), data_collator=default_data_collator)
    ila = ILACallback()
    trainer.add_callback(ila)
    trainer.train()
    assert ila.result.stage1.tokens == ila.result.stage1.steps * 2 * 4 * 12  # two micro-batches per step
    assert any(h.get("ila/stage2_steps") == 6 for h in trainer.state.log_history)
    assert trainer.accelerator.gradient_accumulation_steps == 1


def test_a_selected_model_is_left_as_it_is(tmp_path):
    model = get_peft_model(tiny_llama(), ILAConfig(r=2, selected_layers=["model.layers.1.mlp.up_proj"]))
    trainer = Trainer(model, trainer_args(tmp_path / "out", max_steps=1), train_dataset=lm_dataset(2))
    ila = ILACallback(trainer)
    trainer.add_callback(ila)
    trainer.train()
    assert ila.result is None and model.peft_config["default"].selected_layers == ["model.layers.1.mlp.up_proj"]


def test_sft_trainer_with_the_callback(tmp_path):
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm = tiny_lm_dir(tmp_path / "lm")
    rows = [
        {"messages": [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]}
        for r in alpaca_rows(24)
    ]
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(lm), ILAConfig(task_type="CAUSAL_LM", **PROBE))
    args = trl.SFTConfig(
        str(tmp_path / "sft"),
        max_steps=2,
        per_device_train_batch_size=4,
        max_length=64,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        activation_checkpointing=True,
    )
    trainer = trl.SFTTrainer(
        model, args, train_dataset=datasets.Dataset.from_list(rows), processing_class=AutoTokenizer.from_pretrained(lm)
    )
    ila = ILACallback(trainer)
    trainer.add_callback(ila)
    trainer.train()
    assert len(ila.result.selected) == 4 and trainer.state.global_step == 2
    trainable = {n.split(".ila_")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert {n.removeprefix("base_model.model.") for n in trainable} == set(ila.result.selected)


def test_keep_trainable_only_drops_parameters_and_their_state():
    keep, drop = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    model = torch.nn.ParameterList([keep, drop])
    optimizer = torch.optim.AdamW([keep, drop])
    (keep.sum() + drop.sum()).backward()
    optimizer.step()
    drop.requires_grad_(False)
    keep_trainable_only(optimizer, model)
    assert optimizer.param_groups[0]["params"] == [keep] and list(optimizer.state) == [keep]


def block_outputs_needing_grad(model, base, batch) -> dict[int, bool]:
    seen = {}

    def record(i: int):
        def hook(module, args, out) -> None:
            seen.setdefault(i, out.requires_grad)

        return hook

    for i, layer in enumerate(base.model.layers):
        layer.register_forward_hook(record(i))
    model(**batch).loss.backward()
    return seen


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_backward_stops_at_the_lowest_adapted_block(reentrant):
    base = tiny_llama()
    base.activation_checkpointing_enable({"use_reentrant": reentrant})
    model = get_peft_model(base, ILAConfig(r=2, selected_layers=["model.layers.2.mlp.up_proj"])).train()
    seen = block_outputs_needing_grad(model, base, lm_batches(1)[0])
    assert seen == {0: False, 1: False, 2: True, 3: True}  # blocks 0 and 1 run forward only
    adapter = [p for p in model.parameters() if p.requires_grad]
    assert len(adapter) == 2 and all(p.grad is not None for p in adapter)
    assert adapter[1].grad.abs().sum() > 0  # B (A's gradient is 0 while B is still 0)
    assert model.merge_and_unload() is base and not base.model.layers[2]._forward_pre_hooks  # no hook left behind

    probe = tiny_llama()
    probe.activation_checkpointing_enable({"use_reentrant": reentrant})
    probe_model = get_peft_model(probe, ILAConfig(r=2)).train()
    assert block_outputs_needing_grad(probe_model, probe, lm_batches(1)[0]) == dict.fromkeys(range(4), True)
    for name, p in probe_model.named_parameters():  # a frozen adapter needs no gradient from below
        if ".ila_" in name and (".layers.0." in name or ".layers.1." in name):
            p.requires_grad_(False)
    assert block_outputs_needing_grad(probe_model, probe, lm_batches(1)[0]) == {0: False, 1: False, 2: True, 3: True}


@pytest.fixture
def bf16():
    AcceleratorState._reset_state(reset_partial_state=True)
    yield Accelerator(mixed_precision="bf16")
    AcceleratorState._reset_state(reset_partial_state=True)


def test_bf16_autocast_and_checkpointing_in_both_states(bf16):
    base = tiny_llama()
    base.activation_checkpointing_enable()
    model = get_peft_model(base, ILAConfig(**PROBE))
    batches = lm_batches(4, seed=1)
    result = identify_important_layers(model, batches, progress=False, accelerator=bf16)
    assert len(result.selected) == 4 and all(0 <= g <= 1 for g in result.scores.values())
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    stats = train_steps(model, cycle(batches), torch.optim.AdamW(params, lr=1e-2), 3, bf16, progress=False)
    assert all(torch.isfinite(torch.tensor(stats.losses))) and len(params) == 8
    assert all(not torch.equal(b, p) for b, p in zip(before, params, strict=True))


@pytest.mark.parametrize(
    ("trainer", "refusal"),
    [
        (types.SimpleNamespace(is_deepspeed_enabled=True), "cannot identify under DeepSpeed.*deepspeed_zero3.py"),
        (
            types.SimpleNamespace(
                accelerator=types.SimpleNamespace(
                    state=types.SimpleNamespace(fsdp_plugin=types.SimpleNamespace(fsdp_version=1))
                )
            ),
            "works under FSDP2, not FSDP1.*fsdp_version",
        ),
    ],
    ids=["deepspeed", "fsdp1"],
)
def test_setups_ila_cannot_serve_are_refused_in_one_line_before_identification(tmp_path, trainer, refusal):
    model = get_peft_model(tiny_llama(), ILAConfig(**PROBE))
    with pytest.raises(ValueError, match=refusal) as raised:
        ILACallback(trainer).on_train_begin(trainer_args(tmp_path / "out"), None, None, model=model)
    assert "\n" not in str(raised.value)
    assert model.peft_config["default"].selected_layers is None
