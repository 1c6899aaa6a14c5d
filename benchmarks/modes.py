"""Is there a way of using ILA's importance that beats LoRA on all layers at no more memory and no more
wall time? Training modes against LoRA-all and the grid's ILA rows, on the grid's data, model and judges.

    python -m benchmarks.modes --preset full    # resumable: a finished cell is kept, a missing one computed
    python -m benchmarks.modes --preset quick   # smoke-sized

The modes (`MODES`): LoRA on all layers and ILA's top 25% / 75% (the grid's cells, read from the grid's folder when
the settings are the grid's); LISA (full weights of a few blocks, drawn uniformly every few steps); the same drawn
by ILA's block importance; identification inside the fine-tune (stage 1 is the fine-tune's first steps, its top
75% go on with their stage-1 weights), scored by ILA's estimator or, with no stage 2 at all, by stage 1's update
norms (LoRA-drop's idea); the same with every adapter merged and blocks drawn by its scores training full weights;
full fine-tuning of ILA's top layers within LoRA-all's trainable parameters.

Fairness: each family's learning rate (the preset's `rates`) is the best of one sweep on the primary dataset with
the first seed, then fixed. Wall time and memory come from one side-by-side timing cell (every mode's steps, and
identification's two stages, a few steps each in turn, in one process), in units of a LoRA-all step: identification
counts whenever a mode needs one. Cells (`benchmarks/results/modes/<preset>/`): `tune-*` (a mode, dataset, seed,
learning rate and step count) and `timing-*`; the grid's cells are read (or computed) in the grid's folder. Writes
`modes.json` and `MODES.md` (`modes_report.py`: findings and page).
"""

from __future__ import annotations

import argparse
import copy
import math
from collections.abc import Iterable
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
from peft import get_peft_model

from benchmarks import grid as grid_study
from benchmarks import modes_report
from benchmarks.core.cells import Missing, Study
from benchmarks.core.inputs import ROOT
from benchmarks.core.page import Finding
from benchmarks.core.recipes import side_by_side, train_briefly
from benchmarks.grid import ADAPTER, Grid
from benchmarks.modes_report import MODES, NEW, best_new, equal_time_steps
from peft_ila import (
    ILAConfig,
    LayerSampler,
    LayerwiseConfig,
    Selection,
    identify_important_layers,
    lora_parameter_count,
    top_within_parameters,
    train_only_selected,
)
from peft_ila.tuner.layerwise import block_groups, block_importance

ON_GRID = {"all": ("all", 1.0), "ila-25": ("ila", 0.25), "ila-75": ("ila", 0.75)}  # mode -> the grid's selector
SWEPT = {"lora": "all", "sampled": "lisa", "full": "ila-full"}  # the mode each family's learning rate is swept on
# ila-sampled's draws (LayerwiseConfig): probability ∝ block importance ** 2. On alpaca's mask a block is then drawn
# 0.3x to 4.5x as often as uniformly; with weight 0.5 and temperature 1 (0.8x to 1.6x) 18 of the first 23 draws
# were LISA's own, too close to tell the two apart
IMPORTANCE = dict(importance_weight=1.0, temperature=0.5)
INSIDE_TOP = 0.75  # ila-inside(-norm): the share of layers that go on after identification
EXTEND = 2  # a sweep won at an end is extended past it this many times at most
PROBE = ("probe-stage1", "probe-stage2")  # identification's stages, rows of the timing cell
# the timing cell's mode rows (part of its key): a mode added later is timed as the row it trains like (Mode.timed_as)
TIMED = ("all", "ila-25", "ila-75", "lisa", "ila-sampled", "ila-inside", "ila-full")
VERSION = 1  # part of every cell's key: bump it when what a cell computes changes

PRESETS = {
    "smoke": dict(  # the test suite's, on a tiny model: every path once (no noise scale: one seed)
        grid="quick",
        rates={"lora": (1e-3,), "sampled": (1e-4,), "full": (1e-4,)},
        seeds=[0],
        other_seeds=[0],
        equal_time_seeds=[0],
        long_seeds=[0],
        long_epochs=2,
        layerwise=dict(active=1, interval=2),
        timing=(1, 2),
    ),
    "quick": dict(
        grid="quick",
        # LoRA at the grid's rate, so that its LoRA-all and ILA cells serve; the sampled family's sweep is extended
        rates={"lora": (1e-3,), "sampled": (1e-4, 3e-4), "full": (1e-4,)},
        seeds=[0],  # the grid's LoRA-all and ILA rows have two: the noise scale
        other_seeds=[0],
        equal_time_seeds=[0],
        long_seeds=[0],
        long_epochs=2,
        layerwise=dict(active=2, interval=2),
        timing=(1, 2),
    ),
    "full": dict(
        grid="full",
        rates={"lora": (3e-4, 1e-3, 3e-3), "sampled": (1e-4, 3e-4, 1e-3), "full": (3e-5, 1e-4, 3e-4)},
        seeds=[0, 1, 2],  # the primary dataset: every mode
        other_seeds=[0, 1],  # the other datasets: the best two new modes and the grid's rows
        # the primary dataset, every new mode given LoRA-all's wall time; one seed: the question is whether a faster
        # mode's extra steps close its gap to LoRA-all, and the gaps at one epoch are many standard errors or none
        equal_time_seeds=[0],
        long_seeds=[0, 1],  # the long regime on the primary dataset: LoRA-all, ILA top 75%, the best two new modes
        long_epochs=3,
        layerwise=dict(active=2, interval=10),  # LISA's: 2 blocks, re-drawn every 10 steps
        timing=(3, 8),  # side by side: rounds, and optimizer steps per mode in each (the first one not timed)
    ),
}


def ladder_step(rate: float, up: bool) -> float:
    """The next learning rate of the 1-3-10 ladder above (or below) `rate` (1e-3 -> 3e-3 -> 1e-2)."""
    exponent = math.floor(math.log10(rate) + 1e-9)
    mantissa = rate / 10**exponent
    factor = (3 if mantissa < 2 else 10) if up else (0.3 if mantissa < 2 else 1)
    return float(f"{factor * 10**exponent:.3g}")


class Modes(Study):
    """The modes' cells; the grid (its data, base model, judges and cells) underneath."""

    name, page_name, target, presets = "modes", "MODES.md", "make bench-modes", PRESETS

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        self.grid = Grid.beneath(args, self.p["grid"])
        self.data, self.base = self.grid.data, self.grid.base
        self.rates: dict[str, float] = {}

    @classmethod
    def options(cls, parser: argparse.ArgumentParser) -> None:
        Grid.options(parser)
        folder = ROOT / "benchmarks" / "results" / "grid"
        parser.add_argument("--grid-cells", type=Path, default=folder, help="the grid's cells (one folder per preset)")

    # --- what a mode trains --------------------------------------------------------------------------------------

    def mask(self, name: str) -> Selection:
        """ILA's selection on dataset `name` (the grid's mask cell: library defaults, seed 0)."""
        return Selection.from_json(self.grid.mask(name)["selection"])

    def draws(self, uniform: bool) -> dict:
        """Sampled training's draws (`LayerwiseConfig`'s fields): the preset's, uniform (LISA's) or by importance."""
        return {**self.p["layerwise"], **({} if uniform else IMPORTANCE)}

    def sampler(self, model: torch.nn.Module, seed: int, importance: dict | None, interval: int = 0) -> LayerSampler:
        """Draws of `model`'s blocks by block `importance` (None: uniform) every `interval` steps (0: the preset's)."""
        config = LayerwiseConfig(**self.draws(uniform=importance is None), seed=seed)
        config = replace(config, interval=interval) if interval else config
        return LayerSampler(block_groups(model, self.grid.candidates), config, importance)

    def prepared(self, name: str, mode: str, seed: int, interval: int = 0) -> tuple[torch.nn.Module, dict]:
        """A fresh model for `mode` (not ila-inside) and what `finetune` needs beside it (`sampler` or `params`)."""
        torch.manual_seed(seed)  # adapters' initialisation
        if mode in ON_GRID:
            selector, share = ON_GRID[mode]
            return self.grid.adapted(name, self.grid.select(name, selector, share, seed)), {}
        model = copy.deepcopy(self.base)
        if mode == "ila-full":
            budget = lora_parameter_count(model, self.grid.candidates, ADAPTER["r"])  # LoRA-all's trainable ones
            chosen = top_within_parameters(model, self.mask(name), budget)
            return model, {"params": train_only_selected(model, chosen)}
        importance = block_importance(self.mask(name).scores) if mode == "ila-sampled" else None
        return model, {"sampler": self.sampler(model, seed, importance, interval)}

    def inside(self, name: str, mode: str, seed: int, lr: float, steps: int) -> dict:
        """Identification on the fine-tune's own data order, stage 1 at the LoRA family's learning rate with its
        weights kept; then, for the rest of `steps` where stage 1 stopped, at `lr`: ila-inside's top `INSIDE_TOP`
        go on, or (ila-inside-sampled) every adapter is merged and blocks drawn by the scores train full weights."""
        sampled = mode == "ila-inside-sampled"
        budget = dict(stage1_max_steps=self.grid.p["stage1"], stage2_steps=self.grid.p["stage2"])
        top, estimator = 1.0 if sampled else INSIDE_TOP, MODES[mode].estimator
        config = ILAConfig(task_type="CAUSAL_LM", **ADAPTER, **budget, top_k=top, seed=seed, estimator=estimator)
        config = replace(config, keep_stage1_weights=True, stage1_lr=self.rate("all"))
        torch.manual_seed(seed)
        model = get_peft_model(copy.deepcopy(self.base), config)
        result = identify_important_layers(model, self.data.batches(name, seed), progress=self.args.progress)
        stage1, how = result.stage1.steps, {}
        if sampled:
            model = model.merge_and_unload()
            how["sampler"] = self.sampler(model, seed, block_importance(result.scores))
        judged = self.grid.judged(name, model, steps - stage1, lr, seed, skip=result.stage1.micro_batches, **how)
        return {**judged, "stage1_steps": stage1, "stage2_steps": result.stage2.steps, "steps": steps}

    # --- cells ---------------------------------------------------------------------------------------------------

    def tune(self, name: str, mode: str, seed: int, lr: float, steps: int | None = None) -> dict:
        """`mode` fine-tuned on dataset `name` with `seed` at `lr` for `steps` optimizer steps (default: the grid's
        one epoch), identification's stage 1 included for ila-inside; the grid's cell when the grid ran it."""
        steps = steps or self.grid.steps(name)
        if mode in ON_GRID and lr == grid_study.LR and steps == self.grid.steps(name):
            return self.grid.tune(name, *ON_GRID[mode], seed)
        others = [other for other in self.data.names if other != name]
        settings = {**self.grid.identity(name), "mode": mode, "lr": lr, "steps": steps, "seed": seed, **ADAPTER}
        settings.update(others={o: self.grid.identity(o) for o in others}, knowledge=self.grid.knowledge_identity)
        settings.update(self.mode_settings(name, mode), modes_version=VERSION)

        def compute(stem: Path) -> dict:
            if MODES[mode].identification == "inside":
                return self.inside(name, mode, seed, lr, steps)
            model, how = self.prepared(name, mode, seed)
            judged = self.grid.judged(name, model, steps, lr, seed, **how)
            if mode == "ila-full":
                judged["layers"] = [n for n in self.grid.candidates if model.get_submodule(n).weight.requires_grad]
            return judged

        return self.cell("tune", settings, compute)

    def mode_settings(self, name: str, mode: str) -> dict:
        """What a mode's cell depends on beyond the fine-tune's settings."""
        out: dict = {}
        if MODES[mode].identification == "separate":
            out["mask"] = self.grid.mask(name)["settings"]
        if MODES[mode].family == "sampled":
            out["layerwise"] = self.draws(uniform=mode == "lisa")
        if mode == "ila-inside":
            out.update(stage1=self.grid.p["stage1"], stage2=self.grid.p["stage2"], inside_top=INSIDE_TOP)
        if mode == "ila-inside-norm":
            out.update(stage1=self.grid.p["stage1"], estimator=MODES[mode].estimator, inside_top=INSIDE_TOP)
        if mode == "ila-inside-sampled":
            out.update(stage1=self.grid.p["stage1"], stage2=self.grid.p["stage2"], stage1_lr=self.rate("all"))
        return out

    def timing(self, name: str) -> dict:
        """Every mode, and identification's two stages, trained side by side on `name`: in each of the preset's
        rounds each runs a few AdamW steps in turn. A sampled mode draws anew at every step (another seed each
        round), so its mean covers many draws. Each row: mean step seconds (a run's first step left out) and the
        largest peak memory rise of its rounds (MB)."""
        rounds, steps = self.p["timing"]
        rows = [*TIMED, *PROBE]
        settings = {**self.grid.identity(name), **ADAPTER, "rounds": rounds, "steps": steps, "rows": rows}
        settings.update(mask=self.grid.mask(name)["settings"], layerwise=self.p["layerwise"], modes_version=VERSION)

        def compute(stem: Path) -> dict:
            return side_by_side({row: partial(self.timed, name, row, steps=steps) for row in rows}, rounds)

        return self.cell("timing", settings, compute)

    def timed(self, name: str, row: str, round_: int, steps: int) -> tuple[list[float], float]:
        """`steps` steps of a timing row (see `timing`): its step seconds but the first, and its memory rise."""
        batches = self.data.batches(name, 0)
        if row in PROBE:
            probe = get_peft_model(copy.deepcopy(self.base), ILAConfig(task_type="CAUSAL_LM", **ADAPTER))
            if row == "probe-stage1":
                return train_briefly(probe, batches, steps, grid_study.LR)
            with probe.base_model.gate_stage() as bank:  # the gate logits train (a buffer, not a parameter)
                return train_briefly(probe, batches, steps, probe.peft_config["default"].gate_lr, [bank.logits])
        row = MODES[row].timed_as or row  # after identification ila-inside trains as ILA's top 75% does
        model, how = self.prepared(name, row, round_, interval=1)
        return train_briefly(model, batches, steps, grid_study.LR, **how)

    # --- the study -----------------------------------------------------------------------------------------------

    def rate(self, mode: str) -> float:
        """The learning rate of `mode`'s family (`Missing` until its sweep is in)."""
        family = MODES[mode].family
        if family not in self.rates:
            raise Missing(f"it waits for the {family} family's learning-rate sweep")
        return self.rates[family]

    def run(self) -> dict:
        primary, names, p = self.data.primary, self.data.names, self.p
        shape = ("batch_size", "max_length", "eval_size", "stage1", "stage2")
        settings = {**p, "grid": {k: self.grid.p[k] for k in shape}, "steps": {n: self.grid.steps(n) for n in names}}
        results = {"datasets": names, "primary": primary, "settings": settings, "sweep": [], "tunes": [],
                   "no_time_left": [], "base": self.bases()}  # fmt: skip
        timing = self.collect(f"{primary}: every mode timed side by side", self.timing, primary)
        if timing is not None:
            results["timing"] = {k: v for k, v in timing.items() if k not in ("kind", "settings")}
        for family, rates in p["rates"].items():
            best = self.collect(f"the {family} family's sweep", self.bracketed, results, family, list(rates))
            if best is not None:
                self.rates[family] = best
        results["rates"] = dict(self.rates)
        self.add_runs(results, primary, runs(MODES, p["seeds"]), "epoch")
        best = self.collect("the best two new modes", best_new, results, primary, NEW, 2) or []
        for name in names[1:]:  # the grid's rows with every seed, the best two new modes with fewer
            self.add_runs(results, name, runs(ON_GRID, p["seeds"]) + runs(best, p["other_seeds"]), "epoch")
        # the minimum that decides first (LoRA-all, ILA top 75% and the best new mode, 3 epochs, every seed), then
        # every new mode at equal wall time with the first seed, then the rest: the second best at 3 epochs (the best
        # by loss may not be within the wall time), every new mode at equal wall time with any other seeds
        first, *later = p["equal_time_seeds"]
        self.add_runs(results, primary, runs(["all", "ila-75", *best[:1]], p["long_seeds"]), "long")
        self.add_runs(results, primary, runs(NEW, [first]), "equal-time")
        self.add_runs(results, primary, runs(best[1:], p["long_seeds"]), "long")
        self.add_runs(results, primary, runs(NEW, later), "equal-time")
        return results

    def bases(self) -> dict:
        """The base model's held-out loss on each dataset and its share of right answers (the grid's cells)."""
        try:
            bases = {name: self.grid.base_loss(name)["loss"] for name in self.data.names}
            return {**bases, "knowledge": self.grid.base_knowledge()["accuracy"]}
        except Missing:
            return {}

    def bracketed(self, results: dict, family: str, rates: list[float]) -> float:
        """The best learning rate of `family`: its sweep over `rates`, extended along the 1-3-10 ladder past whichever
        end wins, up to `EXTEND` times, so that the rate chosen is one the sweep brackets (`Missing` until computed)."""
        rows = {rate: self.sweep(results, family, rate) for rate in rates}
        for _ in range(EXTEND):
            best = min(rows, key=lambda rate: rows[rate]["loss_after"])
            lowest, highest = min(rows), max(rows)
            if len(rows) < 2 or best not in (lowest, highest):
                break
            rate = ladder_step(best, up=best == highest)
            rows[rate] = self.sweep(results, family, rate)
        return min(rows, key=lambda rate: rows[rate]["loss_after"])

    def sweep(self, results: dict, family: str, lr: float) -> dict:
        """The sweep cell of `family` at `lr` (its swept mode, primary dataset, first seed), added to the results."""
        primary, first = self.data.primary, self.p["seeds"][0]
        found = row(self.tune(primary, SWEPT[family], first, lr), primary, SWEPT[family], first, "epoch")
        results["sweep"].append({**found, "family": family})
        return found

    def add_runs(self, results: dict, name: str, planned: list[tuple[str, int]], regime: str) -> None:
        """Each (mode, seed) `planned` on dataset `name` in `regime` (see `add`), those missing listed."""
        said = {"epoch": "", "long": f", {self.p['long_epochs']} epochs", "equal-time": " at LoRA-all's wall time"}
        for mode, seed in planned:
            self.collect(f"{name}: {mode}{said[regime]}, seed {seed}", self.add, results, name, mode, seed, regime)

    def add(self, results: dict, name: str, mode: str, seed: int, regime: str) -> None:
        """A fine-tune of `mode` at its family's rate in `regime`: "epoch" (the grid's), "long" (`long_epochs`) or
        "equal-time" (LoRA-all's wall time for one epoch, identification included)."""
        steps = self.grid.steps(name) * (self.p["long_epochs"] if regime == "long" else 1)
        if regime == "equal-time":
            if "timing" not in results:
                raise Missing("it waits for the timing cell")
            steps = equal_time_steps(results["timing"], mode, steps, self.grid.p)
            if steps < 1:
                results["no_time_left"] = sorted({*results["no_time_left"], mode})
                return
        record = self.tune(name, mode, seed, self.rate(mode), steps)
        results["tunes"].append(row(record, name, mode, seed, regime))

    def findings(self, results: dict) -> list[Finding]:
        return modes_report.findings(results)

    def page(self, results: dict) -> str:
        return modes_report.page(results)


def runs(modes: Iterable[str], seeds: list[int]) -> list[tuple[str, int]]:
    """Every (mode, seed), seed by seed."""
    return [(mode, seed) for seed in seeds for mode in modes]


def row(record: dict, name: str, mode: str, seed: int, regime: str) -> dict:
    """What the page needs of a fine-tune cell."""
    keep = ("loss_before", "loss_after", "others_after", "knowledge_after", "trainable_params", "seconds")
    out = {"dataset": name, "mode": mode, "seed": seed, "regime": regime, "lr": record["settings"]["lr"]}
    out.update(steps=record["settings"]["steps"], **{k: record.get(k) for k in ("stage1_steps", "stage2_steps")})
    return {**out, **{k: record[k] for k in keep}, "memory_rise_mb": record["memory"].get("rss_rise_mb", 0.0)}


if __name__ == "__main__":
    Modes.main()
