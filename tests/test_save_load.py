"""Save and load: the mask travels in adapter_model.safetensors; a fresh process rebuilds the same model; every
disagreement between the files, or with the base model, is refused."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from conftest import llama_candidates, lm_batches, tiny_gpt2, tiny_llama
from peft_ila import ILAConfig, ILALayer, ILALoadError, identify_important_layers

MASK_KEYS = ["base_model.ila_layer_names", "base_model.ila_layer_mask", "base_model.ila_layer_scores"]  # README
CONFIDENCE_KEY = "base_model.ila_layer_confidence"


@pytest.fixture
def saved(tmp_path):
    """A base model directory and a trained, identified ILA adapter saved next to it."""
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    base = LlamaForCausalLM.from_pretrained(tmp_path / "base")
    model = get_peft_model(
        base,
        ILAConfig(task_type="CAUSAL_LM", r=4, top_k=5, stage1_max_steps=10, stage2_steps=5, keep_stage1_weights=True),
    )
    result = identify_important_layers(model, lm_batches(3), progress=False)
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path, model, result


def test_mask_and_scores_are_in_the_safetensors(saved):
    tmp_path, _model, result = saved
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    names = bytes(tensors[MASK_KEYS[0]].tolist()).decode().split("\n")
    assert names == llama_candidates()
    mask, scores = tensors[MASK_KEYS[1]], tensors[MASK_KEYS[2]]
    assert mask.dtype == torch.bool and scores.dtype == torch.float32
    assert [n for n, m in zip(names, mask.tolist(), strict=True) if m] == [n for n in names if n in result.selected]
    assert scores.tolist() == pytest.approx([result.scores[n] for n in names])
    assert tensors[CONFIDENCE_KEY].tolist() == [result.selection.confidence[n] for n in names]
    weights = [k for k in tensors if k not in [*MASK_KEYS, CONFIDENCE_KEY]]
    assert len(weights) == 2 * 5 and all(".ila_A.weight" in k or ".ila_B.weight" in k for k in weights)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "ILA" and config["selected_layers"] == result.selected
    assert config["layer_scores"] == pytest.approx(result.scores)
    assert isinstance(PeftConfig.from_pretrained(tmp_path / "adapter"), ILAConfig)


FRESH_PROCESS = textwrap.dedent(
    """
    import sys, torch
    import peft_ila
    from peft import AutoPeftModelForCausalLM, PeftModel
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    base_dir, adapter_dir, io_dir = sys.argv[1:]
    inputs = load_file(io_dir + "/inputs.safetensors")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
    wrapped = sorted(n for n, m in model.named_modules() if isinstance(m, peft_ila.ILALayer))
    assert len(wrapped) == 5, wrapped
    out = {"loaded": model(**inputs).logits}
    out["merged"] = model.merge_and_unload()(**inputs).logits
    out["auto"] = AutoPeftModelForCausalLM.from_pretrained(adapter_dir)(**inputs).logits
    save_file({k: v.contiguous() for k, v in out.items()}, io_dir + "/outputs.safetensors")
    """
)


def test_save_load_in_a_fresh_process_gives_equal_logits(saved, inputs):
    tmp_path, model, _ = saved
    model.eval()
    expected = model(**inputs).logits
    save_file(inputs, tmp_path / "inputs.safetensors")
    args = [sys.executable, "-c", FRESH_PROCESS, str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path)]
    subprocess.run(args, check=True, timeout=300)
    outputs = load_file(tmp_path / "outputs.safetensors")
    for name in ("loaded", "merged", "auto"):
        assert (outputs[name] - expected).abs().max() <= 1e-5, name


def test_load_twice_under_other_names_and_probe_state_round_trip(saved, inputs, tmp_path):
    tmp, model, _ = saved
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp / "adapter", adapter_name="first")
    loaded.load_adapter(tmp / "adapter", adapter_name="second")
    loaded.set_adapter("second")
    torch.testing.assert_close(loaded(**inputs).logits, model.eval()(**inputs).logits)

    probe = get_peft_model(tiny_llama(), ILAConfig(r=2, init_weights=False))
    probe.save_pretrained(tmp_path / "probe")
    assert load_file(tmp_path / "probe" / "adapter_model.safetensors")[MASK_KEYS[1]].all()
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "probe")
    assert reloaded.base_model.ila_gates["default"].logits.numel() == 28
    torch.testing.assert_close(reloaded(**inputs).logits, probe(**inputs).logits)


def test_probe_file_of_an_earlier_version_with_gate_logits_loads(tmp_path, inputs):
    """peft-ila once saved a probe adapter's gate logits (now unsaved state) under this key; such files still load."""
    probe = get_peft_model(tiny_llama(), ILAConfig(r=2, init_weights=False))
    probe.save_pretrained(tmp_path)
    edit_tensors(tmp_path, lambda t: t.update({"base_model.ila_gates.logits": torch.zeros(28)}))
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(reloaded(**inputs).logits, probe(**inputs).logits)


def edit_config(adapter_dir, **changes):
    path = adapter_dir / "adapter_config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def edit_tensors(adapter_dir, change):
    path = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


def refuse(adapter_dir, match, base=None):
    base = base or tiny_llama()
    with pytest.raises(ILALoadError, match=match):
        PeftModel.from_pretrained(base, adapter_dir)
    return base


def test_selected_layer_missing_from_base_is_refused_before_touching_it(saved):
    tmp_path, *_ = saved
    edit_config(tmp_path / "adapter", selected_layers=["model.layers.9.mlp.up_proj"], layer_scores=None)
    base = refuse(tmp_path / "adapter", r"does not fit this base model.*not candidates: model.layers.9.mlp.up_proj")
    assert not any(isinstance(m, ILALayer) for m in base.modules())


def test_base_model_of_another_architecture_depth_or_width_is_refused(tmp_path):
    model = get_peft_model(tiny_llama(), ILAConfig(r=4, selected_layers=["model.layers.3.mlp.up_proj"]))
    model.save_pretrained(tmp_path)
    refuse(tmp_path, "does not fit this base model", base=tiny_llama(layers=1))
    gpt2 = tiny_gpt2()
    with pytest.raises(ValueError, match=r"matches no module of the model. Linear modules that exist: transformer.h.0"):
        PeftModel.from_pretrained(gpt2, tmp_path)
    assert not any(isinstance(m, ILALayer) for m in gpt2.modules())
    refuse(tmp_path, r"up_proj.*has shape \(4, 32\) in the file but \(4, 64\) in the model", base=tiny_llama(hidden=64))


def test_config_and_tensors_disagreeing_on_the_selection(saved):
    tmp_path, _, result = saved
    other = next(n for n in llama_candidates() if n not in result.selected)
    edit_config(tmp_path / "adapter", selected_layers=[*result.selected[:4], other])
    refuse(tmp_path / "adapter", "the two files come from different runs")


def test_config_and_tensors_disagreeing_on_scores(saved):
    tmp_path, _, result = saved
    edit_config(tmp_path / "adapter", layer_scores={**result.scores, result.selected[0]: 0.123})
    refuse(tmp_path / "adapter", "disagree on the scores")


def test_missing_mask_tensors(saved):
    tmp_path, *_ = saved
    edit_tensors(tmp_path / "adapter", lambda t: t.pop(MASK_KEYS[1]))
    refuse(tmp_path / "adapter", "lack the ILA mask tensors.*ila_layer_mask")


def test_candidate_list_mismatch(saved):
    tmp_path, *_ = saved

    def drop_last_candidate(t):
        names = bytes(t[MASK_KEYS[0]].tolist()).decode().split("\n")[:-1]
        t[MASK_KEYS[0]] = torch.tensor(list("\n".join(names).encode()), dtype=torch.uint8)
        for key in (MASK_KEYS[1], MASK_KEYS[2], CONFIDENCE_KEY):
            t[key] = t[key][:-1]

    edit_tensors(tmp_path / "adapter", drop_last_candidate)
    refuse(tmp_path / "adapter", "covers 27 candidate layers .* this model has 28")


def test_inconsistent_mask_tensors(saved):
    tmp_path, *_ = saved
    edit_tensors(tmp_path / "adapter", lambda t: t.update({MASK_KEYS[2]: torch.zeros(3)}))
    refuse(tmp_path / "adapter", "28 layer names, 28 mask entries, 3 scores")


def test_shape_mismatch(saved):
    tmp_path, *_ = saved
    edit_config(tmp_path / "adapter", r=8)
    refuse(tmp_path / "adapter", r"has shape \(4, .*\) in the file but \(8, .*\) in the model")


def test_weights_for_unselected_layers(saved):
    tmp_path, _, result = saved
    extra = next(n for n in llama_candidates() if n not in result.selected)

    def add_weight(t):
        t[f"base_model.model.{extra}.ila_A.weight"] = torch.zeros(4, 32)

    edit_tensors(tmp_path / "adapter", add_weight)
    refuse(tmp_path / "adapter", "adapter weights the selection does not explain")


def test_pickle_save_is_refused_before_anything_is_written(saved):
    tmp_path, model, _ = saved
    with pytest.raises(ValueError, match="ILA adapters are saved only as safetensors"):
        model.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    assert not (tmp_path / "pickled").exists()
    with pytest.raises(ValueError, match="ILA adapters are saved only as safetensors"):
        model.save_pretrained(tmp_path / "pickled", False, ["default"])  # positionally too


def test_pickle_only_adapter_is_refused(saved):
    """A directory another tool wrote with adapter_model.bin only (peft-ila never writes one)."""
    tmp_path, *_ = saved
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((tmp_path / "adapter" / "adapter_config.json").read_text())
    torch.save(load_file(tmp_path / "adapter" / "adapter_model.safetensors"), pickled / "adapter_model.bin")
    refuse(pickled, "safetensors")
    with pytest.raises(ILALoadError, match="only from safetensors"):
        AutoPeftModelForCausalLM.from_pretrained(pickled)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_weights_file_is_refused_naming_it(saved, damage):
    tmp_path, *_ = saved
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[: len(data) - 100], "garbage": b"\xff" * 64, "empty": b""}[damage])
    base = refuse(tmp_path / "adapter", f"{weights} is damaged or truncated .*; save the adapter again")
    assert not any(isinstance(m, ILALayer) for m in base.modules())
