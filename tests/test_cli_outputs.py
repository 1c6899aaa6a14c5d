"""What the command line leaves on disk: --overwrite replaces only what peft-ila wrote, and an interrupted `train`
continues to the adapter an uninterrupted one writes."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_cli import stop_at_step

import peft_ila.app.pipeline
import peft_ila.identification.importance
from conftest import alpaca_rows, common, identify, tiny_gguf, tiny_lm_dir
from peft_ila.app.cli import main

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
    ca, cb = (json.loads((d / "adapter_config.json").read_text()) for d in (a, b))
    assert set(ca.pop("target_modules")) == set(cb.pop("target_modules")) and ca == cb  # peft writes a set unordered
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


def users_folder(path):
    """A folder of the user's own, with a file peft-ila never wrote."""
    path.mkdir()
    (path / "notes.txt").write_text("mine")
    return path


@pytest.mark.parametrize("command", ["identify", "train", "compare", "export-lora", "demo"])
def test_overwrite_never_replaces_a_folder_peft_ila_did_not_write(work, run, tmp_path, capsys, command):
    out = users_folder(tmp_path / "d")
    args = {
        "identify": ["identify", *common(work), "--out", str(out)],
        "train": ["train", *common(work), "--layers", "model.layers.0.mlp.up_proj", "--out", str(out)],
        "compare": ["compare", str(run), str(run), "--out", str(out)],
        "export-lora": ["export-lora", str(tmp_path / "no-adapter"), str(out)],
        "demo": ["demo", *common(work), "--out", str(out)],
    }[command]
    for extra in ([], ["--overwrite"]):
        assert main([*args, *extra]) == 2
        err = one_line(capsys)
        assert f"{out} exists and holds what peft-ila did not write there (notes.txt)" in err, err
        assert "--overwrite" not in err  # no advice that would lose the file
        assert (out / "notes.txt").read_text() == "mine" and [p.name for p in out.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no staging or old copy left beside it


def test_overwrite_never_replaces_a_file_or_the_working_directory(run, tmp_path, capsys, monkeypatch):
    (tmp_path / "afile").write_text("mine")
    assert main(["compare", str(run), str(run), "--out", str(tmp_path / "afile"), "--overwrite"]) == 2
    assert "afile is a file, not an output of peft-ila" in one_line(capsys)
    assert (tmp_path / "afile").read_text() == "mine"
    monkeypatch.chdir(tmp_path)
    for out in (".", str(tmp_path.parent)):
        assert main(["compare", str(run), str(run), "--out", out, "--overwrite"]) == 2
        assert "is the working directory or holds it" in one_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # no `..old-*` folder


def test_overwrite_replaces_peft_ila_outputs_but_not_what_the_user_added_to_them(run, tmp_path, capsys):
    out = tmp_path / "c"
    compare = ["compare", str(run), str(run), "--out", str(out)]
    assert main(compare) == 0
    assert main(compare) == 2
    assert "already exists (a compare directory); pass --overwrite to replace it" in one_line(capsys)
    (out / "compare.json").write_text("{}")  # a file peft-ila wrote, changed: still its output
    assert main([*compare, "--overwrite"]) == 0
    assert json.loads((out / "compare.json").read_text())["labels"]
    (out / "plots").mkdir()
    (out / "plots" / "mine.png").write_text("mine")
    capsys.readouterr()
    assert main([*compare, "--overwrite"]) == 2
    assert "holds what peft-ila did not write there (plots, plots/mine.png)" in one_line(capsys)
    assert (out / "plots" / "mine.png").read_text() == "mine"


def test_outputs_written_before_the_manifest_are_recognised(run, tmp_path, capsys):
    import shutil

    old = shutil.copytree(run, tmp_path / "old")
    (old / ".peft-ila.json").unlink()  # as an older peft-ila wrote it
    compare = ["compare", str(run), str(run), "--out", str(old)]
    assert main(compare) == 2
    assert "already exists (an identify run); pass --overwrite" in one_line(capsys)
    (old / "notes.txt").write_text("mine")
    assert main([*compare, "--overwrite"]) == 2
    assert "holds what peft-ila did not write there (notes.txt)" in one_line(capsys)
    (old / "notes.txt").unlink()
    assert main([*compare, "--overwrite"]) == 0
    assert sorted(p.name for p in old.iterdir()) == [".peft-ila.json", "compare.json", "compare.png"]


def test_compare_needs_two_runs(run, tmp_path, capsys):
    assert main(["compare", str(run), "--out", str(tmp_path / "c")]) == 2
    assert "compare needs at least two run directories to compare, 1 given" in one_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_a_gguf_model_is_dequantised_once_and_its_adapter_loads_with_auto_peft(work, tmp_path, monkeypatch, capsys):
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("PEFT_ILA_CACHE", str(tmp_path / "cache"))
    gguf = tiny_gguf(tmp_path / "tiny.gguf")
    args = ["train", *common(work, "--steps", "2"), "--model", str(gguf), "--layers", "model.layers.0.mlp.up_proj"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    assert capsys.readouterr().out.count("Dequantising tiny.gguf") == 1  # the second command reads the cached copy
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    cached = config["base_model_name_or_path"]
    assert cached.startswith(str(tmp_path / "cache" / "models" / "tiny-"))
    assert json.loads((tmp_path / "a" / "training.json").read_text())["model"] == str(gguf)
    ids = torch.arange(10)[None]
    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "a")  # finds its base from the adapter alone
    base = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)  # the way docs/cli.md gives
    given = PeftModel.from_pretrained(base, tmp_path / "a")
    torch.testing.assert_close(auto(ids).logits, given(ids).logits)


def test_a_truncated_gguf_or_a_folder_without_a_model_is_one_line(work, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PEFT_ILA_CACHE", str(tmp_path / "cache"))
    whole = tiny_gguf(tmp_path / "whole.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(whole[: len(whole) // 2])
    users_folder(tmp_path / "notes")
    for model, message in [
        ("cut.gguf", "cut.gguf: cannot read it as a GGUF model ("),
        ("notes", "notes: cannot load it from local files ("),
    ]:
        args = ["train", *common(work), "--model", str(tmp_path / model), "--all-layers", "--out", str(tmp_path / "o")]
        assert main(args) == 2
        assert message in one_line(capsys)
    assert not (tmp_path / "o").exists() and not list((tmp_path / "cache" / "models").glob("cut*"))


def test_the_same_model_loaded_in_bfloat16_is_the_same_model(work, run, tmp_path, capsys):
    identify(work, tmp_path / "bf16", "--dtype", "bfloat16")
    capsys.readouterr()
    assert main(["compare", str(run), str(tmp_path / "bf16"), "--out", str(tmp_path / "c")]) == 0
    assert "different models" not in capsys.readouterr().out
    args = ["train", *common(work, "--steps", "1", "--dtype", "bfloat16"), "--mask", str(run), "--out"]
    assert main([*args, str(tmp_path / "a")]) == 0
    assert "other weights" not in capsys.readouterr().out
    other = tiny_lm_dir(tmp_path / "other", seed=1)  # the same architecture, other weights: still told apart
    assert main([*args, str(tmp_path / "b"), "--model", str(other)]) == 0
    assert "same architecture, other weights" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("option", "value", "must"),
    [
        ("--lr", "-0.001", "a number > 0"),
        ("--batch-size", "0", "an int >= 1"),
        ("--steps", "0", "an int >= 1"),
        ("--grad-accum", "0", "an int >= 1"),
        ("--eval-size", "0", "an int >= 1"),
        ("--max-length", "0", "an int >= 1"),
        ("--warmup", "1.5", "a number in [0, 1)"),
        ("--checkpoint-every", "-1", "an int >= 0"),
        ("--layerwise-importance", "2", "a number in [0, 1]"),
    ],
)
def test_a_bad_number_is_one_line_before_any_model_loads(work, tmp_path, capsys, monkeypatch, option, value, must):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(peft_ila.app.pipeline, "load_model", no_loading)
    args = ["train", *common(work), "--all-layers", option, value, "--out", str(tmp_path / "a")]
    assert main(args) == 2
    assert f"{option} {value} is invalid: it must be {must}" in one_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_too_little_data_gets_the_advice_that_fits(work, tmp_path, capsys):
    one = tmp_path / "one.json"
    one.write_text(json.dumps(alpaca_rows(1)))
    long_prompt = tmp_path / "long.json"
    long_prompt.write_text(json.dumps([{"instruction": "x" * 200, "output": "y"}] * 3))
    base = ["identify", "--model", str(work / "lm"), "--no-progress", "--out", str(tmp_path / "o")]
    assert main([*base, "--data", str(one)]) == 2
    err = one_line(capsys)
    assert (
        "1 conversations, 1 examples left. At least 2 are needed (one to train on, one held out): add examples" in err
    )
    assert "max-length" not in err
    assert main([*base, "--data", str(long_prompt), "--max-length", "64"]) == 2
    err = one_line(capsys)
    assert "3 dropped as longer than --max-length 64 (raise --max-length: their prompts alone are longer" in err
    assert "--overlong truncate" not in err  # already the setting


def test_the_library_names_the_field_where_the_command_line_names_the_option(work, tmp_path):
    """`pipeline.prepare` speaks of its own arguments (a `FieldError` about `data`, naming `max_length`), not of
    the command line's options: only the CLI says them as flags (the test above)."""
    from peft_ila import FieldError
    from peft_ila.app.pipeline import prepare

    long_prompt = tmp_path / "long.json"
    long_prompt.write_text(json.dumps([{"instruction": "x" * 200, "output": "y"}] * 3))
    with pytest.raises(FieldError) as raised:
        prepare(str(work / "lm"), str(long_prompt), max_length=64, overlong="drop")
    assert (raised.value.owner, raised.value.field, raised.value.value) == ("prepare", "data", str(long_prompt))
    assert "3 dropped as longer than `max_length` 64 (raise `max_length`" in raised.value.problem
    assert "--" not in str(raised.value)


def test_a_directory_of_the_wrong_command_is_named(work, run, tmp_path, capsys):
    adapter = tmp_path / "a"
    assert (
        main(["train", *common(work, "--steps", "1"), "--layers", "model.layers.0.mlp.up_proj", "--out", str(adapter)])
        == 0
    )
    capsys.readouterr()
    assert main(["train", *common(work), "--mask", str(adapter), "--out", str(tmp_path / "b")]) == 2
    assert f"{adapter} is an adapter written by train, not a run directory of `peft-ila identify`" in one_line(capsys)
    assert main(["eval", str(run)]) == 2
    assert f"{run} is an identify run, not an adapter written by `peft-ila train` or `demo`" in one_line(capsys)


def test_checkpoints_have_the_permissions_of_plain_files(work, tmp_path, monkeypatch):
    (tmp_path / "plain").write_text("")
    args = ["identify", *common(work, "--stage1-max-steps", "4", "--checkpoint-every", "2"), "--out"]
    with monkeypatch.context() as patch:
        stop_at_step(patch, peft_ila.identification.importance, 3)
        assert main([*args, str(tmp_path / "r")]) == 130
    checkpoint = tmp_path / "r.checkpoint.safetensors"
    assert checkpoint.stat().st_mode == (tmp_path / "plain").stat().st_mode  # 0644 under the usual umask


def test_activation_checkpointing_warns_nothing(work):
    import warnings

    from peft_ila.app.models import Loading, load_model

    model, _ = load_model(str(work / "lm"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # transformers' gradient_checkpointing_enable is a deprecated alias
        Loading(gradient_checkpointing=True).apply(model)
    assert model.model.gradient_checkpointing  # turned on all the same


def test_a_command_on_a_new_gguf_prints_no_warning(work, tmp_path):
    """In a fresh process (DeepSpeed and bitsandbytes installed, as the test extra has them; the Hub offline, as a
    machine without internet sets it): only our own lines. (test_qlora simulates a CPU on which bitsandbytes looks up
    a kernel.)"""
    gguf = tiny_gguf(tmp_path / "tiny.gguf")
    args = [*common(work, "--steps", "1"), "--model", str(gguf), "--layers", "model.layers.0.mlp.up_proj"]
    env = {**os.environ, "PEFT_ILA_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "peft_ila.app.cli", "train", *args, "--out", str(tmp_path / "a")]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    noise = [line for line in done.stderr.splitlines() if line.strip() and "Converting and de-quantizing" not in line]
    assert noise == [], noise


def test_smaller_things_a_new_user_reads(work, tmp_path, capsys):
    from peft_ila import ILAConfig

    # --eval-size defaults to a tenth of the examples (at most 64): 4 of these 40
    base = ["train", "--model", str(work / "lm"), "--data", str(work / "data.json"), "--no-progress"]
    plain = ["--max-length", "96", "--steps", "1", "--all-layers", "--out", str(tmp_path / "all")]
    assert main([*base, *plain]) == 0
    out = capsys.readouterr().out
    assert "36 train, 4 held out" in out
    assert "(plain peft LoRA: PeftModel.from_pretrained, no peft-ila needed)" in out and "import peft_ila" not in out
    # eval gives the recorded before and after beside what it measures now
    assert main(["eval", str(tmp_path / "all"), "--no-progress", "--json", str(tmp_path / "e.json")]) == 0
    info = json.loads((tmp_path / "all" / "training.json").read_text())
    shown = f"(recorded when trained: {info['loss_before']:.4f} for the base model -> {info['loss_after']:.4f})"
    assert shown in capsys.readouterr().out
    assert json.loads((tmp_path / "e.json").read_text())["recorded"]["loss_before"] == info["loss_before"]
    # the description names the estimator identification uses by default
    with pytest.raises(SystemExit):
        main(["--help"])
    assert f"default {ILAConfig.estimator})" in " ".join(capsys.readouterr().out.split())


def test_a_file_added_while_the_job_ran_is_kept_and_so_is_the_result(tmp_path):
    from peft_ila.app import UsageError
    from peft_ila.app.files import staged_dir

    out = tmp_path / "o"
    with staged_dir(out) as tmp:
        (tmp / "a.json").write_text("1")
    refused = r"holds what peft-ila did not write there \(notes.txt\).* The result is in "
    with pytest.raises(UsageError, match=refused), staged_dir(out, overwrite=True) as tmp:
        (tmp / "a.json").write_text("2")
        (out / "notes.txt").write_text("mine")  # the user, meanwhile
    assert (out / "notes.txt").read_text() == "mine" and (out / "a.json").read_text() == "1"
    (kept,) = tmp_path.glob("o.new-*")
    assert (kept / "a.json").read_text() == "2"


def test_a_demo_directory_of_an_earlier_version_is_recognised(work, tmp_path):
    import shutil

    from peft_ila.app.files import MANIFEST, written_by_peft_ila

    out = tmp_path / "demo"
    args = ["demo", *common(work, "--stage1-max-steps", "2", "--stage2-steps", "1", "--steps", "1"), "--out", str(out)]
    assert main(args) == 0
    old = shutil.copytree(out, tmp_path / "old")
    for manifest in old.rglob(MANIFEST):  # as an earlier version wrote it: no manifests
        manifest.unlink()
    assert written_by_peft_ila(old) == "a demo directory"
    assert main([*args[:-1], str(old), "--overwrite"]) == 0  # `make demo` over an older ila-demo
    (old / "adapter" / "notes.txt").write_text("mine")
    assert main([*args[:-1], str(old), "--overwrite"]) == 2
    assert (old / "adapter" / "notes.txt").read_text() == "mine"


def test_the_fine_tune_after_an_inline_identification_goes_on_where_stage_1_stopped(work, tmp_path, monkeypatch):
    """Under gradient accumulation too: the skip is the micro-batches identification read, not its steps."""
    skips = []
    real = peft_ila.app.pipeline.finetune
    monkeypatch.setattr(peft_ila.app.pipeline, "finetune", lambda *a, **k: skips.append(k["skip"]) or real(*a, **k))
    args = ["train", *common(work, "--steps", "1", "--grad-accum", "2", *TINY_INLINE), "--out", str(tmp_path / "a")]
    assert main(args) == 0
    stage1 = json.loads((tmp_path / "a-identify" / "importance.json").read_text())["costs"]["stage1"]
    assert skips == [stage1["micro_batches"]] == [2 * stage1["steps"]]
