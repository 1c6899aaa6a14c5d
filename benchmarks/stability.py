"""How reproducible is the layer ranking, where does its noise come from, and what does it cost?

    python -m benchmarks.stability --preset full    # `make bench-stability`; resumable: a finished cell is kept
    python -m benchmarks.stability --preset quick   # smoke-sized

The study is a grid of cells, each saved as JSON in `--cells` when it finishes and skipped when present, so it
completes over several runs:

- `stage1-*`: stage 1 (adapters on every candidate layer) on one dataset for a fixed number of steps, from one
  adapter-initialisation seed (`ILAConfig.seed`) and one data-order seed. Its adapter weights are kept beside it
  (`.safetensors`, not committed; recomputed bit for bit when absent) for the estimators; its record holds the
  update norms, i.e. the `update-norm` estimator's scores, and its cost.
- `score-*`: one estimator (with its settings) on one stage-1 cell, with its own stage-2 data order: scores, cost.
- `gradnorm-*`: the cheap baseline (adapter gradient norms over a few steps from fresh adapters), one seed.
- `reference-*`: LoRA on all layers, seconds per optimizer step, so costs read as a fraction of a 3-epoch fine-tune.
- `known-*`: one estimator at one stage-1 length on the planted task of `known_answer.py` (a tiny model whose
  important layers are known), over several seeds: where the planted layers land in its ranking.

Then `stability.json` and a Markdown page (`stability_page.py`): top-k Jaccard (k = 5, 10, 25, 50% of the
candidates) and Spearman between two runs that differ in one source of noise only (adapter initialisation, data
order, or stage 2 alone), against the Jaccard of two random sets; overlap across datasets beside the seed-to-seed
overlap; and the cost of each estimator. The study stands on `benchmarks/core`.
"""

from __future__ import annotations

import argparse
import collections
import copy
import itertools
import json
import math
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
from peft import get_peft_model
from safetensors.torch import load_file, save_file

from benchmarks import known_answer, stability_page
from benchmarks.baselines import gradnorm_scores
from benchmarks.core.cells import Study, key
from benchmarks.core.inputs import ROOT, Inputs
from benchmarks.core.page import Finding
from benchmarks.core.stats import expected_random_jaccard, jaccard, spearman, top_count, top_set
from peft_ila import ILAConfig, identify_important_layers
from peft_ila.app.files import write_json
from peft_ila.app.pipeline import lora_all_layers
from peft_ila.app.report import machine
from peft_ila.identification.importance import Identification
from peft_ila.identification.training import StabilityTest, StepStats, cycle, train_steps
from peft_ila.tuner.selection import CERTAIN, as_float32, layer_of

FRACTIONS = (0.05, 0.10, 0.25, 0.50)
# every: stage-1 cells keep every layer's ||dW|| at every this many steps; known_lengths: stage-1 steps on the planted
# task (`known_answer.py`), with known_seeds seeds each
PRESETS = {
    "quick": dict(eval_size=8, max_length=64, batch_size=2, stage1=[4, 2], stage2=3, lengths_for_datasets=4,
                  gradnorm=2, timing=2, every=1, known_lengths=[4], known_seeds=2),
    "full": dict(eval_size=32, max_length=128, batch_size=4, stage1=[128, 64, 256], stage2=32, lengths_for_datasets=128,
                 gradnorm=8, timing=4, every=8, known_lengths=[16, 64, 256], known_seeds=5),
}  # fmt: skip
PROBE = dict(task_type="CAUSAL_LM", r=8, lora_alpha=16, stage1_lr=1e-3)  # the identification probe's config
# name -> ILAConfig fields of the estimator's stage (update-norm comes free with every stage-1 cell)
ESTIMATORS = {
    "gates": dict(estimator="gates"),
    "gates from 0.9": dict(estimator="gates", gate_init=0.9),
    "first-order": dict(estimator="first-order"),
}
RELATIVE = "update-norm / ||W||"  # ||dW|| over the frozen weight's norm: the size-normalised update norm
NO_STAGE2 = ("update-norm", RELATIVE)  # computed from the stage-1 weights alone
SEEDED = (*NO_STAGE2, *ESTIMATORS)  # every estimator of the seed rows
GRADNORM = "gradient norm (fresh adapters)"  # the cheap baseline: adapter gradient norms over its first steps
SEEDS = [(0, 0), (1, 0), (0, 1)]  # (adapter initialisation, data order): the reference, init only, order only
SOURCES = {"init": ((0, 0), (1, 0)), "order": ((0, 0), (0, 1))}
EPOCHS = 3  # the reference fine-tune a user would otherwise run
MASK_RULES = [(32, 0.8), (32, 0.9), (64, 0.9)]  # (window in steps, top-25% Jaccard with the set a window before)
# the paper's epsilon-stability on the loss: (epsilon, window), ILAConfig's defaults before
PAPER_LOSS_RULE = (0.01, 20)


class Recording(Identification):
    """A stage-1-only identification run ("update-norm", `keep_stage1_weights`) that also keeps every layer's ||dW||
    every `every` steps (`trajectory`, [checks][candidates]) and, at each step in `snapshots`, the adapter weights
    and the cell record a run of that length would have (`taken`), through `Identification`'s per-step hook."""

    def __init__(self, model, every: int, snapshots=()) -> None:
        self.every, self.snapshots, self.trajectory, self.taken = every, set(snapshots), [], {}
        super().__init__(model, on_step=self.observe)

    def observe(self, stats: StepStats) -> None:
        if stats.steps % self.every == 0:
            self.trajectory.append(list(self.update_norms().values()))
        if stats.steps in self.snapshots:
            self.taken[stats.steps] = ({n: w.clone() for n, w in self.adapter_weights().items()}, self.record(stats))

    def adapter_weights(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().contiguous() for n, p in self.model.named_parameters() if ".ila_" in n}

    def record(self, stats: StepStats) -> dict:
        """The update-norm scores now (this run's `UpdateNorm` estimator's), and the stage's cost and losses so far."""
        norms = self.update_norms()
        values = self.estimator.scores(self.bank, None, list(norms.values()))
        scores = {n: as_float32(v) for n, v in zip(norms, values, strict=True)}
        return {"scores": scores, "seconds": stats.seconds, "tokens": stats.tokens, "losses": list(stats.losses)}


class Stability(Study):
    """The cells of one preset: each computed at most once, read back from its folder afterwards."""

    name, page_name, target, presets = "stability", "STABILITY.md", "make bench-stability", PRESETS

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        self.data = Inputs(args, self.p, identity_keys=("max_length", "batch_size"))

    @classmethod
    def options(cls, parser: argparse.ArgumentParser) -> None:
        lengths = "stage-1 lengths to run (default: the preset's)"
        parser.add_argument("--lengths", type=lambda t: [int(x) for x in t.split(",")], help=lengths)
        estimators = "comma-separated estimators of the seed rows (default: all)"
        parser.add_argument("--estimators", type=lambda t: t.split(","), default=list(SEEDED), help=estimators)

    def scores_on(self, dataset: str, steps: int, name: str) -> dict:
        """Estimator `name`'s cell on `dataset` after `steps` stage-1 steps with seeds 0/0 (update-norm: stage 1's)."""
        own = self.stage1(dataset, steps, 0, 0)
        return own if name == "update-norm" else self.score(own, name)

    def run(self) -> dict:
        args, primary = self.args, self.data.primary
        reference = self.reference(primary)
        lengths = sorted(args.lengths or self.p["stage1"], reverse=True)  # the longest run gives the shorter ones
        named = [e for e in SEEDED if e in args.estimators]
        rows = [
            self.collect(f"{name} at {steps} stage-1 steps", seed_row, self, primary, steps, name, reference)
            for steps in lengths
            for name in named
        ]
        rows.append(self.collect("gradient norm", gradnorm_row, self, primary, reference))
        crossed = [e for e in args.estimators if e in ESTIMATORS or e == "update-norm"]
        results = {"rows": [row for row in rows if row], "cross": cross_rows(self, self.data.names, crossed)}
        names = list(self.stage1(primary, self.p["lengths_for_datasets"], 0, 0)["scores"])
        n, blocks = len(names), len({layer_of(name, "block") for name in names})
        results["random"] = {f"jaccard@{f:g}": expected_random_jaccard(n, top_count(f, n)) for f in FRACTIONS}
        results["random_blocks"] = expected_random_jaccard(blocks, top_count(0.25, blocks))
        results["known"] = known_rows(self, args.estimators)
        results["calibration"] = calibration_rows(self, primary, args.estimators)
        runs = self.collect(f"stage-1 trajectories at {lengths[0]} steps", self.runs, primary, lengths[0])
        results["trajectory"] = trajectory(runs) if runs else None
        return {**results, "candidates": n, "blocks": blocks, "reference": reference, "epochs": EPOCHS}

    def runs(self, dataset: str, steps: int) -> dict[tuple[int, int], dict]:
        """The stage-1 cells of every seed pair in `SEEDS`."""
        return {seeds: self.stage1(dataset, steps, *seeds) for seeds in SEEDS}

    def findings(self, results: dict) -> list[Finding]:
        return stability_page.findings(results)

    def page(self, results: dict) -> str:
        where = self.folder.relative_to(ROOT) if self.folder.is_relative_to(ROOT) else self.folder
        stability_page.frontier(self.folder / "frontier.png", results)
        return stability_page.page(results, where)

    def probe(self, dataset: str, **fields) -> torch.nn.Module:
        """A fresh copy of the dataset's base model with an ILA probe of `PROBE` and the ILAConfig `fields`."""
        return get_peft_model(copy.deepcopy(self.data[dataset].model), ILAConfig(**PROBE, **fields))

    # --- cells -----------------------------------------------------------------------------------------------------

    def stage1_settings(self, dataset: str, steps: int, init: int, order: int) -> dict:
        return {**self.data.identity(dataset), "steps": steps, "init": init, "order": order, **PROBE}

    def stage1(self, dataset: str, steps: int, init: int, order: int) -> dict:
        """A stage-1 cell. Computing it also writes the missing cells of the preset's shorter lengths, which are
        prefixes of the same run (constant learning rate, same data order), from snapshots taken on the way."""
        settings = self.stage1_settings(dataset, steps, init, order)

        def compute(stem: Path) -> dict:
            recipe = self._stage1(dataset, steps, init, order, snapshots=[s for s in self.p["stage1"] if s < steps])
            differences = {}  # a prefix computed before by its own run: how far this run's snapshot is from it
            for at, (weights, record) in recipe.taken.items():
                prefix = self.folder / f"stage1-{key(self.stage1_settings(dataset, at, init, order))}"
                if prefix.with_suffix(".json").exists():
                    before = json.loads(prefix.with_suffix(".json").read_text())["scores"]
                    differences[at] = max(abs(before[n] - v) for n, v in record["scores"].items())
                    continue
                save_file(weights, prefix.with_suffix(".safetensors"))
                cell = {"kind": "stage1", "settings": {**settings, "steps": at}, **record, "prefix_of": key(settings)}
                write_json(prefix.with_suffix(".json"), cell)
            save_file(recipe.adapter_weights(), stem.with_suffix(".safetensors"))
            trajectory = {"every": recipe.every, "norms": recipe.trajectory}
            return {**recipe.record(recipe.stage1), "trajectory": trajectory, "prefix_differences": differences}

        record = self.cell("stage1", settings, compute)
        record["weights"] = str(self.folder / f"stage1-{key(settings)}.safetensors")
        return record

    def _stage1(self, dataset: str, steps: int, init: int, order: int, snapshots=()) -> Recording:
        """Exactly `steps` stage-1 steps (no stability stop), the weights kept on every layer."""
        fixed = dict(stage1_max_steps=steps, stability_epsilon=1e-12, estimator="update-norm", top_k=1.0)
        probe = self.probe(dataset, **fixed, keep_stage1_weights=True, seed=init)
        recipe = Recording(probe, self.p["every"], snapshots)
        recipe.run(self.data.batches(dataset, order), self.args.progress)
        return recipe

    def weights(self, stage1: dict) -> dict[str, torch.Tensor]:
        path = Path(stage1["weights"])
        if not path.exists():  # recomputed: stage 1 is deterministic on one machine
            s = stage1["settings"]
            save_file(self._stage1(s["dataset"], s["steps"], s["init"], s["order"]).adapter_weights(), path)
        return load_file(path)

    def stage_settings(self, stage1: dict, estimator: str) -> dict:
        """The settings of an estimator's stage on a stage-1 cell (its config fields override its name)."""
        stage = {"stage1": key(stage1["settings"]), "estimator": estimator, "stage2_steps": self.p["stage2"]}
        return {**stage, **ESTIMATORS[estimator]}

    def score(self, stage1: dict, estimator: str, stage2_seed: int = 0) -> dict:
        """The estimator's stage on a stage-1 cell, with stage-2 data order `stage2_seed`: scores, seconds, tokens."""
        settings = {**self.stage_settings(stage1, estimator), "stage2_seed": stage2_seed}

        def compute(stem: Path) -> dict:
            result = self._estimate(stage1, estimator, stage2_seed)
            return {"scores": result.scores, "seconds": result.stage2.seconds, "tokens": result.stage2.tokens}

        return self.cell("score", settings, compute)

    def confidence(self, stage1: dict, estimator: str) -> dict:
        """The estimator's run of the `score` cell (stage-2 seed 0) again, keeping what it selects (top 25%) and
        how sure it is of each layer's membership (`Selection.confidence`, the bootstrap over its stage's steps)."""
        settings = self.stage_settings(stage1, estimator)
        return self.cell("confidence", settings, lambda stem: self._estimate(stage1, estimator, 0).selection.to_json())

    def _estimate(self, stage1: dict, estimator: str, stage2_seed: int):
        """The estimator's stage on a stage-1 cell's adapters, with its own stage-2 data order; the `ILAResult`."""
        dataset = stage1["settings"]["dataset"]
        fields = {**ESTIMATORS[estimator], "stage2_steps": self.p["stage2"], "top_k": 0.25}
        probe = self.probe(dataset, **fields)
        assert probe.load_state_dict(self.weights(stage1), strict=False).unexpected_keys == []
        batches = self.data.batches(dataset, 1000 + stage2_seed)
        return identify_important_layers(probe, batches, progress=self.args.progress, train_stage1=False)

    def relative(self, stage1: dict) -> dict:
        """||dW|| / ||W|| of every layer after a stage-1 cell, divided by the largest."""

        def compute(stem: Path) -> dict:
            weights, base = self.weights(stage1), self.data[stage1["settings"]["dataset"]].model
            scale, ratios = PROBE["lora_alpha"] / PROBE["r"], {}
            for name in stage1["scores"]:
                a, b = (weights[f"base_model.model.{name}.ila_{m}.default.weight"] for m in "AB")
                ratios[name] = float((b @ a).norm() * scale / base.get_parameter(f"{name}.weight").detach().norm())
            top = max(ratios.values())
            return {"scores": {n: as_float32(v / top) for n, v in ratios.items()}, "seconds": 0.0}

        return self.cell("relnorm", {"stage1": key(stage1["settings"]), "estimator": RELATIVE}, compute)

    def gradnorm(self, dataset: str, seed: int) -> dict:
        """The baseline's scores (gradient norms over the preset's steps from fresh adapters, divided by the
        largest) and seconds."""
        settings = {**self.data.identity(dataset), "seed": seed, "steps": self.p["gradnorm"], **PROBE}

        def compute(stem: Path) -> dict:
            probe = self.probe(dataset, seed=seed)
            torch.manual_seed(seed)
            batches, start = self.data.batches(dataset, seed), time.perf_counter()
            scores = gradnorm_scores(probe, batches, self.p["gradnorm"], PROBE["stage1_lr"])
            top = max(scores.values()) or 1.0
            return {"scores": {n: v / top for n, v in scores.items()}, "seconds": time.perf_counter() - start}

        return self.cell("gradnorm", settings, compute)

    def known(self, name: str, steps: int) -> dict:
        """Where the planted layers of `known_answer.py` land in the estimator's ranking, for every task seed."""
        method = {RELATIVE: "relative", GRADNORM: "gradient norm"}.get(name, "ila")
        fields = ESTIMATORS.get(name, {})  # config fields of an estimator with a stage
        settings = {"estimator": name, **fields, "stage1_steps": steps, "stage2_steps": self.p["stage2"]}
        settings.update(seeds=self.p["known_seeds"], task=known_answer.TASK, planted=known_answer.PLANTED)

        def compute(stem: Path) -> dict:
            run_fields = fields or dict(estimator="update-norm")  # no stage: stage 1's weights are all it needs
            ranks = [
                known_answer.planted_ranks(method, run_fields, steps, self.p["stage2"], seed)
                for seed in range(self.p["known_seeds"])
            ]
            return {"ranks": [ranked for ranked, _ in ranks], "candidates": ranks[0][1]}

        return self.cell("known", settings, compute)

    def reference(self, dataset: str) -> dict:
        """LoRA on all layers: median seconds per optimizer step, and the optimizer steps of 3 epochs."""
        settings = {**self.data.identity(dataset), "machine": machine()["processor"], "timed_steps": self.p["timing"]}

        def compute(stem: Path) -> dict:
            prepared = replace(self.data[dataset], model=copy.deepcopy(self.data[dataset].model))
            model = lora_all_layers(prepared, PROBE["r"], PROBE["lora_alpha"], 0.0, "all-linear")
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
            batches = cycle(prepared.batches(self.p["batch_size"], 0))
            stats = train_steps(model, batches, optimizer, self.p["timing"] + 1, progress=False)
            step = statistics.median(stats.step_seconds[1:])
            per_epoch = math.ceil(len(prepared.train) / self.p["batch_size"])
            return {"step_seconds": step, "epoch_steps": per_epoch, "fine_tune_seconds": step * per_epoch * EPOCHS}

        return self.cell("reference", settings, compute)


def module_type(name: str) -> str:
    """What a module-granularity candidate is, whichever block it is in: 'q_proj', 'gate_proj', ..."""
    return name.rsplit(".", 1)[-1]


def top_types(scores: dict[str, float]) -> dict[str, int]:
    """How many layers of each module type the top 25% of `scores` holds."""
    return dict(collections.Counter(map(module_type, top_set(scores, 0.25))))


def block_scores(scores: dict[str, float], estimator: str) -> dict[str, float]:
    """Module scores turned into the ranking the estimator gives at block granularity, exactly (for blocks with
    equally many modules): ||dW|| of a block is the root of its modules' summed squares; a block gate's gradient is
    the sum of its modules' gate gradients, and first-order scores are an increasing affine map of those."""
    out: dict[str, float] = {}
    for name, value in scores.items():
        block = layer_of(name, "block")
        out[block] = out.get(block, 0.0) + (value * value if estimator == "update-norm" else value)
    return out


def agreement(a: dict[str, float], b: dict[str, float]) -> dict:
    """Top-k Jaccard at each fraction and Spearman of two score dicts over their common layers; with several module
    types of >= 3 layers each, also the mean over types of the Spearman within a type (the ranking of positions,
    without what the type alone decides)."""
    names = [n for n in a if n in b]
    out = {"spearman": spearman([a[n] for n in names], [b[n] for n in names])}
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(module_type(name), []).append(name)
    if len(groups) > 1 and min(map(len, groups.values())) >= 3:
        within = [spearman([a[n] for n in g], [b[n] for n in g]) for g in groups.values()]
        out["spearman_within_type"] = statistics.mean(within)
    for f in FRACTIONS:
        out[f"jaccard@{f:g}"] = jaccard(*(set(top_set({n: s[n] for n in names}, f)) for s in (a, b)))
    return out


def trajectory(runs: dict[tuple[int, int], dict]) -> dict | None:
    """Update-norm agreement between seeds at every recorded stage-1 step of the longest runs, and where a stop rule
    on the mask would have ended each run: at the first check whose top-25% set overlaps the one `window` steps
    before by at least the rule's Jaccard. None without recorded trajectories."""
    if any("trajectory" not in run for run in runs.values()):
        return None
    names, every = list(runs[(0, 0)]["scores"]), runs[(0, 0)]["trajectory"]["every"]
    series = {
        seeds: [dict(zip(names, norms, strict=True)) for norms in run["trajectory"]["norms"]]
        for seeds, run in runs.items()
    }

    def compared(at: dict[tuple[int, int], int]) -> dict:
        """Each source's agreement between its two runs, each at its own check `at[seeds]`."""
        return {source: agreement(series[x][at[x]], series[y][at[y]]) for source, (x, y) in SOURCES.items()}

    checks = len(series[(0, 0)])
    points = [{"step": (i + 1) * every, **compared(dict.fromkeys(series, i))} for i in range(checks)]
    rules = []
    for window, threshold in MASK_RULES:
        at = {seeds: _stop(scores, window // every, threshold) for seeds, scores in series.items()}
        stops = {f"{i}/{o}": (s + 1) * every for (i, o), s in at.items()}
        rules.append({"window": window, "jaccard": threshold, "stops": stops, **compared(at)})
    stops = {seeds: _loss_stop(run["losses"], *PAPER_LOSS_RULE) for seeds, run in runs.items()}
    at = {seeds: min(math.ceil(stop / every), len(series[seeds])) - 1 for seeds, stop in stops.items()}
    loss_stops = {f"{i}/{o}": stop for (i, o), stop in stops.items()}
    rules.append({"loss_rule": list(PAPER_LOSS_RULE), "stops": loss_stops, **compared(at)})
    quarter = checks // 4 - 1  # the check at a quarter of the run
    early = {f"{i}/{o}": jaccard(*(set(top_set(x[j], 0.25)) for j in (quarter, -1))) for (i, o), x in series.items()}
    return {"every": every, "points": points, "rules": rules, "early": early, "early_step": (quarter + 1) * every}


def _loss_stop(losses: list[float], epsilon: float, window: int) -> int:
    """The step at which the paper's loss test (`StabilityTest`) would have ended stage 1 (else the last step)."""
    test = StabilityTest(epsilon, window)
    return next((step for step, loss in enumerate(losses, 1) if test.update(loss)), len(losses))


def _stop(scores: list[dict[str, float]], back: int, threshold: float) -> int:
    """Index of the first check whose top-25% overlaps the one `back` checks before by >= threshold (else the last)."""
    for i in range(back, len(scores)):
        if jaccard(set(top_set(scores[i], 0.25)), set(top_set(scores[i - back], 0.25))) >= threshold:
            return i
    return len(scores) - 1


def seed_row(study: Stability, dataset: str, steps: int, name: str, reference: dict) -> dict:
    """One estimator at one stage-1 length: agreement between runs that differ in one source of noise, and cost."""
    stage1 = study.runs(dataset, steps)
    if name == "update-norm":
        cells = dict(stage1)
    elif name == RELATIVE:
        cells = {seeds: study.relative(cell) for seeds, cell in stage1.items()}
    else:
        cells = {seeds: study.score(cell, name) for seeds, cell in stage1.items()}
        cells["stage2"] = study.score(stage1[(0, 0)], name, stage2_seed=1)
    row = {"estimator": name, "stage1_steps": steps, "stage2_steps": 0 if name in NO_STAGE2 else study.p["stage2"]}
    sources = dict(SOURCES, **({"stage2": ((0, 0), "stage2")} if "stage2" in cells else {}))
    for source, (x, y) in sources.items():
        row[source] = agreement(cells[x]["scores"], cells[y]["scores"])
        if name in ("update-norm", "first-order"):
            blocks = (block_scores(cells[z]["scores"], name) for z in (x, y))
            row.setdefault("blocks", {})[source] = agreement(*blocks)
    paid = [stage1[(0, 0)]] + ([] if name in NO_STAGE2 else [cells[(0, 0)]])  # stage 1, and the estimator's stage
    seconds, tokens = (sum(cell[what] for cell in paid) for what in ("seconds", "tokens"))
    row.update(top_types=top_types(cells[(0, 0)]["scores"]), seconds=seconds)
    row.update(cost=seconds / reference["fine_tune_seconds"], tokens=tokens)
    row["cost_steps"] = (steps + row["stage2_steps"]) / (EPOCHS * reference["epoch_steps"])
    return row


def gradnorm_row(study: Stability, dataset: str, reference: dict) -> dict:
    """The baseline's agreement between two seeds (differing in both initialisation and data order), and cost."""
    cells = [study.gradnorm(dataset, seed) for seed in (0, 1)]
    grad, seconds, steps = [c["scores"] for c in cells], cells[0]["seconds"], study.p["gradnorm"]
    blocks = [block_scores(g, "update-norm") for g in grad]  # a block's gradient norm: root of summed squares
    row = {"estimator": GRADNORM, "stage1_steps": steps, "stage2_steps": 0, "seed": agreement(*grad)}
    row.update(blocks={"seed": agreement(*blocks)}, top_types=top_types(grad[0]), seconds=seconds)
    row["cost"] = seconds / reference["fine_tune_seconds"]
    row["cost_steps"] = steps / (EPOCHS * reference["epoch_steps"])
    return row


def calibration_rows(study: Stability, dataset: str, estimators: list[str]) -> list[dict]:
    """Is a run's confidence honest? For each estimator with a stage (at the cross-dataset length), the reference
    run's layers in groups: certain (>= `CERTAIN` of its bootstrap resamples agree on their membership of its top
    25%) or not, all or only the selected ones; per group, the share that a rerun differing in one source of noise
    puts on the same side of its own top 25%."""
    steps, rows = study.p["lengths_for_datasets"], []
    for name in [e for e in ESTIMATORS if e in estimators]:
        found = study.collect(f"{name}'s confidence at {steps} stage-1 steps", reruns_of, study, dataset, steps, name)
        if found is None:
            continue
        reference, reruns = found
        chosen, sure, names = set(reference["selected"]), reference["confidence"], reference["candidates"]
        certain = {n for n in names if sure[n] >= CERTAIN}
        groups = {"certain": [n for n in names if n in certain], "uncertain": [n for n in names if n not in certain]}
        groups.update({f"selected {g}": [n for n in members if n in chosen] for g, members in list(groups.items())})
        row = {"estimator": name, "stage1_steps": steps, "candidates": len(sure), "selected": len(chosen)}
        row["counts"] = {group: len(members) for group, members in groups.items()}
        for source, rerun in reruns.items():
            top = set(top_set(rerun["scores"], 0.25))
            kept = {n: (n in top) == (n in chosen) for n in names}
            row[source] = {g: statistics.mean(kept[n] for n in m) if m else math.nan for g, m in groups.items()}
        rows.append(row)
    return rows


def reruns_of(study: Stability, dataset: str, steps: int, name: str) -> tuple[dict, dict[str, dict]]:
    """The reference run's confidence cell, and the score cells of the reruns that differ from it in one source."""
    stage1 = study.runs(dataset, steps)
    reruns = {source: study.score(stage1[y], name) for source, (_, y) in SOURCES.items()}
    reruns["stage2"] = study.score(stage1[(0, 0)], name, stage2_seed=1)
    return study.confidence(stage1[(0, 0)], name), reruns


def known_rows(study: Stability, estimators: list[str]) -> list[dict]:
    """Every estimator (and the gradient-norm baseline) on the planted task, at each of the preset's lengths."""
    named = [(name, steps) for name in SEEDED if name in estimators for steps in study.p["known_lengths"]]
    rows = []
    for name, steps in [*named, (GRADNORM, study.p["gradnorm"])]:
        cell = study.collect(f"{name} on the planted task at {steps} stage-1 steps", study.known, name, steps)
        if cell is not None:
            summary = known_answer.summary(cell["ranks"], cell["candidates"])
            rows.append({"estimator": name, "stage1_steps": steps, "ranks": cell["ranks"], **summary})
    return rows


def cross_rows(study: Stability, datasets: list[str], estimators: list[str]) -> list[dict]:
    """Each estimator's agreement between every two datasets (seed 0, the preset's stage-1 length)."""
    steps, rows = study.p["lengths_for_datasets"], []
    for name in estimators:
        per = {d: study.collect(f"{name} on {d}", study.scores_on, d, steps, name) for d in datasets}
        per = {d: cell for d, cell in per.items() if cell is not None}
        for a, b in itertools.combinations(list(per), 2):
            agree = agreement(per[a]["scores"], per[b]["scores"])
            rows.append({"estimator": name, "stage1_steps": steps, "a": a, "b": b, **agree})
    return rows


if __name__ == "__main__":
    Stability.main()
