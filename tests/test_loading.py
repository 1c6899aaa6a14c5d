"""Loading like a user: a bf16 base, gradient checkpointing, the device; recorded and honoured by eval."""

import json

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file

from conftest import common, identify, lm_batches, tiny_llama
from peft_ila import ILAConfig, identify_important_layers
from peft_ila.app.cli import main


def test_identify_train_and_eval_with_a_bfloat16_base_and_gradient_checkpointing(work, tmp_path):
    loading = ["--dtype", "bfloat16", "--gradient-checkpointing"]
    identify(work, tmp_path / "run", *loading)
    recorded = json.loads((tmp_path / "run" / "importance.json").read_text())
    assert recorded["loading"] == {
        "dtype": "bfloat16",
        "asked_dtype": "bfloat16",
        "device": "cpu",
        "gradient_checkpointing": True,
    }
    out = tmp_path / "adapter"
    args = ["train", *common(work, "--steps", "2", *loading), "--mask", str(tmp_path / "run"), "--out", str(out)]
    assert main(args) == 0
    info = json.loads((out / "training.json").read_text())
    assert info["loading"]["dtype"] == "bfloat16" and info["loading"]["gradient_checkpointing"] is True
    weights = load_file(out / "adapter_model.safetensors")
    floats = [t for t in weights.values() if t.is_floating_point()]  # beside the mask's names and flags
    assert floats and all(t.dtype == torch.float32 for t in floats)  # adapters (and scores) train in float32
    assert main(["eval", str(out), "--json", str(tmp_path / "eval.json"), "--no-progress"]) == 0
    # eval loads the base in the recorded dtype: the same loss (a float32 base would differ by bf16's rounding)
    assert json.loads((tmp_path / "eval.json").read_text())["held_out_loss"] == pytest.approx(info["loss_after"])


def test_cuda_without_a_gpu_is_refused_with_the_fix(work, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["identify", *common(work, "--device", "cuda"), "--out", str(tmp_path / "x")]) == 2
    assert "--device cuda: torch sees no CUDA GPU here" in capsys.readouterr().err


def test_gradient_checkpointing_leaves_identification_as_it_was():
    """Recomputing activations in backward must not count anything twice (ILA's stages read the forward pass)."""
    results = []
    for checkpointing in (False, True):
        model = tiny_llama()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        probe = get_peft_model(model, ILAConfig(r=2, stage1_max_steps=3, stage2_steps=2, top_k=5))
        results.append(identify_important_layers(probe, lm_batches(5), progress=False))
    plain, checkpointed = results
    assert checkpointed.selection.selected == plain.selection.selected
    for name, score in plain.scores.items():
        assert checkpointed.scores[name] == pytest.approx(score, abs=1e-5)
