"""`Selection` is the one truth of a layer selection: identification makes it with its provenance, and the config, the
saved tensors, the run directory and export all derive from it and agree with it exactly."""

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from conftest import common, identify, lm_batches, tiny_llama
from peft_ila import ILAConfig, Selection, identify_important_layers
from peft_ila.app.cli import main
from peft_ila.tuner import model_identity

PROBE = dict(r=2, top_k=4, stage1_max_steps=4, stability_window=2, stage2_steps=3, seed=0)


def test_model_identity_is_the_same_for_a_plain_model_and_one_wrapped_in_either_state():
    plain = model_identity(tiny_llama())
    probe = get_peft_model(tiny_llama(), ILAConfig(r=2, modules_to_save=["lm_head"]))
    assert model_identity(probe) == model_identity(probe.base_model) == plain
    probe.base_model.select_layers(probe.base_model.candidate_layers()[:3])
    assert model_identity(probe) == plain
    assert model_identity(tiny_llama(seed=1))["weights_sha256"] != plain["weights_sha256"]
    assert model_identity(tiny_llama(seed=1))["architecture_sha256"] == plain["architecture_sha256"]
    assert model_identity(tiny_llama(hidden=64))["architecture_sha256"] != plain["architecture_sha256"]


def identified(batches):
    model = get_peft_model(tiny_llama(), ILAConfig(**PROBE))
    return model, identify_important_layers(model, batches, progress=False)


def test_identification_records_its_provenance_in_the_selection_and_the_config():
    model, result = identified(lm_batches(4))
    provenance = result.selection.provenance
    config = model.peft_config["default"]
    assert provenance["estimator"] == config.estimator and provenance["settings"] == config.run_settings()
    assert provenance["base_model"] == model_identity(tiny_llama())
    assert provenance["data"]["micro_batches"] == result.stage1.steps + result.stage2.steps == 7
    assert config.provenance == provenance and model.base_model.selection() == result.selection
    _, again = identified(lm_batches(4))
    _, other = identified(lm_batches(4, seed=1))
    assert again.selection.provenance == provenance  # the same batches give the same fingerprint
    assert other.selection.provenance["data"]["sha256"] != provenance["data"]["sha256"]


def test_a_saved_adapter_holds_the_selection_in_config_and_tensors_and_loads_it_whole(tmp_path):
    model, result = identified(lm_batches(4))
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["selected_layers"] == result.selected and saved["provenance"] == result.selection.provenance
    assert Selection.from_tensors(load_file(tmp_path / "adapter_model.safetensors")).differences(result.selection) == []
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).base_model.selection()
    assert loaded.differences(result.selection) == [] and loaded.selected == result.selection.selected
    assert loaded.provenance == result.selection.provenance


def test_scores_given_in_float64_compare_equal_to_their_float32_tensors(tmp_path):
    names = [f"model.layers.{i}.mlp.up_proj" for i in range(2)]
    scores = {names[0]: 0.1, names[1]: 0.7}  # not float32 values
    model = get_peft_model(
        tiny_llama(), ILAConfig(r=2, target_modules=["up_proj"], selected_layers=names[:1], layer_scores=scores)
    )
    assert model.peft_config["default"].layer_scores[names[0]] == float(torch.tensor(0.1, dtype=torch.float32))
    model.save_pretrained(tmp_path)
    PeftModel.from_pretrained(tiny_llama(), tmp_path)  # one exact comparison, no tolerance needed


def test_export_reads_the_mask_and_refuses_weights_it_does_not_explain(work, run, tmp_path):
    adapter = tmp_path / "adapter"
    assert main(["train", *common(work, "--steps", "1"), "--mask", str(run), "--out", str(adapter)]) == 0
    assert main(["export-lora", str(adapter), str(tmp_path / "lora")]) == 0
    tensors = load_file(adapter / "adapter_model.safetensors")
    dropped = next(k for k in tensors if ".ila_A." in k)
    module = dropped.split(".ila_A.")[0]
    save_file(
        {k: v for k, v in tensors.items() if not k.startswith(module + ".ila_")}, adapter / "adapter_model.safetensors"
    )
    assert main(["export-lora", str(adapter), str(tmp_path / "lora2")]) == 2
    assert not (tmp_path / "lora2").exists()


def test_the_run_directory_and_the_adapter_trained_on_it_share_the_selection(work, run, tmp_path):
    record = json.loads((run / "importance.json").read_text())
    assert record["provenance"]["base_model"] == {k: v for k, v in record["base_model"].items() if k != "model"}
    adapter = tmp_path / "adapter"
    assert main(["train", *common(work, "--steps", "1"), "--mask", str(run), "--out", str(adapter)]) == 0
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["provenance"] == record["provenance"] and config["selected_layers"] == record["selected"]
    assert config["layer_scores"] == record["scores"]


def test_a_run_directory_whose_two_files_disagree_is_refused(work, run, tmp_path, capsys):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    record = json.loads((copy / "importance.json").read_text())
    record["scores"][record["selected"][0]] = 0.123
    (copy / "importance.json").write_text(json.dumps(record))
    assert main(["train", *common(work), "--mask", str(copy), "--out", str(tmp_path / "a")]) == 2
    assert "disagree on the scores" in capsys.readouterr().err


@pytest.mark.parametrize("k", [1, 3])
def test_top_and_within_take_the_best_of_the_ranking(k):
    selection = Selection(("a", "b", "c", "d"), ("c", "a"), {"a": 0.5, "b": 0.2, "c": 0.9, "d": 0.3})
    assert selection.ranking == ("c", "a", "d", "b")
    assert selection.top(k).selected == selection.ranking[:k]
    elsewhere = selection.within(("d", "a", "e"))
    assert elsewhere.selected == ("a",) and elsewhere.ranking == ("a", "d", "e") and "c" not in elsewhere.scores
    assert selection.within(("d", "a", "e"), k=2).selected == ("a", "d")
    with pytest.raises(ValueError, match="none of the selected layers"):
        selection.within(("b", "d"))


def test_identify_prints_the_confidence_line_and_reports_it(work, tmp_path, capsys):
    out = tmp_path / "run"
    identify(work, out)
    printed = capsys.readouterr().out
    record = json.loads((out / "importance.json").read_text())
    certain = sum(record["confidence"][n] >= 0.9 for n in record["selected"])
    assert f"top-29% set: {certain} of 4 layers certain at 90%" in printed  # 4 of 14 candidates
    assert "| rank | layer | score (first-order) | confidence |" in (out / "report.md").read_text()  # the default
    saved = Selection.from_tensors(load_file(out / "mask.safetensors"))
    assert saved.confidence == record["confidence"] and len(saved.confidence) == 14
