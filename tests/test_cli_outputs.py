"""What the command line leaves on disk: --overwrite replaces only what peft-ila wrote, and an interrupted `train`
continues to the adapter an uninterrupted one writes."""

import json

import pytest
import torch
from safetensors.torch import load_file

import peft_ila.app.pipeline
from conftest import common
from peft_ila.app.cli import main
from test_cli import stop_at_step

TINY_INLINE = ("--stage1-max-steps", "4", "--stage2-steps", "2", "--lora-dropout", "0.1", "--checkpoint-every", "2")


def one_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    return err[0]


def same_adapter(a, b) -> None:
    """Equal weights (bit for bit), config and training record (but for times, memory and the command line)."""
    wa, wb = (load_file(d / "adapter_model.safetensors") for d in (a, b))
    assert wa.keys() == wb.keys()
    for key in wa:  # the mask's confidence is NaN for layers without one
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=0, equal_nan=True, msg=key)
    assert (a / "adapter_config.json").read_text() == (b / "adapter_config.json").read_text()
    ta, tb = (json.loads((d / "training.json").read_text()) for d in (a, b))
    for key in ("loss_before", "loss_after", "losses", "steps", "tokens", "loss_after_identification"):
        assert ta.get(key) == tb.get(key), key


def test_interrupted_train_resumes_to_the_uninterrupted_adapter_bit_for_bit(work, tmp_path, monkeypatch, capsys):
    args = ["train", *common(work, "--steps", "6", *TINY_INLINE)]  # identifies inline, then fine-tunes
    whole, out = tmp_path / "whole", tmp_path / "a"
    assert main([*args, "--out", str(whole)]) == 0
    with monkeypatch.context() as patch:
        stop_at_step(patch, peft_ila.app.pipeline, 3)  # the fine-tune's third step (identification's are not counted)
        assert main([*args, "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert (
        f"progress (2 of 6 steps) is saved in {out}.checkpoint.safetensors; run the same command with --resume" in err
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a-identify",
        "a.checkpoint.safetensors",
        "whole",
        "whole-identify",
    ]
    assert main([*args, "--out", str(out)]) == 2  # without --resume: refused, nothing lost
    assert "holds the state of an interrupted fine-tune; pass --resume" in one_line(capsys)
    assert main([*args, "--out", str(out), "--resume"]) == 0
    assert not (tmp_path / "a.checkpoint.safetensors").exists()  # gone once the adapter is written
    same_adapter(out, whole)


@pytest.mark.parametrize("stop", [1, 4])
def test_interrupted_train_on_given_layers_resumes_bit_for_bit(work, tmp_path, monkeypatch, stop):
    args = ["train", *common(work, "--steps", "4", "--lora-dropout", "0.1", "--checkpoint-every", "2")]
    args += ["--layers", "model.layers.0.mlp.up_proj,model.layers.1.self_attn.q_proj"]
    whole, out = tmp_path / "whole", tmp_path / "a"
    assert main([*args, "--out", str(whole)]) == 0
    with monkeypatch.context() as patch:
        stop_at_step(patch, peft_ila.app.pipeline, stop)  # step 4: the last, interrupted before the adapter is saved
        assert main([*args, "--out", str(out)]) == 130
    assert main([*args, "--out", str(out), "--resume"]) == 0
    same_adapter(out, whole)


def test_resuming_a_fine_tune_with_other_settings_is_refused_naming_them(work, tmp_path, monkeypatch, capsys):
    args = ["train", *common(work, "--steps", "4", "--checkpoint-every", "1"), "--layers", "model.layers.0.mlp.up_proj"]
    out = tmp_path / "a"
    with monkeypatch.context() as patch:
        stop_at_step(patch, peft_ila.app.pipeline, 2)
        assert main([*args, "--out", str(out)]) == 130
    capsys.readouterr()
    assert main([*args, "--lr", "0.01", "--out", str(out), "--resume"]) == 2
    assert "other settings (lr: 0.001 there, 0.01 here)" in one_line(capsys)
    assert main([*args, "--out", str(tmp_path / "b"), "--resume"]) == 2
    assert "there is nothing to resume" in one_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.checkpoint.safetensors"]
