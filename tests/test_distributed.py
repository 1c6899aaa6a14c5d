"""Two CPU processes under torchrun (gloo): the same selection on every rank, one save, a reloadable adapter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from conftest import alpaca_rows, tiny_llama, tiny_lm_dir
from peft_ila.app.cli import main
from peft_ila.identification.estimators import ESTIMATORS

TESTS = Path(__file__).parent


def torchrun(*args: str, cwd: Path | None = None, processes: int = 2) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), *args]
    # PYTHONFAULTHANDLER: a rank that aborts prints its Python stack
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(TESTS.parent), "PYTHONFAULTHANDLER": "1"}
    done = subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-8000:]
    return done


def ranks_agree(out: Path) -> list[str]:
    rank0, rank1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["selected"] == rank1["selected"] and len(rank0["selected"]) == 6
    assert rank0["weights"] == rank1["weights"]  # the fine-tuned adapters are identical too
    return rank0["selected"]


def reload_reproduces_logits(out: Path, selected: list[str]) -> None:
    model = PeftModel.from_pretrained(tiny_llama(), out / "adapter")
    assert model.peft_config["default"].selected_layers == selected
    saved = load_file(out / "logits.safetensors")
    with torch.no_grad():
        logits = model(input_ids=saved["input_ids"]).logits
    assert torch.allclose(logits, saved["logits"], atol=1e-5)


@pytest.mark.parametrize("mode", ["function", "callback"])
def test_two_ranks_select_the_same_layers_and_the_adapter_reloads(tmp_path, mode):
    torchrun(str(TESTS / "ddp_worker.py"), mode, str(tmp_path))
    reload_reproduces_logits(tmp_path, ranks_agree(tmp_path))
    if mode == "function":  # rank 1 claiming other layers than rank 0 is an error on both ranks
        for r in (0, 1):
            verdicts = json.loads((tmp_path / f"resumed{r}.json").read_text())
            assert verdicts == dict.fromkeys(ESTIMATORS, "same as uninterrupted")
            message = (tmp_path / f"mismatch{r}.txt").read_text()
            assert "ILA ranks disagree on the selected layers: rank(s) [1]" in message


def test_fsdp2_identifies_as_ddp_does_and_the_sharded_model_trains_saves_and_reloads(tmp_path):
    """FSDP2 (fully_shard on every block, then the root) on two gloo processes: for every estimator the selection is
    the unsharded run's and the scores equal it to float32 rounding (FSDP's reduce-scatter and ILA's all-reduce
    sum the same gradients in another order); the sharded model then trains the same weights on both ranks, and its
    adapter, saved from a full state dict, gives the sharded model's logits in one process. `ILACallback`, called as
    the Trainer's FSDP2 path calls it, selects the same layers and leaves the optimizer only what still trains. Under
    a bf16 MixedPrecisionPolicy (accelerate's FSDP2 with bf16) identification and the fine-tune run through."""
    torchrun(str(TESTS / "ddp_worker.py"), "fsdp", str(tmp_path))
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0 == rank1 and rank0["weights"]
    assert set(rank0["runs"]) == set(ESTIMATORS)
    for estimator, run in rank0["runs"].items():
        (plain, sharded), (plain_scores, sharded_scores) = run["selected"], run["scores"]
        assert sharded == plain and len(sharded) == 6, estimator
        assert sharded_scores == pytest.approx(plain_scores, abs=1e-5), estimator
    assert rank0["refused"].startswith("checkpoints of an identification on a model sharded by FSDP2")
    callback = rank0["callback"]
    (plain, _), (plain_scores, _) = rank0["runs"][callback["estimator"]].values()
    assert callback["optimizer_holds_what_trains"] and set(callback["selected"]) == set(plain)
    assert callback["scores"] == pytest.approx(plain_scores, abs=1e-5)
    mixed = rank0["mixed_precision"]  # bf16 compute: another selection may win, but all of it trains, in float32
    assert len(mixed["selected"]) == 6 and mixed["moved"] and mixed["dtypes"] == ["torch.float32"]
    reload_reproduces_logits(tmp_path, rank0["selected"])


def test_ila_callback_in_a_deepspeed_zero3_trainer_refuses_in_one_line_with_the_two_step_path(tmp_path):
    torchrun(str(TESTS / "ddp_worker.py"), "deepspeed", str(tmp_path), processes=1)
    record = json.loads((tmp_path / "rank0.json").read_text())
    assert record["deepspeed"] and record["refused"].startswith("ILACallback cannot identify under DeepSpeed")
    assert "examples/deepspeed_zero3.py" in record["refused"] and "\n" not in record["refused"]


def test_two_ranks_train_the_same_layerwise_draws_to_the_same_weights(tmp_path):
    torchrun(str(TESTS / "ddp_worker.py"), "layerwise", str(tmp_path))
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["draws"] == rank1["draws"] and rank0["weights"] == rank1["weights"]
    start = {n: [float(p.sum()), float(p.abs().sum())] for n, p in tiny_llama().named_parameters()}
    drawn = {block for draw in rank0["draws"] for block in draw}
    changed = {n.rsplit(".", 3)[0] for n, w in rank0["weights"].items() if w != start[n]}
    assert changed == drawn  # what no draw activated, every rank left as it was


def test_cli_identify_and_train_under_torchrun(tmp_path):
    tiny_lm_dir(tmp_path / "lm")
    (tmp_path / "data.json").write_text(json.dumps(alpaca_rows(40)))
    common = ["--model", "lm", "--data", "data.json", "--max-length", "96", "--eval-size", "8", "--no-progress"]
    cli = ["-m", "peft_ila.app.cli"]
    budget = ["--stage1-max-steps", "6", "--stage2-steps", "3"]
    done = torchrun(*cli, "identify", *common, *budget, "--out", "run", cwd=tmp_path)
    assert done.stdout.count("data data.json:") == 1  # rank 0 speaks for both
    record = json.loads((tmp_path / "run" / "importance.json").read_text())
    assert record["costs"]["stage1"]["tokens"] > 0 and len(record["selected"]) == 4
    torchrun(*cli, "train", *common, "--mask", "run", "--steps", "2", "--out", "adapter", cwd=tmp_path)
    training = json.loads((tmp_path / "adapter" / "training.json").read_text())
    assert training["processes"] == 2 and training["steps"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "data.json", "lm", "run"]  # nothing partial


def test_single_process_commands_refuse_a_multi_process_launch(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["eval", str(tmp_path)]) == 2
    assert "runs in one process; launch it without torchrun" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["identify", "train"])
def test_help_of_the_training_commands_shows_the_launchers(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    help_text = capsys.readouterr().out
    assert f"torchrun --nproc_per_node 2 -m peft_ila.app.cli {command}" in help_text
    assert f"accelerate launch --num_processes 2 -m peft_ila.app.cli {command}" in help_text


def test_a_command_ends_the_process_group_it_ran_in(tmp_path):
    """A live gloo group can abort the process at interpreter exit (SIGABRT, seen once under torchrun on a loaded
    machine): the CLI destroys it when a command ends, however it ends."""
    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        assert main(["eval", str(tmp_path / "no-adapter")]) == 2  # a usage error
        assert not torch.distributed.is_initialized()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
