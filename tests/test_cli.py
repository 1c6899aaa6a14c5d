"""`peft-ila` on a tiny local model and a tiny alpaca file: every command, its files, and its one-line errors."""

import json
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import peft_ila.app.pipeline
import peft_ila.identification.importance
from conftest import alpaca_rows, common, identify, tiny_llama, tiny_lm_dir
from peft_ila import ILALayer
from peft_ila.app.cli import main
from peft_ila.tuner.selection import Selection


def test_identify_writes_a_complete_run_directory(run, tmp_path):
    names = ["heatmap.png", "importance.json", "mask.safetensors", "report.md"]
    assert sorted(p.name for p in run.iterdir()) == [".peft-ila.json", *names]  # the manifest: what peft-ila wrote
    (tmp_path / "plain").mkdir()
    assert run.stat().st_mode == (tmp_path / "plain").stat().st_mode  # not left private by its temporary name
    record = json.loads((run / "importance.json").read_text())
    assert len(record["candidates"]) == 14 and len(record["selected"]) == 4  # 2 blocks x 7, top 25%
    assert record["costs"]["stage1"]["steps"] == 6 and record["costs"]["stage1"]["stop"] == "max_steps"
    assert record["costs"]["stage2"]["tokens"] > 0 and record["config"]["granularity"] == "module"
    assert record["command"].startswith("peft-ila identify ")
    assert Selection.from_tensors(load_file(run / "mask.safetensors")).differences(Selection.from_json(record)) == []
    assert (run / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (run / "report.md").read_text()
    assert all(f"`{name}`" in report for name in record["selected"]) and record["command"] in report


def test_train_on_a_mask_saves_a_loadable_adapter(work, run):
    out = work / "adapter"
    assert main(["train", *common(work, "--steps", "4"), "--mask", str(run), "--out", str(out)]) == 0
    info = json.loads((out / "training.json").read_text())
    assert info["steps"] == 4 and info["trainable_params"] > 0 and info["memory"]["peak_rss_mb"] > 0
    assert info["loss_after"] < info["loss_before"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(work / "lm"), out)
    wrapped = {n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, ILALayer)}
    assert wrapped == set(json.loads((run / "importance.json").read_text())["selected"])


def test_train_all_layers_and_given_layers(work):
    assert main(["train", *common(work, "--steps", "2"), "--all-layers", "--out", str(work / "all")]) == 0
    assert json.loads((work / "all" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    layers = "model.layers.0.mlp.up_proj,model.layers.1.self_attn.q_proj"
    assert main(["train", *common(work, "--steps", "2"), "--layers", layers, "--out", str(work / "two")]) == 0
    config = json.loads((work / "two" / "adapter_config.json").read_text())
    assert config["peft_type"] == "ILA" and config["selected_layers"] == layers.split(",")


def test_compare_runs(work, run, capsys):
    identify(work, work / "run-seed1", "--seed", "1")
    assert main(["compare", str(run), str(run), str(work / "run-seed1"), "--out", str(work / "cmp")]) == 0
    data = json.loads((work / "cmp" / "compare.json").read_text())
    assert data["jaccard"][0][1] == 1.0 and data["pairs"][0]["spearman"] == pytest.approx(1.0)
    assert 0.0 <= data["jaccard"][0][2] <= 1.0
    assert (work / "cmp" / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert "Jaccard" in capsys.readouterr().out


VANILLA = textwrap.dedent(
    """
    import sys
    sys.modules["peft_ila"] = None  # as if peft-ila were not installed: importing it fails
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    lm, lora, io = sys.argv[1:]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(lm), lora)
    assert sys.modules["peft_ila"] is None and type(model.peft_config["default"]).__name__ == "LoraConfig"
    save_file({"logits": model(**load_file(io + "/in.safetensors")).logits}, io + "/out.safetensors")
    """
)


def test_export_lora_loads_in_vanilla_peft_with_equal_logits(work, run, inputs):
    from safetensors.torch import save_file

    ila_dir = work / "adapter-export"
    assert main(["train", *common(work, "--steps", "3"), "--mask", str(run), "--out", str(ila_dir)]) == 0
    assert main(["export-lora", str(ila_dir), str(work / "lora")]) == 0
    expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(work / "lm"), ila_dir)(**inputs).logits
    save_file(inputs, work / "in.safetensors")
    subprocess.run(
        [sys.executable, "-c", VANILLA, str(work / "lm"), str(work / "lora"), str(work)], check=True, timeout=300
    )
    got = load_file(work / "out.safetensors")["logits"]
    assert (got - expected).abs().max() <= 1e-5
    assert not torch.allclose(expected, AutoModelForCausalLM.from_pretrained(work / "lm")(**inputs).logits)


def test_eval_refuses_an_adapter_without_safetensors(work, tmp_path, capsys):
    (tmp_path / "training.json").write_text(json.dumps({"model": str(work / "lm")}))
    torch.save({}, tmp_path / "adapter_model.bin")
    assert main(["eval", str(tmp_path)]) == 2
    assert "has no adapter_model.safetensors; peft-ila loads weights only from safetensors" in capsys.readouterr().err


def test_eval_reproduces_the_trained_loss(work, run, tmp_path):
    out = work / "adapter-eval"
    assert main(["train", *common(work, "--steps", "3"), "--mask", str(run), "--out", str(out)]) == 0
    assert main(["eval", str(out), "--json", str(tmp_path / "eval.json"), "--no-progress"]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["held_out_loss"] == pytest.approx(json.loads((out / "training.json").read_text())["loss_after"])
    assert isinstance(result["generation"], str)


def test_demo_end_to_end(work, capsys):
    out = work / "demo"
    args = ["demo", *common(work, "--stage1-max-steps", "4", "--stage2-steps", "2", "--steps", "3"), "--out", str(out)]
    assert main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        ".peft-ila.json",
        "adapter",
        "demo.json",
        "identify",
        "reload.json",
    ]
    summary = json.loads((out / "demo.json").read_text())
    assert summary["held_out_loss_after_reload"] == pytest.approx(summary["held_out_loss_after"], abs=1e-5)
    assert summary["generation_after_reload"] == summary["generation_after"]
    assert json.loads((out / "reload.json").read_text())["adapter"] == str((out / "adapter").resolve())  # not staged
    # identification inside the fine-tune, scored by update norms: its top 75% go on from stage 1's weights, and
    # "before" is the base model's loss, measured before stage 1 changed the model
    assert summary["loss_after_identification"] != summary["held_out_loss_before"]
    printed = capsys.readouterr().out
    assert "Top 11 of 14 layers (score: update-norm)" in printed and "held-out loss:" in printed
    assert "identification's 4 steps on every layer, then 3 on the top 11 layers" in printed
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["estimator"] == "update-norm" and config["keep_stage1_weights"] is True


def test_demo_with_the_paper_s_top_k_and_a_confidence(work, capsys):
    """The demo's mode is a default, not a fixture: the first-order estimator on the top 25%, adapters afresh."""
    out = work / "demo-first-order"
    budget = ["--stage1-max-steps", "4", "--stage2-steps", "2", "--steps", "2", "--top-k", "4"]
    options = [*budget, "--estimator", "first-order", "--no-keep-stage1-weights"]
    assert main(["demo", *common(work, *options), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"top-29% set: \d+ of 4 layers certain at 90%", printed)  # the confidence line
    assert "after fine-tuning the top 4 layers" in printed
    assert json.loads((out / "demo.json").read_text())["loss_after_identification"] is None


def test_plain_format_without_chat_template(tmp_path):
    lm = tiny_lm_dir(tmp_path / "plain-lm", chat_template=False)
    (tmp_path / "d.json").write_text(json.dumps(alpaca_rows(12)))
    args = [
        "identify",
        "--model",
        str(lm),
        "--data",
        str(tmp_path / "d.json"),
        "--eval-size",
        "2",
        "--max-length",
        "96",
        "--stage1-max-steps",
        "2",
        "--stage2-steps",
        "1",
        "--no-progress",
        "--out",
        str(tmp_path / "r"),
    ]
    assert main(args) == 0
    assert json.loads((tmp_path / "r" / "importance.json").read_text())["format"] == "plain"


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing-data", "does not exist"),
        ("bad-columns", "not a known layout (no column for instruction or output)"),
        ("no-usable-rows", "none of its 2 rows"),
        ("not-a-data-file", "is not a .json, .jsonl or .parquet file"),
        ("missing-model", "no such file or directory"),
        ("all-too-long", "2 dropped as longer than --max-length 8"),
        ("out-exists", "already exists (an empty directory); pass --overwrite"),
        ("bad-mask", "is not a directory"),
        ("uncached-model", "cannot load it from local files"),
        ("uncached-dataset", "nor a dataset in the local datasets cache"),
        ("empty-data", "has no rows"),
        ("empty-file", "has no rows"),
        ("resume-nothing", "does not exist, there is nothing to resume"),
        ("stale-checkpoint", "holds the state of an interrupted identification; pass --resume"),
        ("top-k-zero", "--top-k 0 is invalid: it must be an int >= 1"),
        ("top-k-too-many", "--top-k 500 but the model has 14 candidate layers; use an int in [1, 14]"),
        ("targets-nothing", "matches no module of the model. Linear modules that exist: model.layers.0"),
        ("targets-embeddings", "cannot adapt: model.embed_tokens (Embedding)"),
        ("layers-not-in-model", "are not candidates of /"),
        ("pickled-model", "holds only pickled weights (*.bin); peft-ila loads weights only from safetensors"),
        ("bad-budget", "--budget time:2 is invalid: it must be 'time:F' or 'memory:F' with F in (0, 1]"),
        ("budget-with-layers", "--budget chooses layers while identifying them; with --mask, --all-layers or --layers"),
    ],
)
def test_bad_input_gives_one_line_and_writes_nothing(work, tmp_path, capsys, case, message):
    data, model, out = tmp_path / "d.json", str(work / "lm"), tmp_path / "out"
    data.write_text(json.dumps(alpaca_rows(2)))
    extra = []
    if case == "missing-data":
        data = tmp_path / "nope.json"
    elif case == "bad-columns":
        data.write_text(json.dumps([{"ask": "q", "reply": "a"}]))
    elif case == "no-usable-rows":
        data.write_text(json.dumps([{"instruction": "q", "output": ""}, {"instruction": "q", "output": "  "}]))
    elif case == "not-a-data-file":
        data = tmp_path / "d.txt"
        data.write_text("hello")
    elif case == "missing-model":
        model = "./no/such/model"
    elif case == "all-too-long":
        extra = ["--max-length", "8", "--overlong", "drop"]
    elif case == "out-exists":
        out.mkdir()
    elif case == "uncached-model":
        model = "someone/not-cached-model"
    elif case == "uncached-dataset":
        data = "someone/not-cached-dataset"
    elif case == "empty-data":
        data.write_text("[]\n")
    elif case == "empty-file":
        data.write_text("")
    elif case == "resume-nothing":
        extra = ["--resume"]
    elif case == "stale-checkpoint":
        (tmp_path / "out.checkpoint.safetensors").write_bytes(b"state")
    elif case == "pickled-model":
        model = str(shutil.copytree(work / "lm", tmp_path / "lm"))
        (tmp_path / "lm" / "model.safetensors").unlink()
        torch.save(tiny_llama().state_dict(), tmp_path / "lm" / "pytorch_model.bin")
    else:
        options = {
            "top-k-zero": ["--top-k", "0"],
            "top-k-too-many": ["--top-k", "500"],
            "targets-nothing": ["--target-modules", "nothing_here"],
            "targets-embeddings": ["--target-modules", "embed_tokens"],
            "layers-not-in-model": ["--layers", "model.layers.7.mlp.up_proj"],
            "bad-budget": ["--budget", "time:2"],
            "budget-with-layers": ["--layers", "model.layers.1.mlp.up_proj", "--budget", "time:0.5"],
        }
        extra = [*options.get(case, extra), "--eval-size", "1"]
    command = ["train", "--mask", str(tmp_path / "nowhere")] if case == "bad-mask" else ["identify"]
    command = ["train"] if case in ("layers-not-in-model", "budget-with-layers") else command
    code = main([*command, "--model", model, "--data", str(data), "--no-progress", *extra, "--out", str(out)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and message in err[0], err
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith((".out", "out"))]
    assert leftovers == {"out-exists": ["out"], "stale-checkpoint": ["out.checkpoint.safetensors"]}.get(case, [])


def test_held_out_examples_from_a_separate_file(work, tmp_path):
    (tmp_path / "test.json").write_text(json.dumps(alpaca_rows(12)[::-1]))
    out = tmp_path / "adapter"
    args = [
        "train",
        *common(work, "--steps", "2"),
        "--eval-data",
        str(tmp_path / "test.json"),
        "--layers",
        "model.layers.1.mlp.down_proj",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    info = json.loads((out / "training.json").read_text())
    assert (info["train_examples"], info["held_out_examples"]) == (40, 8)
    assert info["eval_data"] == str(tmp_path / "test.json")
    assert main(["eval", str(out), "--json", str(tmp_path / "e.json"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["held_out_loss"] == pytest.approx(info["loss_after"])


def stop_at_step(monkeypatch, module, step: int, error: type[BaseException] = KeyboardInterrupt) -> None:
    """Make `module.train_steps` raise `error` after its `step`-th optimizer step (counted over calls), once the
    step's own `on_step` (a checkpoint, say) has run: an interruption in the middle of a run."""
    real, done = module.train_steps, []

    def interrupted(*args, on_step=None, **kwargs):
        def hook(stats):
            if on_step is not None:
                on_step(stats)
            done.append(1)
            if len(done) == step:
                raise error("stopped by the test")

        return real(*args, on_step=hook, **kwargs)

    monkeypatch.setattr(module, "train_steps", interrupted)


def test_interrupted_identify_resumes_to_the_uninterrupted_selection(work, run, tmp_path, monkeypatch, capsys):
    out, checkpoint = tmp_path / "r", tmp_path / "r.checkpoint.safetensors"
    args = ["identify", *common(work, "--stage1-max-steps", "6", "--stage2-steps", "3"), "--out", str(out)]
    with monkeypatch.context() as patch:
        stop_at_step(patch, peft_ila.identification.importance, 8)  # stage 2, step 2
        assert main([*args, "--checkpoint-every", "2"]) == 130
    err = capsys.readouterr().err
    assert f"progress is saved in {checkpoint}; run the same command with --resume" in err
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint.name]  # no run directory, whole or partial
    assert main([*args, "--checkpoint-every", "2", "--resume"]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["r"]  # the checkpoint goes once the run is written
    resumed, whole = (json.loads((d / "importance.json").read_text()) for d in (out, run))
    for key in ("scores", "ranking", "selected", "update_norms", "losses"):
        assert resumed[key] == whole[key], key
    for stage in ("stage1", "stage2"):
        assert resumed["costs"][stage]["tokens"] == whole["costs"][stage]["tokens"]


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_interrupted_or_crashed_train_leaves_no_adapter_directory(work, tmp_path, monkeypatch, error):
    stop_at_step(monkeypatch, peft_ila.app.pipeline, 2, error)
    args = ["train", *common(work, "--steps", "4"), "--layers", "model.layers.1.mlp.down_proj", "--out"]
    if error is KeyboardInterrupt:
        assert main([*args, str(tmp_path / "a")]) == 130
    else:
        with pytest.raises(RuntimeError, match="stopped by the test"):
            main([*args, str(tmp_path / "a")])
    assert [p.name for p in tmp_path.iterdir()] == ["a.checkpoint.safetensors"]  # the progress, no adapter directory


def test_damaged_mask_file_is_refused_naming_it(work, run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    mask = copy / "mask.safetensors"
    mask.write_bytes(mask.read_bytes()[:-10])
    code = main(["train", *common(work), "--mask", str(copy), "--out", str(tmp_path / "a")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and f"{mask} cannot be read" in err[0], err
    assert not (tmp_path / "a").exists()


def test_diverging_identification_names_stage_and_step_and_writes_no_mask(work, tmp_path, monkeypatch, capsys):
    real = peft_ila.identification.importance.train_steps

    def diverging_gates(*args, **kwargs):
        if kwargs["desc"].startswith("ILA stage 2"):
            kwargs["penalty"] = lambda: torch.tensor(float("nan"))
        return real(*args, **kwargs)

    monkeypatch.setattr(peft_ila.identification.importance, "train_steps", diverging_gates)
    budget = ["--stage1-max-steps", "2", "--checkpoint-every", "1", "--estimator", "gates"]
    code = main(["identify", *common(work, *budget), "--out", str(tmp_path / "r")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 1 and "error: ILA stage 2: gates: the loss became nan at step 1" in err[-1], err
    assert [p.name for p in tmp_path.iterdir()] == ["r.checkpoint.safetensors"]  # stage 1's work is kept


def test_sigterm_during_identify_cleans_up_like_ctrl_c(work, tmp_path):
    out, checkpoint = tmp_path / "r", tmp_path / "r.checkpoint.safetensors"
    budget = ["--stage1-max-steps", "100000", "--checkpoint-every", "1"]
    command = [sys.executable, "-m", "peft_ila.app.cli", "identify", *common(work, *budget), "--out", str(out)]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not checkpoint.is_file() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-2000:]
    assert "run the same command with --resume" in err and "interrupted; nothing half-written" in err
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint.name]  # no run directory, no hidden partial one


def test_identify_with_another_estimator(work, tmp_path):
    identify(work, tmp_path / "r", "--estimator", "update-norm")
    record = json.loads((tmp_path / "r" / "importance.json").read_text())
    assert record["config"]["estimator"] == "update-norm" and record["costs"]["stage2"]["steps"] == 0
    assert max(record["scores"].values()) == 1.0
