"""`peft-ila train --method`: LoRA, DoRA, AdaLoRA, QLoRA and full fine-tuning on an ILA mask, saved, reloaded and
evaluated."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import common
from peft_ila import load_selection
from peft_ila.app.cli import main

PEFT_TYPES = {"lora": "LORA", "dora": "LORA", "adalora": "ADALORA", "qlora": "LORA"}


@pytest.mark.parametrize("method", sorted(PEFT_TYPES))
def test_each_method_trains_exactly_the_masks_layers_and_eval_reproduces_its_loss(work, run, tmp_path, method):
    out = tmp_path / method
    assert (
        main(["train", *common(work, "--steps", "10"), "--mask", str(run), "--method", method, "--out", str(out)]) == 0
    )
    config = json.loads((out / "adapter_config.json").read_text())
    info = json.loads((out / "training.json").read_text())
    selected = json.loads((run / "importance.json").read_text())["selected"]
    assert config["peft_type"] == PEFT_TYPES[method] and config.get("use_dora", False) == (method == "dora")
    assert sorted(config["target_modules"].split("|")) == sorted(name.replace(".", "\\.") for name in selected)
    assert info["method"] == method and info["quantization"] == ("4bit" if method == "qlora" else None)
    assert info["loss_after"] < info["loss_before"]
    if method == "adalora":  # the budget was reallocated: ranks ceil(1.5 r) = 12 down to an average r = 8
        kept = [sum(mask) for mask in config["rank_pattern"].values()]
        assert len(kept) == len(selected) and sum(kept) == 8 * len(selected)
    assert main(["eval", str(out), "--json", str(tmp_path / "eval.json"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["held_out_loss"] == pytest.approx(info["loss_after"])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "dora"], "--method dora puts dora on a selection of layers: pass --mask RUN_DIR"),
        (["--method", "qlora", "--load-in-8bit", "--layers", "model.layers.0.mlp.up_proj"], "drop --load-in-8bit"),
        (["--method", "full", "--load-in-4bit", "--layers", "model.layers.0.mlp.up_proj"], "--method full trains"),
        (["--method", "full", "--all-layers", "--within-lora-params"], "pass --mask RUN_DIR (--layers and --all-"),
    ],
)
def test_methods_without_a_selection_or_with_a_clashing_base_are_refused(work, tmp_path, capsys, extra, message):
    assert main(["train", *common(work, "--steps", "1"), *extra, "--out", str(tmp_path / "x")]) == 2
    assert message in capsys.readouterr().err


def test_full_fine_tuning_saves_a_model_with_its_mask_that_only_differs_in_the_selected_weights(work, run, tmp_path):
    out = tmp_path / "full"
    assert (
        main(["train", *common(work, "--steps", "3"), "--mask", str(run), "--method", "full", "--out", str(out)]) == 0
    )
    tuned = AutoModelForCausalLM.from_pretrained(out).state_dict()
    base = AutoModelForCausalLM.from_pretrained(work / "lm").state_dict()
    selected = json.loads((run / "importance.json").read_text())["selected"]
    assert {n for n in base if not torch.equal(base[n], tuned[n])} == {f"{name}.weight" for name in selected}
    assert set(load_selection(out).selected) == set(selected)
    info = json.loads((out / "training.json").read_text())
    assert info["method"] == "full" and info["trainable_params"] == sum(base[f"{n}.weight"].numel() for n in selected)
    assert main(["eval", str(out), "--json", str(tmp_path / "eval.json"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["held_out_loss"] == pytest.approx(info["loss_after"])


def test_full_fine_tuning_within_lora_params_keeps_the_best_layers_that_fit_and_records_them(work, run, tmp_path):
    out = tmp_path / "sized"
    args = ["--mask", str(run), "--top-k", "1.0", "--method", "full", "--within-lora-params", "--out", str(out)]
    assert main(["train", *common(work, "--steps", "2"), *args]) == 0
    base = AutoModelForCausalLM.from_pretrained(work / "lm")
    ranking = json.loads((run / "importance.json").read_text())["ranking"]
    budget = sum(8 * (base.get_submodule(n).in_features + base.get_submodule(n).out_features) for n in ranking)
    kept = load_selection(out).selected
    sizes = {n: base.get_submodule(n).weight.numel() for n in ranking}
    assert sum(sizes[n] for n in kept) <= budget < sum(sizes.values()) and kept[0] == ranking[0]
    assert all(sum(sizes[k] for k in kept) + sizes[n] > budget for n in ranking if n not in kept)  # nothing else fits
    info = json.loads((out / "training.json").read_text())
    assert info["within_lora_params"] is True and info["layers"] == len(kept)
    tuned = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert {n for n, t in base.state_dict().items() if not torch.equal(t, tuned[n])} == {f"{n}.weight" for n in kept}
    bad = ["--mask", str(run), "--method", "lora", "--within-lora-params", "--out", str(tmp_path / "x")]
    assert main(["train", *common(work, "--steps", "1"), *bad]) == 2


def test_full_fine_tuning_can_save_only_the_changed_weights_and_eval_puts_them_back(work, run, tmp_path):
    out = tmp_path / "changed"
    args = ["--mask", str(run), "--method", "full", "--changed-only", "--out", str(out)]
    assert main(["train", *common(work, "--steps", "3"), *args]) == 0
    names = ["ila_changed.safetensors", "ila_mask.safetensors", "training.json"]
    assert sorted(p.name for p in out.iterdir()) == [".peft-ila.json", *names]
    info = json.loads((out / "training.json").read_text())
    assert info["changed_only"] is True
    assert main(["eval", str(out), "--json", str(tmp_path / "eval.json"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["held_out_loss"] == pytest.approx(info["loss_after"])


def test_changed_only_is_refused_for_an_adapter_method(work, run, tmp_path, capsys):
    args = ["--mask", str(run), "--method", "lora", "--changed-only", "--out", str(tmp_path / "x")]
    assert main(["train", *common(work, "--steps", "1"), *args]) == 2
    assert "--changed-only saves the weights a full fine-tune changed" in capsys.readouterr().err


def test_a_block_mask_puts_another_method_on_the_modules_ila_adapts_in_those_blocks(work, tmp_path):
    from conftest import identify

    blocks = tmp_path / "blocks"
    identify(work, blocks, "--granularity", "block", "--top-k", "1")
    (chosen,) = json.loads((blocks / "importance.json").read_text())["selected"]
    out = tmp_path / "lora-on-blocks"
    args = ["--mask", str(blocks), "--method", "lora", "--out", str(out)]
    assert main(["train", *common(work, "--steps", "2"), *args]) == 0
    targets = json.loads((out / "adapter_config.json").read_text())["target_modules"].split("|")
    linears = [f"self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    linears += [f"mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj")]  # every linear layer of a Llama block
    assert sorted(targets) == sorted(f"{chosen}.{name}".replace(".", "\\.") for name in linears)
