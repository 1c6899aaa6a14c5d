"""Sampled layerwise training: reproducible draws, only the active set changes, a resume mid-interval is exact."""

import collections
import copy
import types

import pytest
import torch
from transformers import Trainer, default_data_collator

from conftest import llama_candidates, lm_batches, lm_dataset, tiny_llama, trainer_args
from peft_ila import LayerwiseCallback
from peft_ila.tuner.layerwise import LayerSampler, LayerwiseConfig, block_groups, block_importance

BLOCKS = [f"model.layers.{i}" for i in range(4)]


def sampler(model, **fields) -> LayerSampler:
    importance = fields.pop("importance", None)
    return LayerSampler(block_groups(model, llama_candidates()), LayerwiseConfig(**fields), importance)


def train(model, layerwise: LayerSampler, steps: range, optimizer=None):
    """AdamW steps `steps` (weight decay on) over the sampler's parameters; the optimizer, for a later resume."""
    optimizer = optimizer or torch.optim.AdamW(layerwise.parameters(), lr=1e-2, weight_decay=0.1)
    batches = lm_batches(4)
    model.train()
    for step in steps:
        layerwise.at_step(step, optimizer)
        model(**batches[step % len(batches)]).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return optimizer


def test_draws_are_reproducible_from_the_seed_and_cover_every_group():
    first, again, other = (sampler(tiny_llama(), active=1, seed=s) for s in (0, 0, 1))
    draws = [first.draw(i) for i in range(40)]
    assert draws == [again.draw(i) for i in range(40)] and draws != [other.draw(i) for i in range(40)]
    assert {block for draw in draws for block in draw} == set(BLOCKS)
    assert all(len(draw) == 1 for draw in draws) and len(sampler(tiny_llama(), active=0.5).draw(0)) == 2


def test_importance_weights_the_draws_and_a_uniform_share_keeps_every_group_possible():
    importance = {"model.layers.0": 0.0, "model.layers.1": 1.0, "model.layers.2": 3.0, "model.layers.3": 0.0}
    weighted = sampler(tiny_llama(), active=1, importance_weight=1.0, importance=importance)
    counts = collections.Counter(weighted.draw(i)[0] for i in range(400))
    assert (
        set(counts) == {"model.layers.1", "model.layers.2"} and counts["model.layers.2"] > 2 * counts["model.layers.1"]
    )
    mixed = sampler(tiny_llama(), active=1, importance_weight=0.5, importance=importance)
    assert mixed.probabilities["model.layers.0"] == pytest.approx(0.125) and sum(mixed.probabilities.values()) == 1
    assert block_importance({"model.layers.1.mlp.up_proj": 0.25, "model.layers.1.mlp.down_proj": 0.5}) == {
        "model.layers.1": 0.75
    }
    with pytest.raises(ValueError, match="needs an importance for every group"):
        sampler(tiny_llama(), importance_weight=0.5)


def test_in_an_interval_only_the_active_groups_change_and_leaving_groups_lose_their_optimizer_state():
    model = tiny_llama()
    layerwise = sampler(model, active=1, interval=3)
    before = copy.deepcopy(model.state_dict())
    optimizer = train(model, layerwise, range(3))
    after = model.state_dict()
    active = {p for name in layerwise.active for p in layerwise.groups[name]}
    names = {id(p): n for n, p in model.named_parameters()}
    changed = {n for n, t in after.items() if not torch.equal(t, before[n])}
    assert changed == {names[id(p)] for p in active}  # every other tensor, weight decay included, bit-identical
    assert set(optimizer.state) == active
    drawn = next(i for i in range(1, 40) if layerwise.draw(i) != layerwise.active)
    train(model, layerwise, range(3 * drawn, 3 * drawn + 1), optimizer)
    assert set(optimizer.state) == {p for name in layerwise.active for p in layerwise.groups[name]}


def test_a_run_resumed_mid_interval_ends_with_the_uninterrupted_run_s_weights():
    whole = tiny_llama()
    train(whole, sampler(whole, active=2, interval=3), range(8))
    first = tiny_llama()
    optimizer = train(first, sampler(first, active=2, interval=3), range(4))
    saved = copy.deepcopy(first.state_dict()), copy.deepcopy(optimizer.state_dict())
    resumed = tiny_llama(seed=5)  # another initialisation: everything comes from the saved state
    resumed.load_state_dict(saved[0])
    layerwise = sampler(resumed, active=2, interval=3)
    again = torch.optim.AdamW(layerwise.parameters(), lr=1e-2, weight_decay=0.1)
    again.load_state_dict(saved[1])
    train(resumed, layerwise, range(4, 8), again)
    assert all(
        torch.equal(a, b) for a, b in zip(whole.state_dict().values(), resumed.state_dict().values(), strict=True)
    )


def test_bad_settings_are_refused_with_the_fix():
    for fields, message in (
        (dict(active=0), "give a count >= 1 or a fraction"),
        (dict(interval=0), "whole number of steps >= 1"),
        (dict(importance_weight=1.5), r"a value in \[0, 1\]"),
        (dict(temperature=0.0), "a value > 0"),
    ):
        with pytest.raises(ValueError, match=message):
            LayerwiseConfig(**fields)


def trainer_run(out, max_steps: int, resume_from=None, prepare: bool = True):
    """A Trainer fine-tune of a tiny Llama's block weights, 1 of 4 blocks active, re-drawn every 3 steps."""
    model = tiny_llama()
    layerwise = sampler(model, active=1, interval=3)
    if prepare:
        layerwise.train_only_groups(model)
    else:  # a model frozen before the groups were made trainable: the trainer's optimizer gets none of them
        model.requires_grad_(False)
    args = trainer_args(out, max_steps=max_steps, save_strategy="steps", save_steps=2, weight_decay=0.1)
    trainer = Trainer(model, args, train_dataset=lm_dataset(), data_collator=default_data_collator)
    trainer.add_callback(LayerwiseCallback(layerwise))
    trainer.train(resume_from_checkpoint=resume_from)
    return model, layerwise


def test_the_trainer_callback_trains_the_active_set_only_and_resumes_mid_interval_exactly(tmp_path):
    before = tiny_llama().state_dict()
    model, layerwise = trainer_run(tmp_path / "short", 3)
    changed = {n for n, t in model.state_dict().items() if not torch.equal(t, before[n])}
    names = {id(p): n for n, p in model.named_parameters()}
    assert changed == {names[id(p)] for name in layerwise.active for p in layerwise.groups[name]}
    whole, _ = trainer_run(tmp_path / "out", 6)
    resumed, _ = trainer_run(tmp_path / "out", 6, tmp_path / "out" / "checkpoint-4")  # step 4: mid-interval
    assert all(
        torch.equal(a, b) for a, b in zip(whole.state_dict().values(), resumed.state_dict().values(), strict=True)
    )


def test_the_trainer_callback_refuses_an_optimizer_without_the_groups(tmp_path):
    with pytest.raises(ValueError, match=r"call sampler.train_only_groups\(model\) before creating the Trainer"):
        trainer_run(tmp_path, 2, prepare=False)


def test_the_trainer_callback_under_ddp_refuses_to_skip_unused_parameters(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)  # a process group runs: DDP may wrap
    model = tiny_llama()
    layerwise = sampler(model, active=1)
    args = types.SimpleNamespace(ddp_find_unused_parameters=False)
    with pytest.raises(ValueError, match="needs TrainingArguments\\(ddp_find_unused_parameters=None or True\\)"):
        LayerwiseCallback(layerwise).on_train_begin(args, None, None, optimizer=None)


def test_the_library_s_fine_tune_trains_a_sampler_s_active_sets_only(tmp_path):
    import json

    from conftest import alpaca_rows, tiny_lm_dir
    from peft_ila.app.pipeline import finetune, prepare

    (tmp_path / "data.json").write_text(json.dumps(alpaca_rows(24)))
    prepared = prepare(str(tiny_lm_dir(tmp_path / "lm", layers=4)), str(tmp_path / "data.json"), 64, eval_size=4)
    model = prepared.model
    before = copy.deepcopy(model.state_dict())
    layerwise = sampler(model, active=1, interval=2)
    report = finetune(model, prepared, 4, 1e-2, 2, 0, progress=False, sampler=layerwise)
    drawn = {block for i in range(2) for block in layerwise.draw(i)}
    changed = {n.rsplit(".", 3)[0] for n, t in model.state_dict().items() if not torch.equal(t, before[n])}
    assert changed == drawn and report.steps == 4
    one_block = sum(p.numel() for p in layerwise.groups["model.layers.0"])
    assert report.trainable_params == one_block  # parameters trained at once, not all the groups'


@pytest.mark.parametrize(("method", "where"), [("full", "mask"), ("ila", "mask"), ("full", "all-layers")])
def test_train_layerwise_trains_drawn_blocks_only_and_the_result_reloads(work, run, tmp_path, method, where):
    import json

    from transformers import AutoModelForCausalLM

    from conftest import common
    from peft_ila.app.cli import main

    out = tmp_path / method
    weight = 0.5 if where == "mask" else 0.0  # every candidate, drawn uniformly: LISA, no identification needed
    layerwise = ["--layerwise", "1", "--layerwise-interval", "2", "--layerwise-importance", str(weight)]
    layers = ["--mask", str(run), "--top-k", "1.0"] if where == "mask" else ["--all-layers"]
    args = ["train", *common(work, "--steps", "4"), *layers, "--method", method]
    assert main([*args, *layerwise, "--out", str(out)]) == 0
    info = json.loads((out / "training.json").read_text())
    assert info["layerwise"] == {
        "active": 1,
        "interval": 2,
        "importance_weight": weight,
        "temperature": 1.0,
        "seed": 0,
        "blocks": 2,  # the tiny model's two blocks, every candidate of each
    }
    if method == "full":  # a plain checkpoint: only weights of the blocks drawn changed
        tuned = AutoModelForCausalLM.from_pretrained(out).state_dict()
        base = AutoModelForCausalLM.from_pretrained(work / "lm").state_dict()
        changed = {n.rsplit(".", 3)[0] for n in base if not torch.equal(base[n], tuned[n])}
        assert changed and changed <= {"model.layers.0", "model.layers.1"}
    assert main(["eval", str(out), "--json", str(tmp_path / "eval.json"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["held_out_loss"] == pytest.approx(info["loss_after"])


def test_train_layerwise_refuses_importance_without_a_mask(work, tmp_path, capsys):
    from conftest import common
    from peft_ila.app.cli import main

    args = ["train", *common(work, "--steps", "1"), "--all-layers", "--layerwise", "1", "--layerwise-importance", "1"]
    assert main([*args, "--out", str(tmp_path / "x")]) == 2
    assert "--layerwise-importance weighs the draws by a mask's scores: pass --mask RUN_DIR" in capsys.readouterr().err


def test_train_can_start_its_fine_tune_from_the_inline_identification_s_adapters(work, tmp_path, capsys):
    import json

    from conftest import common
    from peft_ila.app.cli import main

    budget = ["--steps", "2", "--stage1-max-steps", "6", "--stage2-steps", "3"]
    runs = {}
    for kept in (False, True):  # kept: train's default when it identifies
        out = tmp_path / f"kept-{kept}"
        flag = [] if kept else ["--no-keep-stage1-weights"]
        assert main(["train", *common(work, *budget, *flag), "--out", str(out)]) == 0
        runs[kept] = json.loads((out / "training.json").read_text())
    # both start from the base model's held-out loss (reset adapters, B = 0, leave it; a kept run measures it before
    # identifying), and only the kept one reaches the fine-tune changed by stage 1
    assert runs[False]["loss_before"] == pytest.approx(runs[True]["loss_before"], rel=1e-6)
    assert runs[True]["loss_after_identification"] != runs[True]["loss_before"]
    assert "loss_after_identification" not in runs[False]
    assert (tmp_path / "kept-True-identify" / "importance.json").exists()
    assert (
        main(
            [
                "train",
                *common(work, "--steps", "1", "--all-layers", "--keep-stage1-weights"),
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert "nothing is identified: drop it" in capsys.readouterr().err


def test_a_fine_tune_that_skips_batches_goes_on_where_the_data_order_left_off(tmp_path):
    import json

    from conftest import alpaca_rows, tiny_lm_dir
    from peft_ila.app.pipeline import finetune, prepare

    (tmp_path / "data.json").write_text(json.dumps(alpaca_rows(24)))
    prepared = prepare(str(tiny_lm_dir(tmp_path / "lm")), str(tmp_path / "data.json"), 64, eval_size=4)
    seen = []

    def record(module, args, kwargs):
        if torch.is_grad_enabled():  # a training step's forward (held-out losses are taken without autograd)
            seen.append(kwargs["input_ids"].clone())

    prepared.model.register_forward_pre_hook(record, with_kwargs=True)
    for p in prepared.model.parameters():
        p.requires_grad_(False)
    prepared.model.lm_head.weight.requires_grad_(True)
    finetune(prepared.model, prepared, 2, 1e-3, 2, 0, progress=False, skip=3)
    order = [batch["input_ids"] for batch in prepared.batches(2, 0)]
    assert len(seen) == 2 and all(torch.equal(a, b) for a, b in zip(seen, order[3:5], strict=True))


def test_train_hands_the_inline_identification_s_scores_to_the_layerwise_draws(work, tmp_path):
    """Identification inside the fine-tune, then its adapters drawn by its own scores: the draws follow the scores
    the run directory stored, and the result reloads."""
    import json

    from conftest import common
    from peft_ila.app.cli import main
    from peft_ila.tuner.layerwise import draw_probabilities

    out = tmp_path / "inside"
    budget = ["--steps", "3", "--stage1-max-steps", "4", "--stage2-steps", "2", "--top-k", "1.0"]
    layerwise = ["--keep-stage1-weights", "--layerwise", "1", "--layerwise-interval", "1"]
    layerwise += ["--layerwise-importance", "1"]
    assert main(["train", *common(work, *budget, *layerwise), "--out", str(out)]) == 0
    scores = json.loads((tmp_path / "inside-identify" / "importance.json").read_text())["scores"]
    importance = block_importance(scores)
    expected = draw_probabilities(sorted(importance), LayerwiseConfig(importance_weight=1.0), importance)
    assert len(set(expected.values())) == 2  # the two blocks' scores differ: the draws are not uniform
    info = json.loads((out / "training.json").read_text())
    assert info["layerwise"]["importance_weight"] == 1.0 and info["layerwise"]["blocks"] == 2
    assert main(["eval", str(out), "--json", str(tmp_path / "eval.json"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["held_out_loss"] == pytest.approx(info["loss_after"])
