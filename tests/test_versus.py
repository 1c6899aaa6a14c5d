"""`peft-ila versus` on the tiny model: every default mode with 2 seeds, the page, the JSON and the plot, a killed run
continued to the uninterrupted records, changed settings refused, bad input in one line; and the judge it uses."""

from __future__ import annotations

import json

import pytest
from test_cli import stop_at_step

import peft_ila.app.pipeline
import peft_ila.app.versus
from conftest import common
from peft_ila.app.cli import main
from peft_ila.app.judge import beyond, difference, pooled_sd, ratio
from peft_ila.app.recipe import MODES
from peft_ila.app.versus_page import _table, compare, verdict

STEPS, STAGE1 = 8, 4


def versus(work, out, *extra) -> list[str]:
    """`peft-ila versus` on `work`'s tiny model and data: every mode, 2 seeds, `STEPS` steps, a reference set."""
    budget = ["--stage1-max-steps", str(STAGE1), "--stage2-steps", "2", "--steps", str(STEPS), "--seeds", "2"]
    reference = ["--reference", str(work / "other.json"), "--reference-size", "6", "--timing-steps", "2"]
    reference += ["--instructions", "3", "--instruction-tokens", "24"]
    return ["versus", *common(work, *budget, *reference, *extra), "--out", str(out)]


@pytest.fixture(scope="session")
def compared(work):
    """A finished versus directory on `work`."""
    rows = [{"instruction": f"Say {w}.", "input": "", "output": f"{w}, {w} and {w}."} for w in "abcdefghij"]
    (work / "other.json").write_text(json.dumps(rows))
    assert main(versus(work, work / "versus")) == 0
    return work / "versus"


def records(out) -> dict[str, dict]:
    """Each run's record without what the clock and the memory reading decide."""
    kept = {}
    for path in sorted((out / "runs").glob("*.json")):
        record = json.loads(path.read_text())
        record["identification"].pop("seconds", None)
        timing = ("seconds", "evaluation_seconds", "median_step_seconds", "memory", "resumed")
        kept[path.stem] = {k: v for k, v in record.items() if k not in timing}
    return kept


def one_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    return err[0]


def test_every_default_mode_runs_with_two_seeds_and_is_judged_on_a_page_a_json_and_a_plot(compared):
    results = json.loads((compared / "versus.json").read_text())
    assert sorted((r["mode"], r["seed"]) for r in results["runs"]) == sorted((m, s) for m in MODES for s in (0, 1))
    assert results["missing"] == []
    for run in results["runs"]:  # checkpoints at the evenly spaced steps, the end last; inside's in stage 1 too
        assert [point["step"] for point in run["checkpoints"]] == [2, 4, 6, 8], run["mode"]
        assert all(point["forgetting"] is not None for point in run["checkpoints"])
        closing = run["closing"]  # at the end, and at the fine-tune's checkpoint of lowest held-out loss
        stage1 = run["identification"]["stage1_steps"] if run["mode"] == "inside" else 0  # not candidates for the best
        best = min((point for point in run["checkpoints"] if point["step"] > stage1), key=lambda p: p["held_out"])
        assert closing["best"]["step"] == best["step"] and len(closing["end"]["instructions"]["obeyed"]) == 3
    assert set(results["base"]["closing"]["instructions"]) == {"share", "se", "obeyed"}
    rows = results["comparisons"]["modes"]
    for mode in ("inside", "ila-75", "lisa"):
        assert rows[mode]["delta_held_out"] is not None and rows[mode]["wall"] > 0
        assert rows[mode]["label"] in results["answer"]
    assert set(results["timing"]) == {*MODES, "probe-stage1", "probe-stage2"}
    page = (compared / "VERSUS.md").read_text()
    assert results["answer"] in page and "| LISA (2 blocks of full weights) | 2 |" in page
    assert (compared / "versus.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("every", ["100", "0"])  # 100: saved at the checkpoints, every 2 steps
def test_a_killed_run_continues_to_the_uninterrupted_records(work, compared, tmp_path, monkeypatch, capsys, every):
    stop_at_step(monkeypatch, peft_ila.app.pipeline, 2 * STEPS + 3)  # in the third run (inside, seed 0)
    command = versus(work, tmp_path / "v", "--checkpoint-every", every)
    assert main(command) == 130
    runs = tmp_path / "v" / "runs"
    assert len(list(runs.glob("*.json"))) == 2
    state = runs / "inside-seed0.running.safetensors"  # saved at the step before, with the checkpoint there
    assert state.is_file() == (every != "0")
    monkeypatch.undo()
    capsys.readouterr()
    assert main(command) == 0
    went_on = "; 1 run(s) cut short go on from where they were saved" if every != "0" else ""
    assert f"run(s) already finished are kept{went_on}\n" in capsys.readouterr().out
    assert records(tmp_path / "v") == records(compared) and not state.exists()
    resumed = json.loads((runs / "inside-seed0.json").read_text())["resumed"]
    assert resumed == (every != "0")  # went on from its state, or ran again from the start


def test_other_settings_are_refused_and_fewer_modes_and_seeds_reuse_the_runs(work, compared, tmp_path, capsys):
    assert main(versus(work, compared, "--lr", "0.002")) == 2
    assert "schedule" in one_line(capsys) and (compared / "runs" / "lisa-seed1.json").is_file()
    copy = tmp_path / "fewer"
    (copy / "runs").mkdir(parents=True)
    for name in ("plan.json", "base.json", ".peft-ila.json"):
        (copy / name).write_bytes((compared / name).read_bytes())
    (copy / "runs" / "lora-all-seed0.json").write_bytes((compared / "runs" / "lora-all-seed0.json").read_bytes())
    args = versus(work, copy)
    args[args.index("--seeds") + 1] = "1"
    assert main([*args[:-2], "--modes", "lora-all", "--out", str(copy)]) == 0
    kept = (copy / "runs" / "lora-all-seed0.json").read_bytes()
    assert kept == (compared / "runs" / "lora-all-seed0.json").read_bytes()  # read, not run again
    assert "no mode but LoRA-all has run yet" in (copy / "VERSUS.md").read_text()


@pytest.mark.parametrize(
    "extra, must, before_loading",
    [
        (("--modes", "inside,ila-75"), "must include lora-all", True),
        (("--modes", "lora-all,gates"), "--modes gates: unknown", True),
        (("--reference", "missing.json"), "missing.json", True),
        (("--timing-steps", "1"), "--timing-steps 1 is invalid", True),
        (("--load-in-4bit",), "--modes lisa trains full weights, which a --load-in-4bit base stores quantized", True),
        (("--stage1-max-steps", "8"), "leaves nothing of the 8 steps to mode inside", False),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    work, compared, tmp_path, capsys, monkeypatch, extra, must, before_loading
):
    if before_loading:
        monkeypatch.setattr(peft_ila.app.versus, "prepare_data", lambda *a: pytest.fail("the model was loaded"))
    assert main(versus(work, tmp_path / "v", *extra)) == 2
    assert must in one_line(capsys)
    assert not (tmp_path / "v").exists()


def test_a_reference_with_the_training_data_s_content_is_refused_before_loading(
    work, compared, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(peft_ila.app.versus, "prepare_data", lambda *a: pytest.fail("the model was loaded"))
    same = tmp_path / "same.json"
    same.write_bytes((work / "data.json").read_bytes())  # another name, the same rows
    assert main(versus(work, tmp_path / "v", "--reference", str(same))) == 2
    assert f"--reference {same} has the same content as --data {work / 'data.json'}: its loss rise" in one_line(capsys)
    assert not (tmp_path / "v").exists()


def test_a_dry_run_prints_the_plan_and_its_cost_and_writes_nothing(work, compared, tmp_path, capsys):
    assert main(versus(work, tmp_path / "v", "--dry-run")) == 0
    out = capsys.readouterr().out
    assert "plan: 8 runs" in out and "at steps 2, 4, 6, 8" in out and "estimate:" in out
    assert main(versus(work, tmp_path / "v", "--dry-run", "--target-modules", "q_proj,v_proj")) == 0  # a set of names
    assert not (tmp_path / "v").exists()


def test_the_judge_pools_the_seeds_and_applies_the_two_standard_error_rule():
    assert pooled_sd([[1.0, 3.0], [2.0, 4.0], [7.0]]) == pytest.approx(2**0.5)
    assert pooled_sd([[1.0], [2.0]]) is None
    delta = difference([1.0, 1.2], [1.5, 1.7], 0.1)
    assert delta == pytest.approx((-0.5, 0.1))
    assert beyond(delta) == -1 and beyond((0.15, 0.1)) == 0 and beyond((0.25, 0.1)) == 1
    assert ratio(2.0, 4.0) == 0.5 and ratio(1.0, 0.0) is None


def test_verdicts_follow_the_rule_for_loss_and_forgetting():
    def run(mode, seed, loss, forgetting):
        point = {"step": 4, "held_out": loss, "references": {}, "forgetting": forgetting}
        return {"mode": mode, "seed": seed, "checkpoints": [point], "seconds": 1.0, "identification": {}}

    runs = [run("lora-all", 0, 1.00, 0.10), run("lora-all", 1, 1.02, 0.12)]
    runs += [run("ila-75", 0, 1.01, 0.02), run("ila-75", 1, 1.03, 0.04)]
    runs += [run("lisa", 0, 1.50, 0.11), run("lisa", 1, 1.52, 0.13)]
    rows = compare(runs, ["lora-all", "ila-75", "lisa"], None, 4, {"held_out": 1.2})["modes"]
    assert verdict(rows["ila-75"]).startswith("level with LoRA-all") and "forgets less" in verdict(rows["ila-75"])
    assert verdict(rows["lisa"]).startswith("worse than LoRA-all") and "forgets as much" in verdict(rows["lisa"])
    value, error = rows["ila-75"]["matched"]["delta"]  # at the held-out losses both reach, ila-75 forgets less
    assert rows["ila-75"]["matched"]["range"] == (1.03, 1.2) and value < -2 * error
    assert rows["ila-75"]["between_checkpoints"] is None  # one checkpoint each: no stretch between checkpoints
    assert "| Δ forgetting, between checkpoints only |" in _table(rows)[0]
    single = compare(runs[:1] + runs[2:3], ["lora-all", "ila-75"], None, 4, {"held_out": 1.2})["modes"]
    assert verdict(single["ila-75"]) == "not judged: one seed gives no noise scale"


def test_curves_that_overfit_are_also_compared_past_their_best():
    def run(mode, seed, end_forgetting):  # best at step 2, then held-out loss and forgetting climb
        points = [(2, 1.0, 0.0), (4, 1.1, end_forgetting)]
        checkpoints = [{"step": s, "held_out": h, "references": {}, "forgetting": f} for s, h, f in points]
        return {"mode": mode, "seed": seed, "checkpoints": checkpoints, "seconds": 1.0, "identification": {}}

    runs = [run("lora-all", 0, 0.10), run("lora-all", 1, 0.12), run("ila-75", 0, 0.02), run("ila-75", 1, 0.04)]
    rows = compare(runs, ["lora-all", "ila-75"], None, 4, {"held_out": 1.2})["modes"]
    found = rows["ila-75"]["past_best"]
    value, error = found["delta"]  # mean forgetting over the climb from 1.0 to 1.1: half the end's, 0.015 - 0.055
    assert found["range"] == pytest.approx((1.0, 1.1)) and value == pytest.approx(-0.04) and value < -2 * error
    assert "| -0.0400 ± " in next(line for line in _table(rows) if line.startswith("| ILA top 75%"))


def test_a_kill_while_the_page_is_written_leaves_a_directory_that_continues(work, compared, tmp_path, monkeypatch):
    import peft_ila.app.plots

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("stopped by the test")

    args = versus(work, tmp_path / "v", "--modes", "lora-all")
    args[args.index("--seeds") + 1] = "1"
    monkeypatch.setattr(peft_ila.app.plots, "versus_plot", killed)  # after versus.json and VERSUS.md are written
    assert main(args) == 130
    assert (tmp_path / "v" / "versus.json").is_file() and (tmp_path / "v" / "runs" / "lora-all-seed0.json").is_file()
    monkeypatch.undo()
    assert main(args) == 0  # every file there was named in the manifest before it was written
    assert main([*args, "--overwrite"]) == 0


def test_the_plot_draws_each_mode_s_mean_at_the_steps_every_run_measured(tmp_path, monkeypatch):
    import matplotlib.axes

    from peft_ila.app.plots import versus_plot

    def run(mode: str, steps: list[int], held_out: float, rise: float | None) -> dict:
        points = [{"step": s, "held_out": held_out - s / 10, "forgetting": rise and rise * s} for s in steps]
        return {"mode": mode, "checkpoints": points}

    drawn = []
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda ax, x, y, *a, **k: drawn.append((x, y, k.get("label"))))
    runs = [run("lora", [1, 2], 2.0, 0.1), run("lora", [1, 2, 3], 2.2, 0.3), run("ila", [1], 2.0, 0.2)]
    versus_plot(tmp_path / "versus.png", runs, {"held_out": 2.5}, ["lora", "ila"])
    means = [(x, y) for x, y, label in drawn if label and "mean" in label]
    assert [label for *_, label in drawn if label] == ["lora (mean of 2)", "ila", "base model"]
    assert means == [([2.5, 2.0, 1.9], [0.0, 0.2, 0.4])]  # steps 1 and 2 only: the second run's step 3 is its own
    assert sum(label is None for *_, label in drawn) == 2  # each of lora's runs, faint beneath the mean
    drawn.clear()
    versus_plot(tmp_path / "versus.png", [run("lora", [1, 2], 2.0, None)], {"held_out": 2.5}, ["lora"])
    assert drawn == [([1, 2], [1.9, 1.8], "lora")]  # no forgetting measured: held-out loss against step
