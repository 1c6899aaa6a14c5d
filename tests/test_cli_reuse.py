"""`peft-ila` outputs reused later and elsewhere: adapters that evaluate from any directory on the data they were
trained on, masks that know their model, `--top-k` on a mask's ranking, column mapping, optional packages, and the
one-line messages that name the flag the user typed."""

import hashlib
import json
import sys
import warnings

import pytest

from conftest import alpaca_rows, common, identify, tiny_lm_dir
from peft_ila.app.cli import main


def read(path):
    return json.loads(path.read_text())


def one_line_error(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    return err[0]


def train_on_mask(work, run, out, *extra, data=None) -> int:
    args = common(work, "--steps", "1", *extra)
    if data is not None:
        args[args.index("--data") + 1] = str(data)
    return main(["train", *args, "--mask", str(run), "--out", str(out)])


# --- 1. eval resolves what the adapter recorded, checks its fingerprint, and takes overrides ------------------------


def test_eval_from_another_directory_uses_the_recorded_model_and_data(work, run, tmp_path, monkeypatch):
    monkeypatch.chdir(work)  # relative --model and --data, as a user types them
    out = tmp_path / "adapter"
    relative = ["--model", "lm", "--data", "data.json", "--max-length", "96", "--eval-size", "8", "--no-progress"]
    assert main(["train", *relative, "--steps", "1", "--mask", str(run), "--out", str(out)]) == 0
    info = read(out / "training.json")
    assert info["data"] == str(work / "data.json") and info["model"] == str(work / "lm")
    assert info["data_sha256"] == hashlib.sha256((work / "data.json").read_bytes()).hexdigest()
    assert len(info["held_out_ids"]) == 8 and all(0 <= i < 40 for i in info["held_out_ids"])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "data.json").write_text(json.dumps(alpaca_rows(40)[::-1]))  # another file under the same name
    monkeypatch.chdir(elsewhere)
    assert main(["eval", str(out), "--json", "eval.json", "--no-progress"]) == 0
    assert read(elsewhere / "eval.json")["held_out_loss"] == pytest.approx(info["loss_after"])


def test_eval_refuses_changed_data_and_warns_on_data_given_instead(work, run, tmp_path, capsys):
    data = tmp_path / "data.json"
    data.write_text(json.dumps(alpaca_rows(40)))
    out = tmp_path / "adapter"
    assert train_on_mask(work, run, out, data=data) == 0
    loss = read(out / "training.json")["loss_after"]
    moved = tmp_path / "moved.json"
    moved.write_bytes(data.read_bytes())
    data.write_text(json.dumps(alpaca_rows(44)))  # changed under the same name
    capsys.readouterr()
    assert main(["eval", str(out), "--no-progress"]) == 2
    err = one_line_error(capsys)
    assert f"{data} has changed since" in err and "--data" in err
    # the same content at another path: the same held-out loss, no warning
    assert main(["eval", str(out), "--data", str(moved), "--json", str(tmp_path / "e.json"), "--no-progress"]) == 0
    assert read(tmp_path / "e.json")["held_out_loss"] == pytest.approx(loss)
    assert "warning" not in capsys.readouterr().err
    # other data on purpose: evaluated, with a warning naming both
    for flag in ("--data", "--eval-data"):
        assert main(["eval", str(out), flag, str(data), "--no-progress"]) == 0
        warning = capsys.readouterr().err
        assert warning.startswith("warning:") and str(data) in warning and f"{data} (sha256" in warning


def test_eval_refuses_a_base_model_whose_weights_changed_and_warns_on_one_given(work, run, tmp_path, capsys):
    lm = tiny_lm_dir(tmp_path / "lm")
    out = tmp_path / "adapter"
    assert train_on_mask(work, run, out, "--model", str(lm)) == 0
    tiny_lm_dir(lm, seed=1)  # other weights under the same name
    capsys.readouterr()
    assert main(["eval", str(out), "--no-progress"]) == 2
    assert f"the base model {lm} (weights" in one_line_error(capsys)
    assert main(["eval", str(out), "--model", str(lm), "--no-progress"]) == 0
    assert capsys.readouterr().err.startswith(f"warning: evaluating on the base model {lm} (weights")


def test_eval_of_held_out_data_from_a_separate_file_takes_eval_data_not_data(work, run, tmp_path, capsys):
    (tmp_path / "test.json").write_text(json.dumps(alpaca_rows(12)))
    out = tmp_path / "adapter"
    assert train_on_mask(work, run, out, "--eval-data", str(tmp_path / "test.json")) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--data", str(work / "data.json")]) == 2
    assert "come from the separate file" in one_line_error(capsys)


# --- 2. --top-k with --mask -----------------------------------------------------------------------------------------


def test_top_k_with_a_mask_takes_the_best_of_its_ranking(work, run, tmp_path, capsys):
    ranking = read(run / "importance.json")["ranking"]
    for top_k, k in (("2", 2), ("0.5", 7)):
        out = tmp_path / f"top{top_k}"
        assert train_on_mask(work, run, out, "--top-k", top_k) == 0
        assert read(out / "adapter_config.json")["selected_layers"] == ranking[:k]
        info = read(out / "training.json")
        assert (info["top_k"], info["layers"]) == (float(top_k) if "." in top_k else int(top_k), k)
    layers = ["--layers", ranking[0], "--top-k", "2"]
    assert main(["train", *common(work), *layers, "--out", str(tmp_path / "x")]) == 2
    assert "--top-k takes the best layers of a ranking" in one_line_error(capsys)


# --- 3. masks carry their model -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def other_runs(work, tmp_path_factory):
    """Runs on a 3-block model (other candidates) and on a 2-block model with other weights (same architecture)."""
    root = tmp_path_factory.mktemp("other")
    runs = {}
    for name, lm in (("deeper", tiny_lm_dir(root / "lm3", layers=3)), ("reseeded", tiny_lm_dir(root / "lm1", seed=1))):
        identify(work, root / name, "--model", str(lm), "--top-k", "0.5")  # the later --model wins
        runs[name] = root / name
    return runs


def test_a_mask_from_another_model_is_refused_unless_allowed(work, other_runs, tmp_path, capsys):
    deeper = read(other_runs["deeper"] / "importance.json")
    assert len(deeper["candidates"]) == 21 and deeper["base_model"]["architecture_sha256"]
    capsys.readouterr()
    assert train_on_mask(work, other_runs["deeper"], tmp_path / "a") == 2
    err = one_line_error(capsys)
    assert "was found on" in err and "21 candidate layers" in err and "--allow-other-model" in err
    assert not (tmp_path / "a").exists()
    assert train_on_mask(work, other_runs["deeper"], tmp_path / "a", "--allow-other-model") == 0
    kept = [n for n in deeper["selected"] if not n.startswith("model.layers.2.")]
    assert read(tmp_path / "a" / "adapter_config.json")["selected_layers"] == kept
    assert f"dropped {len(deeper['selected']) - len(kept)} of its {len(deeper['selected'])}" in capsys.readouterr().out


def test_a_mask_from_other_weights_of_the_same_architecture_is_applied_with_a_note(work, other_runs, tmp_path, capsys):
    reseeded = read(other_runs["reseeded"] / "importance.json")
    capsys.readouterr()
    assert train_on_mask(work, other_runs["reseeded"], tmp_path / "a") == 0
    out = capsys.readouterr().out
    assert "same architecture, other weights" in out and reseeded["model"] in out and str(work / "lm") in out
    assert read(tmp_path / "a" / "adapter_config.json")["selected_layers"] == reseeded["selected"]


def test_compare_says_when_runs_come_from_other_models(run, other_runs, tmp_path, capsys):
    runs = [str(run), str(other_runs["deeper"]), str(other_runs["reseeded"])]
    labels = ["--label", "tiny", "--label", "deeper", "--label", "reseeded"]
    assert main(["compare", *runs, *labels, "--out", str(tmp_path / "c")]) == 0
    printed = capsys.readouterr().out
    assert "tiny and deeper come from different models" in printed and "14 common candidate layers" in printed
    data = read(tmp_path / "c" / "compare.json")
    assert data["labels"] == ["tiny", "deeper", "reseeded"]
    pair = data["pairs"][0]
    assert pair["common_candidates"] == 14 and pair["same_model"] is False
    common_selected = [n for n in read(other_runs["deeper"] / "importance.json")["selected"] if "layers.2." not in n]
    tiny_selected = set(read(run / "importance.json")["selected"])
    union = tiny_selected | set(common_selected)
    assert pair["jaccard"] == pytest.approx(len(tiny_selected & set(common_selected)) / len(union))


# --- 4. column mapping ----------------------------------------------------------------------------------------------


def test_columns_are_detected_or_mapped_and_recorded(work, tmp_path, capsys):
    gpteacher = [
        {"instruction": r["instruction"], "input": r["input"], "response": r["output"]} for r in alpaca_rows(40)
    ]
    (tmp_path / "gpteacher.json").write_text(json.dumps(gpteacher))
    custom = [{"ask": r["instruction"], "reply": r["output"]} for r in alpaca_rows(40)]
    (tmp_path / "custom.json").write_text(json.dumps(custom))
    for name, extra, columns in (
        ("gpteacher", [], {"instruction": "instruction", "input": "input", "output": "response"}),
        ("custom", ["--columns", "instruction=ask,output=reply"], {"instruction": "ask", "output": "reply"}),
    ):
        args = common(work, "--stage1-max-steps", "2", "--stage2-steps", "1", *extra)
        args[args.index("--data") + 1] = str(tmp_path / f"{name}.json")
        assert main(["identify", *args, "--out", str(tmp_path / name)]) == 0
        assert read(tmp_path / name / "importance.json")["columns"] == columns
        assert "columns: " + ", ".join(f"{k}={v}" for k, v in columns.items()) in capsys.readouterr().out


# --- 5. the command line after a plain install ----------------------------------------------------------------------


@pytest.mark.parametrize("command", ["identify", "demo"])
def test_without_the_app_extra_plotting_commands_refuse_before_any_work(work, tmp_path, capsys, monkeypatch, command):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    monkeypatch.setattr("peft_ila.app.pipeline.prepare", lambda *a, **k: pytest.fail("work started"))
    assert main([command, *common(work), "--out", str(tmp_path / "out")]) == 2
    err = one_line_error(capsys)
    assert "needs matplotlib" in err and "pip install 'peft-ila[app]'" in err
    assert list(tmp_path.iterdir()) == []


def test_without_the_app_extra_training_on_given_layers_works(work, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    for module in ("peft_ila.app.report", "peft_ila.app.plots"):  # imported afresh, as in a new process
        monkeypatch.delitem(sys.modules, module, raising=False)
    args = ["train", *common(work, "--steps", "1"), "--layers", "model.layers.1.mlp.down_proj"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main(["eval", str(tmp_path / "a"), "--no-progress"]) == 0


def test_a_gguf_model_without_gguf_is_refused_naming_the_extra(work, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    args = ["train", *common(work), "--model", str(tmp_path / "m.gguf"), "--all-layers", "--out", str(tmp_path / "o")]
    assert main(args) == 2
    assert "needs the gguf package" in one_line_error(capsys)


# --- 6. messages name the flag typed; small things ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "message", "absent"),
    [
        (["--top-k", "0"], "--top-k 0 is invalid: it must be an int >= 1 or a fraction in (0, 1]", "ILAConfig"),
        (["--top-k", "abc"], "--top-k abc is invalid: it must be an int >= 1 or a fraction in (0, 1]", "_top_k"),
        (["--stage2-steps", "0"], "--stage2-steps 0 is invalid: it must be an int >= 1", "ILAConfig"),
        (["--lora-dropout", "1.5"], "--lora-dropout 1.5 is invalid: it must be a number in [0, 1)", "ILAConfig"),
        (["--r", "x"], "--r x is invalid: it must be an int", "usage:"),
        (["--top-k", "500"], "--top-k 500 but the model has 14 candidate layers", "`top_k`"),
        (["--layers", "model.layers.7.mlp.up_proj"], "--layers names 1 layer(s) that are not candidates", "mask"),
        (["--data", "DIRECTORY"], "is a directory; pass a .json, .jsonl or .parquet file", "not a .json"),
    ],
)
def test_messages_name_the_flag_typed(work, tmp_path, capsys, extra, message, absent):
    extra = [str(tmp_path) if x == "DIRECTORY" else x for x in extra]
    command = "train" if "--layers" in extra else "identify"
    assert main([command, *common(work, *extra), "--out", str(tmp_path / "out")]) == 2
    err = one_line_error(capsys)
    assert err.startswith(f"peft-ila {command}: error: ") and message in err and absent not in err, err


def test_every_option_has_help_with_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["identify", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--granularity {module,block} 'module': each adapted weight matrix is a layer" in text
    assert "held-out examples (default: a tenth of the examples, at most 64)" in text


def test_outputs_have_the_permissions_of_plain_files(work, run, tmp_path):
    (tmp_path / "plain").write_text("")
    mode = (tmp_path / "plain").stat().st_mode
    out = tmp_path / "adapter"
    assert train_on_mask(work, run, out) == 0
    for path in (run / "mask.safetensors", run / "importance.json", out / "adapter_model.safetensors"):
        assert path.stat().st_mode == mode, path


def test_no_deprecation_warning_from_the_peft_wrapping(work, run, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert train_on_mask(work, run, tmp_path / "a") == 0
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]


def test_compare_labels_default_to_the_shortest_distinct_path(work, run, tmp_path, capsys):
    twin = tmp_path / "b" / "run"
    identify(work, twin, "--seed", "1")
    assert main(["compare", str(run), str(twin), "--out", str(tmp_path / "c")]) == 0
    labels = read(tmp_path / "c" / "compare.json")["labels"]
    assert labels[1] == "b/run" and labels[0].endswith("/run") and labels[0] != labels[1]
    assert main(["compare", str(run), str(twin), "--label", "one", "--out", str(tmp_path / "d")]) == 2
    assert "--label given 1 time(s) for 2 runs" in one_line_error(capsys)


def test_a_json_file_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    from pathlib import Path

    from peft_ila.app.files import write_json

    path = tmp_path / "cell.json"
    write_json(path, {"loss": 1.5})
    real = Path.write_text

    def dies_halfway(self, text, *args, **kwargs):
        real(self, text[: len(text) // 2])
        raise KeyboardInterrupt  # the process is stopped mid-write

    monkeypatch.setattr(Path, "write_text", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        write_json(path, {"loss": 2.5, "steps": 200})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"loss": 1.5} and [p.name for p in tmp_path.iterdir()] == ["cell.json"]
