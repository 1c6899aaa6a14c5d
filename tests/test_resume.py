"""Identification is deterministic, checkpoints itself, and a resumed run ends exactly as an uninterrupted one."""

import pytest
import safetensors.torch
import torch
from accelerate import Accelerator
from peft import get_peft_model

from conftest import interrupt_at_forward, lm_batches, tiny_llama, without_seconds
from peft_ila import ILAConfig, ILALoadError, identify_important_layers

# 7 stage-1 steps and 5 stage-2 steps of 2 micro-batches each: forwards 1-14 are stage 1, 15-24 stage 2
CONFIG = dict(r=2, top_k=5, lora_dropout=0.1, stage1_max_steps=7, stage2_steps=5, seed=3)


def identify(checkpoint=None, stop_at_forward=None, resume=False, data_seed=0, base_seed=0, **overrides):
    model = get_peft_model(tiny_llama(base_seed), ILAConfig(**{**CONFIG, **overrides}))
    if stop_at_forward is not None:
        interrupt_at_forward(model, stop_at_forward)
    return identify_important_layers(
        model,
        lm_batches(3, seed=data_seed),
        progress=False,
        accelerator=Accelerator(gradient_accumulation_steps=2),
        checkpoint=checkpoint,
        checkpoint_every=2,
        resume=resume,
    )


@pytest.fixture(scope="module")
def uninterrupted():
    return identify()


def test_same_data_seed_and_settings_give_the_same_result_bit_for_bit(uninterrupted):
    again = identify()
    assert without_seconds(again) == without_seconds(uninterrupted)  # floats compared exactly


@pytest.mark.parametrize("stop_at_forward", [10, 17, 21], ids=["stage1", "stage2-first-step", "stage2"])
def test_resumed_run_ends_as_the_uninterrupted_one(tmp_path, uninterrupted, stop_at_forward):
    checkpoint = tmp_path / "run.ckpt.safetensors"
    with pytest.raises(KeyboardInterrupt):
        identify(checkpoint, stop_at_forward=stop_at_forward)
    assert checkpoint.is_file() and [p.name for p in tmp_path.iterdir()] == [checkpoint.name]
    resumed = identify(checkpoint, resume=True)
    assert without_seconds(resumed) == without_seconds(uninterrupted)


def test_resume_refuses_other_settings_base_weights_data_and_no_checkpoint(tmp_path):
    checkpoint = tmp_path / "ckpt.safetensors"
    with pytest.raises(KeyboardInterrupt):
        identify(checkpoint, stop_at_forward=10)
    with pytest.raises(ILALoadError, match=r"other settings \(config: .*'r': 2.*'r': 4"):
        identify(checkpoint, resume=True, r=4)
    with pytest.raises(ILALoadError, match=r"other settings \(base_weights: '[0-9a-f]+' there"):
        identify(checkpoint, resume=True, base_seed=1)  # the same architecture with other weights
    with pytest.raises(ILALoadError, match="The data differ from those of the run that wrote"):
        identify(checkpoint, resume=True, data_seed=1)
    with pytest.raises(ILALoadError, match=r"No checkpoint at .*nowhere"):
        identify(tmp_path / "nowhere.safetensors", resume=True)
    with pytest.raises(ValueError, match="resume=True needs the `checkpoint` file"):
        identify(resume=True)


def test_damaged_checkpoint_is_refused_naming_the_file(tmp_path):
    checkpoint = tmp_path / "ckpt.safetensors"
    with pytest.raises(KeyboardInterrupt):
        identify(checkpoint, stop_at_forward=10)
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[: len(data) // 2])
    with pytest.raises(ILALoadError, match=f"{checkpoint} cannot be read .*start without resuming"):
        identify(checkpoint, resume=True)
    safetensors.torch.save_file({"x": torch.zeros(1)}, checkpoint)  # a safetensors file, but not a checkpoint
    with pytest.raises(ILALoadError, match="is not a peft-ila identification checkpoint"):
        identify(checkpoint, resume=True)


def test_a_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    checkpoint = tmp_path / "ckpt.safetensors"
    with pytest.raises(KeyboardInterrupt):
        identify(checkpoint, stop_at_forward=6)  # one checkpoint, at step 2
    before = checkpoint.read_bytes()

    def crash_midway(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr("peft_ila.identification.checkpoint.save_file", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        identify(checkpoint)  # its first checkpoint (step 2) dies while being written
    assert checkpoint.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [checkpoint.name]


def test_checkpoint_every_is_validated():
    with pytest.raises(ValueError, match="checkpoint_every=0 is invalid: it must be an int >= 1"):
        identify_important_layers(
            get_peft_model(tiny_llama(), ILAConfig(r=2)), lm_batches(1), checkpoint="x", checkpoint_every=0
        )


@pytest.mark.parametrize(("estimator", "stop_at_forward"), [("first-order", 19), ("update-norm", 9)])
def test_every_estimator_resumes_to_its_uninterrupted_result(tmp_path, estimator, stop_at_forward):
    whole = identify(estimator=estimator)
    checkpoint = tmp_path / "run.ckpt.safetensors"
    with pytest.raises(KeyboardInterrupt):
        identify(checkpoint, stop_at_forward=stop_at_forward, estimator=estimator)
    assert without_seconds(identify(checkpoint, resume=True, estimator=estimator)) == without_seconds(whole)
