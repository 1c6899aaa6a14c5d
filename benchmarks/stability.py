"""How reproducible is the layer ranking, where does its noise come from, and what does it cost?

    python benchmarks/stability.py --preset full    # `make bench-stability`; resumable: a finished cell is kept
    python benchmarks/stability.py --preset quick   # smoke-sized

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

Then `stability.json` and a Markdown page: top-k Jaccard (k = 5, 10, 25, 50% of the candidates) and Spearman between
two runs that differ in one source of noise only (adapter initialisation, data order, or stage 2 alone), against the
Jaccard of two random sets; overlap across datasets beside the seed-to-seed overlap; and the cost of each estimator.
"""

from __future__ import annotations

import argparse
import collections
import copy
import itertools
import json
import math
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from peft import get_peft_model
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from benchmarks import known_answer  # noqa: E402
from benchmarks.baselines import gradnorm_scores, top_k  # noqa: E402
from benchmarks.cells import Missing, add_cell_options, cell, key, write_study  # noqa: E402
from benchmarks.run import DATASETS, add_inputs, data_identity, dataset_files, parsed_inputs  # noqa: E402
from peft_ila import ILAConfig, identify_important_layers  # noqa: E402
from peft_ila.app.cli import _offline_and_quiet  # noqa: E402
from peft_ila.app.compare import jaccard, spearman  # noqa: E402
from peft_ila.app.files import write_json  # noqa: E402
from peft_ila.app.pipeline import Prepared, lora_all_layers, prepare  # noqa: E402
from peft_ila.app.report import machine  # noqa: E402
from peft_ila.identification.importance import Identification  # noqa: E402
from peft_ila.identification.training import StabilityTest, StepStats, cycle, train_steps  # noqa: E402
from peft_ila.tuner.selection import CERTAIN, as_float32, layer_of  # noqa: E402

FRACTIONS = (0.05, 0.10, 0.25, 0.50)
PRESETS = {
    "quick": dict(
        eval_size=8,
        max_length=64,
        batch_size=2,
        stage1=[4, 2],
        stage2=3,
        lengths_for_datasets=4,
        gradnorm=2,
        timing=2,
        every=1,
        known_lengths=[4],
        known_seeds=2,
    ),
    "full": dict(
        eval_size=32,
        max_length=128,
        batch_size=4,
        stage1=[128, 64, 256],
        stage2=32,
        lengths_for_datasets=128,
        gradnorm=8,
        timing=4,
        every=8,  # stage-1 cells keep every layer's ||dW|| at every this many steps
        known_lengths=[16, 64, 256],  # stage-1 steps on the planted task (`known_answer.py`)
        known_seeds=5,
    ),
}
ADAPTER = dict(task_type="CAUSAL_LM", r=8, lora_alpha=16, stage1_lr=1e-3)
# name -> ILAConfig fields of the estimator's stage (update-norm comes free with every stage-1 cell)
ESTIMATORS = {
    "gates": dict(estimator="gates"),
    "gates from 0.9": dict(estimator="gates", gate_init=0.9),
    "first-order": dict(estimator="first-order"),
}
RELATIVE = "update-norm / ||W||"  # ||dW|| over the frozen weight's norm: the size-normalised update norm
NO_STAGE2 = ("update-norm", RELATIVE)  # computed from the stage-1 weights alone
GRADNORM = "gradient norm (fresh adapters)"  # the cheap baseline: adapter gradient norms over its first steps
SEEDS = [(0, 0), (1, 0), (0, 1)]  # (adapter initialisation, data order): the reference, init only, order only
SOURCES = {"init": ((0, 0), (1, 0)), "order": ((0, 0), (0, 1))}
EPOCHS = 3  # the reference fine-tune a user would otherwise run


class Recording(Identification):
    """A stage-1-only identification run ("update-norm", `keep_stage1_weights`) that also keeps every layer's ||dW||
    every `every` steps (`trajectory`, [checks][candidates]) and, at each step in `snapshots`, the adapter weights
    and the cell record a run of that length would have (`taken`)."""

    def __init__(self, model, every: int, snapshots=()) -> None:
        super().__init__(model)
        self.every, self.snapshots, self.trajectory, self.taken = every, set(snapshots), [], {}

    def _save(self, stats: StepStats) -> None:
        super()._save(stats)
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


class Study:
    """The cells of one preset: each computed at most once, read back from `cells` afterwards."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.p = args, PRESETS[args.preset]
        self.cells: Path = args.cells / args.preset
        self.cells.mkdir(parents=True, exist_ok=True)
        self.prepared: dict[str, Prepared] = {}
        self.identities: dict[str, dict] = {}
        self.base = None

    def identity(self, dataset: str) -> dict:
        """What a cell's result depends on besides its own settings: the model, the data's SHA-256, the shape (once
        per dataset: hashing the data file is not free)."""
        if dataset not in self.identities:
            shape = {k: self.p[k] for k in ("max_length", "batch_size")}
            self.identities[dataset] = data_identity(self.args, dataset, **shape)
        return self.identities[dataset]

    def data(self, dataset: str) -> Prepared:
        if dataset not in self.prepared:
            data, eval_data = dataset_files(self.args, dataset)
            size = self.p["eval_size"]
            prepared = prepare(self.args.model, data, self.p["max_length"], "truncate", size, 0, eval_data=eval_data)
            self.base = self.base or prepared.model.eval()
            self.prepared[dataset] = replace(prepared, model=self.base)
        return self.prepared[dataset]

    def available(self, dataset: str) -> bool:
        spec = self.args.data.get(dataset, DATASETS[dataset][0])
        return "{shared}" not in spec or Path(spec.format(shared=self.args.shared)).exists()

    def cell(self, kind: str, settings: dict, compute) -> dict:
        """The record of a cell: read if it exists, else computed by `compute(path_stem)` and saved."""
        return cell(self.cells, kind, settings, compute, self.args.existing_only)

    def config(self, **fields) -> ILAConfig:
        return ILAConfig(**ADAPTER, **fields)

    # --- cells -----------------------------------------------------------------------------------------------------

    def stage1_settings(self, dataset: str, steps: int, init: int, order: int) -> dict:
        return {**self.identity(dataset), "steps": steps, "init": init, "order": order, **ADAPTER}

    def stage1(self, dataset: str, steps: int, init: int, order: int) -> dict:
        """A stage-1 cell. Computing it also writes the missing cells of the preset's shorter lengths, which are
        prefixes of the same run (constant learning rate, same data order), from snapshots taken on the way."""
        settings = self.stage1_settings(dataset, steps, init, order)
        shorter = [s for s in self.p["stage1"] if s < steps]

        def compute(stem: Path) -> dict:
            recipe = self._stage1(dataset, steps, init, order, snapshots=shorter)
            differences = {}  # a prefix computed before by its own run: how far this run's snapshot is from it
            for at, (weights, record) in recipe.taken.items():
                prefix = self.cells / f"stage1-{key(self.stage1_settings(dataset, at, init, order))}"
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
        record["weights"] = str(self.cells / f"stage1-{key(settings)}.safetensors")
        return record

    def _stage1(self, dataset: str, steps: int, init: int, order: int, snapshots=()) -> Recording:
        """Exactly `steps` stage-1 steps (no stability stop), the weights kept on every layer."""
        fixed = dict(stage1_max_steps=steps, stability_epsilon=1e-12, estimator="update-norm", top_k=1.0)
        config = self.config(**fixed, keep_stage1_weights=True, seed=init)
        model = get_peft_model(copy.deepcopy(self.data(dataset).model), config)
        batches = self.data(dataset).batches(self.p["batch_size"], order)
        recipe = Recording(model, self.p["every"], snapshots)
        recipe.run(batches, self.args.progress)
        return recipe

    def weights(self, stage1: dict) -> dict[str, torch.Tensor]:
        path = Path(stage1["weights"])
        if not path.exists():  # recomputed: stage 1 is deterministic on one machine
            s = stage1["settings"]
            save_file(self._stage1(s["dataset"], s["steps"], s["init"], s["order"]).adapter_weights(), path)
        return load_file(path)

    def score(self, stage1: dict, estimator: str, stage2_seed: int = 0) -> dict:
        settings = {
            "stage1": key(stage1["settings"]),
            "estimator": estimator,
            "stage2_steps": self.p["stage2"],
            "stage2_seed": stage2_seed,
            **ESTIMATORS[estimator],
        }

        def compute(stem: Path) -> dict:
            result = self._estimate(stage1, estimator, stage2_seed)
            return {"scores": result.scores, "seconds": result.stage2.seconds, "tokens": result.stage2.tokens}

        return self.cell("score", settings, compute)

    def confidence(self, stage1: dict, estimator: str) -> dict:
        """The estimator's run of the `score` cell (stage-2 seed 0) again, keeping what it selects (top 25%) and
        how sure it is of each layer's membership (`Selection.confidence`, the bootstrap over its stage's steps)."""
        settings = {"stage1": key(stage1["settings"]), "estimator": estimator, "stage2_steps": self.p["stage2"]}

        def compute(stem: Path) -> dict:
            return self._estimate(stage1, estimator, 0).selection.to_json()

        return self.cell("confidence", {**settings, **ESTIMATORS[estimator]}, compute)

    def _estimate(self, stage1: dict, estimator: str, stage2_seed: int):
        """The estimator's stage on a stage-1 cell's adapters, with its own stage-2 data order; the `ILAResult`."""
        dataset = stage1["settings"]["dataset"]
        fields = {**ESTIMATORS[estimator], "stage2_steps": self.p["stage2"], "top_k": 0.25}
        probe = get_peft_model(copy.deepcopy(self.data(dataset).model), self.config(**fields))
        assert probe.load_state_dict(self.weights(stage1), strict=False).unexpected_keys == []
        batches = self.data(dataset).batches(self.p["batch_size"], 1000 + stage2_seed)
        return identify_important_layers(probe, batches, progress=self.args.progress, train_stage1=False)

    def relative(self, stage1: dict) -> dict:
        """||dW|| / ||W|| of every layer after a stage-1 cell, divided by the largest."""
        settings = {"stage1": key(stage1["settings"]), "estimator": RELATIVE}

        def compute(stem: Path) -> dict:
            weights, base = (
                self.weights(stage1),
                dict(self.data(stage1["settings"]["dataset"]).model.named_parameters()),
            )
            scale, ratios = ADAPTER["lora_alpha"] / ADAPTER["r"], {}
            for name in stage1["scores"]:
                a, b = (weights[f"base_model.model.{name}.ila_{m}.default.weight"] for m in "AB")
                ratios[name] = float((b @ a).norm() * scale / base[f"{name}.weight"].detach().norm())
            top = max(ratios.values())
            return {"scores": {n: as_float32(v / top) for n, v in ratios.items()}, "seconds": 0.0}

        return self.cell("relnorm", settings, compute)

    def gradnorm(self, dataset: str, seed: int) -> dict:
        settings = {**self.identity(dataset), "seed": seed, "steps": self.p["gradnorm"], **ADAPTER}

        def compute(stem: Path) -> dict:
            probe = get_peft_model(copy.deepcopy(self.data(dataset).model), self.config(seed=seed))
            torch.manual_seed(seed)
            batches = self.data(dataset).batches(self.p["batch_size"], seed)
            start = time.perf_counter()
            scores = gradnorm_scores(probe, batches, self.p["gradnorm"], ADAPTER["stage1_lr"])
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
            seeds = range(self.p["known_seeds"])
            run_fields = fields or dict(estimator="update-norm")  # no stage: stage 1's weights are all it needs
            runs = [known_answer.planted_ranks(method, run_fields, steps, self.p["stage2"], s) for s in seeds]
            return {"ranks": [ranks for ranks, _ in runs], "candidates": runs[0][1]}

        return self.cell("known", settings, compute)

    def reference(self, dataset: str) -> dict:
        """LoRA on all layers: median seconds per optimizer step, and the optimizer steps of 3 epochs."""
        settings = {**self.identity(dataset), "machine": machine()["processor"], "timed_steps": self.p["timing"]}

        def compute(stem: Path) -> dict:
            prepared = replace(self.data(dataset), model=copy.deepcopy(self.data(dataset).model))
            model = lora_all_layers(prepared, ADAPTER["r"], ADAPTER["lora_alpha"], 0.0, "all-linear")
            params = [p for p in model.parameters() if p.requires_grad]
            batches = cycle(prepared.batches(self.p["batch_size"], 0))
            stats = train_steps(
                model, batches, torch.optim.AdamW(params, lr=1e-4), self.p["timing"] + 1, progress=False
            )
            per_epoch = math.ceil(len(prepared.train) / self.p["batch_size"])
            return {
                "step_seconds": statistics.median(stats.step_seconds[1:]),
                "epoch_steps": per_epoch,
                "fine_tune_seconds": statistics.median(stats.step_seconds[1:]) * per_epoch * EPOCHS,
            }

        return self.cell("reference", settings, compute)


def expected_random_jaccard(n: int, k: int) -> float:
    """E[|A & B| / |A | B|] for two independent uniformly random k-subsets of n (hypergeometric overlap)."""
    total = math.comb(n, k)
    return sum(math.comb(k, i) * math.comb(n - k, k - i) / total * i / (2 * k - i) for i in range(k + 1))


def module_type(name: str) -> str:
    """What a module-granularity candidate is, whichever block it is in: 'q_proj', 'gate_proj', ..."""
    return name.rsplit(".", 1)[-1]


def top_set(scores: dict[str, float], fraction: float) -> list[str]:
    """The top `fraction` of the layers by score (rounded half up; ties: candidate order)."""
    return top_k(scores, max(1, math.floor(fraction * len(scores) + 0.5)))


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


def run(args: argparse.Namespace) -> dict:
    study = Study(args)
    datasets = [d for d in args.datasets if study.available(d)]
    primary = datasets[0]
    results = {"machine": machine(), "preset": args.preset, "rows": [], "cross": [], "random": {}, "missing": []}
    reference = study.reference(primary)
    for steps in sorted(args.lengths or study.p["stage1"], reverse=True):  # the longest run gives the shorter ones
        for name in [e for e in (*NO_STAGE2, *ESTIMATORS) if e in args.estimators]:
            try:
                results["rows"].append(seed_row(study, primary, steps, name, reference))
            except Missing as cell:
                results["missing"].append(f"{name} at {steps} stage-1 steps ({cell})")
    try:
        results["rows"].append(gradnorm_row(study, primary, reference))
    except Missing as cell:
        results["missing"].append(f"gradient norm ({cell})")
    results["cross"] = cross_rows(
        study, datasets, [e for e in args.estimators if e in ESTIMATORS or e == "update-norm"], results["missing"]
    )
    names = list(study.stage1(primary, study.p["lengths_for_datasets"], 0, 0)["scores"])
    n, blocks = len(names), len({layer_of(name, "block") for name in names})
    results["random"] = {
        f"jaccard@{f:g}": expected_random_jaccard(n, len(top_set(dict.fromkeys(names, 0), f))) for f in FRACTIONS
    }
    results["random_blocks"] = expected_random_jaccard(blocks, max(1, math.floor(0.25 * blocks + 0.5)))
    results["known"] = known_rows(study, args.estimators, results["missing"])
    results["calibration"] = calibration_rows(study, primary, args.estimators, results["missing"])
    longest = max(args.lengths or study.p["stage1"])
    try:
        results["trajectory"] = trajectory({seeds: study.stage1(primary, longest, *seeds) for seeds in SEEDS})
    except Missing as cell:
        results["trajectory"] = None
        results["missing"].append(f"stage-1 trajectories at {longest} steps ({cell})")
    results.update(candidates=n, blocks=blocks, reference=reference)
    return results


MASK_RULES = [(32, 0.8), (32, 0.9), (64, 0.9)]  # (window in steps, top-25% Jaccard with the set a window before)
PAPER_LOSS_RULE = (
    0.01,
    20,
)  # the paper's epsilon-stability on the loss: (epsilon, window), ILAConfig's defaults before


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
    points = []
    for i in range(len(series[(0, 0)])):
        point = {"step": (i + 1) * every}
        point.update({source: agreement(series[x][i], series[y][i]) for source, (x, y) in SOURCES.items()})
        points.append(point)
    rules = []
    for window, threshold in MASK_RULES:
        stops = {seeds: _stop(scores, window // every, threshold) for seeds, scores in series.items()}
        rule = {
            "window": window,
            "jaccard": threshold,
            "stops": {f"{i}/{o}": (s + 1) * every for (i, o), s in stops.items()},
        }
        for source, (x, y) in SOURCES.items():
            rule[source] = agreement(series[x][stops[x]], series[y][stops[y]])
        rules.append(rule)
    stops = {seeds: _loss_stop(run["losses"], *PAPER_LOSS_RULE) for seeds, run in runs.items()}
    at = {seeds: min(math.ceil(stop / every), len(series[seeds])) - 1 for seeds, stop in stops.items()}
    rules.append(
        {
            "loss_rule": list(PAPER_LOSS_RULE),
            "stops": {f"{i}/{o}": stop for (i, o), stop in stops.items()},
            **{source: agreement(series[x][at[x]], series[y][at[y]]) for source, (x, y) in SOURCES.items()},
        }
    )
    quarter = len(series[(0, 0)]) // 4 - 1  # the check at a quarter of the run
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


def seed_row(study: Study, dataset: str, steps: int, name: str, reference: dict) -> dict:
    """One estimator at one stage-1 length: agreement between runs that differ in one source of noise, and cost."""
    stage1 = {seeds: study.stage1(dataset, steps, *seeds) for seeds in SEEDS}
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
    row["top_types"] = dict(collections.Counter(map(module_type, top_set(cells[(0, 0)]["scores"], 0.25))))
    seconds = stage1[(0, 0)]["seconds"] + (0 if name in NO_STAGE2 else cells[(0, 0)]["seconds"])
    tokens = stage1[(0, 0)]["tokens"] + (0 if name in NO_STAGE2 else cells[(0, 0)]["tokens"])
    row.update(seconds=seconds, cost=seconds / reference["fine_tune_seconds"], tokens=tokens)
    row["cost_steps"] = (steps + row["stage2_steps"]) / (EPOCHS * reference["epoch_steps"])
    return row


def calibration_rows(study: Study, dataset: str, estimators: list[str], missing: list[str]) -> list[dict]:
    """Is a run's confidence honest? For each estimator with a stage (at the cross-dataset length), the reference
    run's layers in groups: certain (>= `CERTAIN` of its bootstrap resamples agree on their membership of its top
    25%) or not, all or only the selected ones; per group, the share that a rerun differing in one source of noise
    puts on the same side of its own top 25%."""
    steps, rows = study.p["lengths_for_datasets"], []
    for name in [e for e in ESTIMATORS if e in estimators]:
        try:
            stage1 = {seeds: study.stage1(dataset, steps, *seeds) for seeds in SEEDS}
            reference = study.confidence(stage1[(0, 0)], name)
            reruns = {source: study.score(stage1[y], name) for source, (_, y) in SOURCES.items()}
            reruns["stage2"] = study.score(stage1[(0, 0)], name, stage2_seed=1)
        except Missing as cell:
            missing.append(f"{name}'s confidence at {steps} stage-1 steps ({cell})")
            continue
        chosen, sure = set(reference["selected"]), reference["confidence"]
        groups = {
            "certain": [n for n in reference["candidates"] if sure[n] >= CERTAIN],
            "uncertain": [n for n in reference["candidates"] if sure[n] < CERTAIN],
        }
        groups.update({f"selected {g}": [n for n in names if n in chosen] for g, names in list(groups.items())})
        row = {"estimator": name, "stage1_steps": steps, "candidates": len(sure), "selected": len(chosen)}
        row["counts"] = {group: len(names) for group, names in groups.items()}
        for source, rerun in reruns.items():
            top = set(top_set(rerun["scores"], 0.25))
            kept = {n: (n in top) == (n in chosen) for n in reference["candidates"]}
            row[source] = {
                g: statistics.mean(kept[n] for n in names) if names else math.nan for g, names in groups.items()
            }
        rows.append(row)
    return rows


def known_rows(study: Study, estimators: list[str], missing: list[str]) -> list[dict]:
    """Every estimator (and the gradient-norm baseline) on the planted task, at each of the preset's lengths."""
    runs = [
        (name, steps) for name in (*NO_STAGE2, *ESTIMATORS) if name in estimators for steps in study.p["known_lengths"]
    ]
    rows = []
    for name, steps in [*runs, (GRADNORM, study.p["gradnorm"])]:
        try:
            cell = study.known(name, steps)
        except Missing as absent:
            missing.append(f"{name} on the planted task at {steps} stage-1 steps ({absent})")
            continue
        summary = known_answer.summary(cell["ranks"], cell["candidates"])
        rows.append({"estimator": name, "stage1_steps": steps, "ranks": cell["ranks"], **summary})
    return rows


def gradnorm_row(study: Study, dataset: str, reference: dict) -> dict:
    grad = [study.gradnorm(dataset, seed) for seed in (0, 1)]
    blocks = [block_scores(g["scores"], "update-norm") for g in grad]  # a block's gradient norm: root of summed squares
    return {
        "estimator": GRADNORM,
        "stage1_steps": study.p["gradnorm"],
        "stage2_steps": 0,
        "seed": agreement(grad[0]["scores"], grad[1]["scores"]),
        "blocks": {"seed": agreement(*blocks)},
        "top_types": dict(collections.Counter(map(module_type, top_set(grad[0]["scores"], 0.25)))),
        "seconds": grad[0]["seconds"],
        "cost": grad[0]["seconds"] / reference["fine_tune_seconds"],
        "cost_steps": study.p["gradnorm"] / (EPOCHS * reference["epoch_steps"]),
    }


def cross_rows(study: Study, datasets: list[str], estimators: list[str], missing: list[str]) -> list[dict]:
    """Each estimator's agreement between every two datasets (seed 0, the preset's stage-1 length)."""
    steps, rows = study.p["lengths_for_datasets"], []
    for name in estimators:
        per = {}
        for d in datasets:
            try:
                own = study.stage1(d, steps, 0, 0)
                per[d] = own if name == "update-norm" else study.score(own, name)
            except Missing as cell:
                missing.append(f"{name} on {d} ({cell})")
        for a, b in itertools.combinations(list(per), 2):
            agree = agreement(per[a]["scores"], per[b]["scores"])
            rows.append({"estimator": name, "stage1_steps": steps, "a": a, "b": b, **agree})
    return rows


def _cell(text: str) -> str:
    """Text for a Markdown table cell (a '|' would end the cell)."""
    return text.replace("|", "\\|")


def _f(d: dict, k: str) -> str:
    return f"{d[k]:.2f}" if k in d else "–"


def page(results: dict, args: argparse.Namespace) -> str:
    """The Markdown page of a study."""
    ref, rnd = results["reference"], results["random"]
    where = (args.cells / args.preset).relative_to(ROOT) if args.cells.is_relative_to(ROOT) else args.cells
    lines = [
        "# Stability of the layer ranking",
        "",
        f"Written by `python benchmarks/stability.py --preset {results['preset']}` (`make bench-stability`) from the "
        f"cells in `{where}`; {results['candidates']} candidate layers; {results['machine']['cpu_count']} CPU cores, "
        f"torch {results['machine']['torch']}. Cost is identification's optimizer steps (stage 1 + stage 2), or its "
        f"seconds, over those of a {EPOCHS}-epoch LoRA-all fine-tune of the same data ({ref['epoch_steps']} "
        f"steps/epoch, {ref['step_seconds']:.2f} s/step). Seconds were measured on a shared machine; steps are the "
        "steadier unit.",
        "",
        "Two runs that differ in one source of noise only: `init` (the stage-1 adapter initialisation seed), `order` "
        "(the data order), `stage2` (the estimator's stage alone, on the same stage-1 adapters). Jaccard of the top-k "
        f"sets; two random sets overlap {rnd['jaccard@0.25']:.2f} at 25% (5%: {rnd['jaccard@0.05']:.2f}, 10%: "
        f"{rnd['jaccard@0.1']:.2f}, 50%: {rnd['jaccard@0.5']:.2f}). *Within type*: the mean over module types "
        "(q_proj, ..., down_proj) of the Spearman correlation inside the type, i.e. how reproducible the ranking of "
        "positions is once the type is fixed.",
        "",
        "| estimator | stage-1 steps | stage-2 steps | cost (steps) | cost (seconds) | tokens | J@25% init "
        "| J@25% order | J@25% stage2 | Spearman init | Spearman order | within type init | within type order "
        "| J@5/10/50% init |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in sorted(results["rows"], key=lambda r: (r["estimator"], r["stage1_steps"])):
        init, order, stage2 = row.get("init", row.get("seed")), row.get("order", {}), row.get("stage2", {})
        small = "/".join(_f(init, f"jaccard@{f:g}") for f in (0.05, 0.1, 0.5))
        tokens = f"{row['tokens'] / 1000:.0f}k" if "tokens" in row else "–"
        lines.append(
            f"| {_cell(row['estimator'])} | {row['stage1_steps']} | {row['stage2_steps']} | {row['cost_steps']:.3f}x | "
            f"{row['cost']:.3f}x | {tokens} | {_f(init, 'jaccard@0.25')} | {_f(order, 'jaccard@0.25')} | "
            f"{_f(stage2, 'jaccard@0.25')} | {_f(init, 'spearman')} | {_f(order, 'spearman')} | "
            f"{_f(init, 'spearman_within_type')} | {_f(order, 'spearman_within_type')} | {small} |"
        )
    lines += ["", "The gradient-norm row compares two seeds that differ in both initialisation and data order.", ""]
    lines += ["## Findings", "", *findings(results), ""]
    lines += [
        *_known(results),
        *_calibration(results),
        *_types(results),
        *_blocks(results),
        *_lengths(results),
        *_cross(results),
    ]
    if results["missing"]:
        lines += ["", f"Not computed yet ({len(results['missing'])}; `make bench-stability` continues the grid):", ""]
        lines += [f"- {entry}" for entry in results["missing"]]
    lines += [
        "",
        "Reproducibility against cost, in steps, seconds and tokens (the gradient-norm baseline has no token count):",
    ]
    lines += ["", "![Jaccard against cost](results/stability/" + results["preset"] + "/frontier.png)", ""]
    return "\n".join(lines)


GOAL = dict(jaccard=0.80, spearman=0.8, cost=0.25)  # issue 13: seed-to-seed top-25% overlap and rank correlation


def _row(results: dict, estimator: str, stage1: int, stage2: int | None = None) -> dict | None:
    rows = [r for r in results["rows"] if r["estimator"] == estimator and r["stage1_steps"] == stage1]
    return next((r for r in rows if stage2 is None or r["stage2_steps"] == stage2), None)


def _worst(row: dict, key: str = "jaccard@0.25") -> float:
    """The lower of the init and order agreements (or the seed one); NaN when the row has no such measure."""
    return min((row[s][key] for s in ("init", "order", "seed") if s in row and key in row[s]), default=math.nan)


def findings(results: dict) -> list[str]:
    """The study's answers, one numbered line each (the README quotes them), from whatever cells exist."""
    lines, defaults = [], ILAConfig()
    default = _row(results, defaults.estimator, defaults.stage1_max_steps, defaults.stage2_steps)
    if default:
        met = (
            _worst(default) >= GOAL["jaccard"]
            and _worst(default, "spearman") >= GOAL["spearman"]
            and default["cost_steps"] <= GOAL["cost"]
        )
        noise = {s: default[s]["jaccard@0.25"] for s in ("init", "order", "stage2") if s in default}
        lines.append(
            f"**Reruns with the defaults** (`{defaults.estimator}`, {defaults.stage1_max_steps} + "
            f"{defaults.stage2_steps} steps, {default['cost_steps']:.2f}x the steps of a 3-epoch LoRA-all fine-tune) — "
            f"top-25% Jaccard {default['init']['jaccard@0.25']:.2f} (init) / {default['order']['jaccard@0.25']:.2f} "
            f"(order), Spearman {default['init']['spearman']:.2f} / {default['order']['spearman']:.2f}: the goal "
            f"(>= {GOAL['jaccard']:.2f} and >= {GOAL['spearman']} at <= {GOAL['cost']}x) is "
            f"{'met' if met else 'not met'}. The largest noise source is {min(noise, key=noise.get)} "
            f"({', '.join(f'{k} {v:.2f}' for k, v in noise.items())})."
        )
    cheap = [r for r in results["rows"] if r["cost_steps"] <= GOAL["cost"] and "top_types" in r]
    if cheap:
        best = max(cheap, key=_worst)
        typed = [r for r in cheap if "spearman_within_type" in r.get("init", r.get("seed", {}))]
        two = sum(sorted(best["top_types"].values())[-2:])
        line = (
            f"**Most reproducible top 25% within {GOAL['cost']}x** — {best['estimator']} at {best['stage1_steps']} "
            f"stage-1 steps, Jaccard {_worst(best):.2f} (worse of init and order); {two} of its "
            f"{sum(best['top_types'].values())} layers are of two module types."
        )
        if typed:
            within = max(typed, key=lambda r: _worst(r, "spearman_within_type"))
            line += (
                f" The most reproducible ranking of positions within a module type is {within['estimator']}'s "
                f"(Spearman {_worst(within, 'spearman_within_type'):.2f})."
            )
        lines.append(line)
    lines += _known_findings(results, default)
    lines += _calibration_finding(results, defaults.estimator)
    block = default and default.get("blocks")
    if block:
        lines.append(
            f"**Block granularity** (`{defaults.estimator}`) — top-25% Jaccard {block['init']['jaccard@0.25']:.2f} "
            f"(init) / {block['order']['jaccard@0.25']:.2f} (order) over {results['blocks']} blocks (random sets: "
            f"{results['random_blocks']:.2f}), Spearman {block['init']['spearman']:.2f} / "
            f"{block['order']['spearman']:.2f}."
        )
    lines += _cross_finding(results, defaults.estimator)
    lines += _length_finding(results, defaults.estimator)
    run = results.get("trajectory")
    if run:
        early = statistics.mean(run["early"].values())
        verdict = "holds" if early >= 0.8 else "partly holds" if early >= 0.5 else "does not hold"
        lines.append(
            f"**Important layers are found early in stage 1** (`update-norm`) — {verdict}: top-25% Jaccard "
            f"{early:.2f} between step {run['early_step']} and step {run['points'][-1]['step']} of the same run (mean "
            "over 3 runs). Rule: >= 0.80 holds, >= 0.50 partly."
        )
        loss = next(r for r in run["rules"] if "loss_rule" in r)
        lines.append(
            f"**The paper's stop rule on the loss** (ε = {loss['loss_rule'][0]}, window {loss['loss_rule'][1]}) — "
            f"ends the three alpaca runs at steps {', '.join(map(str, loss['stops'].values()))}; where they stop, "
            f"`update-norm` top-25% Jaccard {loss['init']['jaccard@0.25']:.2f} (init) / "
            f"{loss['order']['jaccard@0.25']:.2f} (order)."
        )
    return [f"{i}. {line}" for i, line in enumerate(lines, 1)]


def _calibration_finding(results: dict, estimator: str) -> list[str]:
    row = next((r for r in results.get("calibration", []) if r["estimator"] == estimator), None)
    if row is None:
        return []
    sources = ("stage2", "init", "order")
    honest = [s for s in sources if row[s]["selected certain"] >= CERTAIN]
    return [
        f"**Is the confidence honest?** (`{estimator}`, {row['stage1_steps']} stage-1 steps) — the run is certain "
        f"of {row['counts']['selected certain']} of its {row['selected']} selected layers; a rerun selects "
        + ", ".join(f"{row[s]['selected certain']:.0%} of them ({s})" for s in sources)
        + ", and "
        + ", ".join(f"{row[s]['selected uncertain']:.0%}" for s in sources)
        + " of the uncertain ones. "
        + f"Calibrated (>= {CERTAIN:.0%}) against: {', '.join(honest) or 'none'}; not against: "
        + f"{', '.join(s for s in sources if s not in honest) or 'none'}."
    ]


RIGHT = 0.9  # an estimator is right on the planted task when it finds the planted layers in this share of its runs


def _pooled_known(results: dict) -> dict[str, list[dict]]:
    """The planted-task rows of each estimator (all its stage-1 lengths)."""
    pooled: dict[str, list[dict]] = {}
    for row in results.get("known", []):
        pooled.setdefault(row["estimator"], []).append(row)
    return pooled


def _found_share(results: dict) -> dict[str, float]:
    """Estimator -> the share of its planted-task runs that put the planted layers on top."""
    return {
        name: sum(r["found"] for r in rows) / sum(r["runs"] for r in rows)
        for name, rows in _pooled_known(results).items()
    }


def _known_findings(results: dict, default: dict | None) -> list[str]:
    """Which estimators find the planted layers, and the most reproducible cheap setting among those that do."""
    pooled = _pooled_known(results)
    if not pooled:
        return []
    share = _found_share(results)
    counts = [
        f"{name} {sum(r['found'] for r in rows)}/{sum(r['runs'] for r in rows)} "
        f"(mean rank {statistics.mean(r['mean_rank'] for r in rows):.1f})"
        for name, rows in sorted(pooled.items(), key=lambda item: -share[item[0]])
    ]
    first = results["known"][0]
    lines = [
        "**Reproducible is not the same as right** — on the planted task (a tiny model whose important layers are "
        f"known; stage-1 lengths pooled) the planted layers are the top {len(first['ranks'][0])} in: "
        + ", ".join(counts)
        + f"; a random ranking: mean rank {first['random_mean_rank']:.1f}. Rule: right when found in >= "
        f"{RIGHT:.0%} of runs."
    ]
    right = [r for r in results["rows"] if share.get(r["estimator"], 0) >= RIGHT and r["cost_steps"] <= GOAL["cost"]]
    if right:
        best = max(right, key=_worst)
        where = f"`{best['estimator']}` at {best['stage1_steps']} stage-1 steps (Jaccard {_worst(best):.2f})"
        verdict = (
            "the defaults"
            if best is default
            else f"not the defaults ({_worst(default):.2f})"
            if default
            else "(the defaults have no row yet)"
        )
        lines.append(
            f"**Where the defaults sit** — among the estimators that are right on the planted task, the most "
            f"reproducible top 25% within {GOAL['cost']}x is {where}: {verdict}."
        )
    return lines


def _length_finding(results: dict, estimator: str) -> list[str]:
    """Does a longer stage 1 make the ranking more reproducible? The estimator's rows at every length, and the
    within-type agreement of update norms along the recorded runs."""
    rows = sorted((r for r in results["rows"] if r["estimator"] == estimator), key=lambda r: r["stage1_steps"])
    run = results.get("trajectory")
    if len(rows) < 2 or not run:
        return []
    steps = "/".join(str(r["stage1_steps"]) for r in rows)
    points = {p["step"]: p for p in run["points"]}
    within = [points[r["stage1_steps"]] for r in rows if r["stage1_steps"] in points]
    return [
        f"**A longer stage 1** — `{estimator}` at {steps} stage-1 steps ("
        + "/".join(f"{r['cost_steps']:.2f}x" for r in rows)
        + "): top-25% Jaccard "
        + "/".join(f"{_worst(r):.2f}" for r in rows)
        + " (worse of init and order), within-type Spearman "
        + "/".join(f"{_worst(r, 'spearman_within_type'):.2f}" for r in rows)
        + "; `update-norm` within-type Spearman between seeds at the same steps "
        + "/".join(f"{_worst(p, 'spearman_within_type'):.2f}" for p in within)
        + "."
    ]


def _cross_finding(results: dict, estimator: str) -> list[str]:
    crosses = [c for c in results["cross"] if c["estimator"] == estimator]
    same = _row(results, estimator, crosses[0]["stage1_steps"]) if crosses else None
    if not same or len(crosses) < 3:
        return []
    cross = statistics.mean(c["jaccard@0.25"] for c in crosses)
    floor = statistics.mean([same["init"]["jaccard@0.25"], same["order"]["jaccard@0.25"]])
    verdict = "holds" if cross >= 0.8 else "partly holds" if cross >= 0.5 else "does not hold"
    return [
        f"**Important layers overlap about 90% across alignment datasets** (`{estimator}`) — {verdict}: mean top-25% "
        f"Jaccard across alpaca, LIMA and Dolly {cross:.2f}, against {floor:.2f} between two runs on the same data "
        f"(ratio {cross / floor:.2f}). Rule: >= 0.80 holds, >= 0.50 partly."
    ]


def _known(results: dict) -> list[str]:
    """Each estimator on the planted task: how often it finds the planted layers, and where they land."""
    rows = results.get("known", [])
    if not rows:
        return []
    first = rows[0]
    lines = ["## A known answer", ""]
    lines += [
        "A tiny random Llama, trained on sequences sampled from a teacher that differs from it only in "
        f"{len(first['ranks'][0])} planted layers (`benchmarks/known_answer.py`, the tests' known-answer task), so the "
        f"layers that need to change are known. Each row: {first['runs']} seeds (student, teacher and identification "
        f"seed). *Found*: runs whose top {len(first['ranks'][0])} are exactly the planted layers (a random ranking: "
        f"{first['random_found']:.4f}). *Mean rank* of the planted layers (random: {first['random_mean_rank']:.1f}; "
        f"best: {statistics.mean(range(1, len(first['ranks'][0]) + 1)):.1f}).",
        "",
        "| estimator | stage-1 steps | found | mean rank | ranks per seed |",
        "|---|---:|---:|---:|---|",
    ]
    for row in rows:
        ranks = "; ".join(",".join(map(str, r)) for r in row["ranks"])
        lines.append(
            f"| {_cell(row['estimator'])} | {row['stage1_steps']} | {row['found']}/{row['runs']} | "
            f"{row['mean_rank']:.1f} | {ranks} |"
        )
    return [*lines, ""]


def _calibration(results: dict) -> list[str]:
    """How often a rerun keeps the membership of the layers a run was (un)certain of."""
    rows = results.get("calibration", [])
    if not rows:
        return []
    lines = ["## Is the confidence honest?", ""]
    lines += [
        "Every run says how sure it is of each layer's membership in its top 25%: the share of bootstrap resamples of "
        f"its estimator's steps that agree (`layer_confidence`; *certain* at >= {CERTAIN:.0%}; the CLI's line counts "
        f"the certain layers of the selection). A calibrated confidence means that a rerun keeps at least "
        f"{CERTAIN:.0%} of the certain layers on their side of the top 25%. Reference run: seeds 0/0; each rerun "
        "differs from it in one source of noise. Cells: the share of the group's layers that the rerun puts on the "
        "same side (for the selected ones: that it selects too).",
        "",
        "| estimator | stage-1 steps | rerun differs in | selected, certain | selected, uncertain | all certain "
        "| all uncertain |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    groups = ("selected certain", "selected uncertain", "certain", "uncertain")
    for row in rows:
        counts = row["counts"]
        lines.append(
            f"| {_cell(row['estimator'])} | {row['stage1_steps']} | (layers in the group) | "
            + " | ".join(str(counts[g]) for g in groups)
            + " |"
        )
        for source in ("stage2", "init", "order"):
            cells = " | ".join(f"{row[source][g]:.2f}" if counts[g] else "–" for g in groups)
            lines.append(f"| | | {source} | {cells} |")
    return [*lines, ""]


def _types(results: dict) -> list[str]:
    """What each estimator's top 25% is made of, by module type (the reference run)."""
    types = sorted({t for row in results["rows"] for t in row.get("top_types", {})})
    lines = ["## What the top 25% is made of", "", "Layers of each module type in the top 25% of the reference run "]
    lines[-1] += "(seeds 0/0). A top set filled by one or two types agrees between runs whatever the positions do."
    lines += ["", "| estimator | stage-1 steps | " + " | ".join(types) + " |", "|---|---:|" + "---:|" * len(types)]
    for row in sorted(results["rows"], key=lambda r: (r["estimator"], r["stage1_steps"])):
        if "top_types" in row:
            counts = " | ".join(str(row["top_types"].get(t, 0)) for t in types)
            lines.append(f"| {_cell(row['estimator'])} | {row['stage1_steps']} | {counts} |")
    return [*lines, ""]


def _blocks(results: dict) -> list[str]:
    """Seed agreement at block granularity (derived exactly from the module scores, see `block_scores`)."""
    k = max(1, math.floor(0.25 * results["blocks"] + 0.5))
    lines = ["## Block granularity", ""]
    lines += [
        f"One score per transformer block ({results['blocks']} blocks; top 25% = {k} blocks; two random sets overlap "
        f'{results["random_blocks"]:.2f}), as `granularity="block"` ranks them, derived from the module scores.',
        "",
        "| estimator | stage-1 steps | J@25% init | J@25% order | J@25% stage2 | Spearman init | Spearman order |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in sorted(results["rows"], key=lambda r: (r["estimator"], r["stage1_steps"])):
        if "blocks" in row:
            b = row["blocks"]
            init, order = b.get("init", b.get("seed")), b.get("order", {})
            lines.append(
                f"| {_cell(row['estimator'])} | {row['stage1_steps']} | {_f(init, 'jaccard@0.25')} | "
                f"{_f(order, 'jaccard@0.25')} | {_f(b.get('stage2', {}), 'jaccard@0.25')} | "
                f"{_f(init, 'spearman')} | {_f(order, 'spearman')} |"
            )
    return [*lines, ""]


def _lengths(results: dict) -> list[str]:
    """Update-norm agreement along stage 1, and stop rules on the mask."""
    run = results.get("trajectory")
    if not run:
        return ["## Stage-1 length", "", "(no stage-1 trajectories among the cells yet)", ""]
    lines = ["## Stage-1 length, and a stop rule on the mask", ""]
    lines += [
        f"Update-norm scores recorded every {run['every']} steps along the longest stage-1 runs (a shorter run is a "
        "prefix of a longer one: constant learning rate, same data order).",
        "",
        "| stage-1 steps | J@25% init | J@25% order | Spearman init | Spearman order | within type init "
        "| within type order |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for point in run["points"]:
        if point["step"] % 32 == 0 or point["step"] == 16:
            i, o = point["init"], point["order"]
            lines.append(
                f"| {point['step']} | {_f(i, 'jaccard@0.25')} | {_f(o, 'jaccard@0.25')} | {_f(i, 'spearman')} | "
                f"{_f(o, 'spearman')} | {_f(i, 'spearman_within_type')} | {_f(o, 'spearman_within_type')} |"
            )
    lines += [
        "",
        "A stop rule on the mask ends stage 1 at the first check whose top-25% set overlaps the set `window` steps "
        "before by at least `J`; each run stops on its own, and the runs are compared where they stopped. The last "
        "row is the paper's test on the loss (the mean loss of the last 20 steps within ε of the 20 before), "
        "compared at the first recorded check at or after its stop.",
        "",
        "| window | J | stop steps (init/order 0/0, 1/0, 0/1) | J@25% init | J@25% order | Spearman init |",
        "|---:|---:|---|---:|---:|---:|",
    ]
    for rule in run["rules"]:
        stops = ", ".join(str(v) for v in rule["stops"].values())
        if "loss_rule" in rule:  # compared at the first recorded check at or after the stop
            window, threshold = f"loss test: {rule['loss_rule'][1]}", f"ε = {rule['loss_rule'][0]}"
        else:
            window, threshold = rule["window"], rule["jaccard"]
        lines.append(
            f"| {window} | {threshold} | {stops} | {_f(rule['init'], 'jaccard@0.25')} | "
            f"{_f(rule['order'], 'jaccard@0.25')} | {_f(rule['init'], 'spearman')} |"
        )
    return [*lines, ""]


def _cross(results: dict) -> list[str]:
    lines = ["## Across datasets, against the seed-to-seed floor", ""]
    lines += ["| estimator | stage-1 steps | datasets | J@25% | Spearman | J@25% between seeds (same data) |"]
    lines += ["|---|---:|---|---:|---:|---:|"]
    for cross in results["cross"]:
        same = [r for r in results["rows"] if r["estimator"] == cross["estimator"]]
        same = [r for r in same if r["stage1_steps"] == cross["stage1_steps"] and "init" in r]
        floor = statistics.mean([same[0]["init"]["jaccard@0.25"], same[0]["order"]["jaccard@0.25"]]) if same else None
        shown = f"{floor:.2f}" if floor is not None else "–"
        lines.append(
            f"| {_cell(cross['estimator'])} | {cross['stage1_steps']} | {cross['a']} / {cross['b']} | "
            f"{cross['jaccard@0.25']:.2f} | {cross['spearman']:.2f} | {shown} |"
        )
    if not results["cross"]:
        lines.append("| (no cross-dataset cells in this run: LIMA and Dolly come from ../shared) | | | | | |")
    return lines


COSTS = {  # row key -> x-axis label of the frontier's panels
    "cost_steps": "identification steps / steps of a 3-epoch LoRA-all fine-tune",
    "cost": "identification seconds / seconds of that fine-tune",
    "tokens": "tokens read by identification",
}


def frontier(path: Path, results: dict) -> None:
    """Seed-to-seed top-25% Jaccard (the lower of init and order) against each cost, one line per estimator (dashed,
    hollow: not right on the planted task)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    share = _found_share(results)
    fig, axes = plt.subplots(1, len(COSTS), figsize=(15, 4), sharey=True)
    for ax, (cost, label) in zip(axes, COSTS.items(), strict=True):
        for name in dict.fromkeys(r["estimator"] for r in results["rows"]):
            rows = [r for r in results["rows"] if r["estimator"] == name and cost in r]
            rows.sort(key=lambda r: r["stage1_steps"])  # a line joins the stage-1 lengths in order
            right = share.get(name, 0) >= RIGHT
            tag = "" if right else " (not right on the planted task)"
            ax.plot(
                [r[cost] for r in rows],
                [_worst(r) for r in rows],
                marker="o",
                fillstyle="full" if right else "none",
                linestyle="-" if right else "--",
                label=name + tag,
            )
        ax.axhline(results["random"]["jaccard@0.25"], color="grey", linestyle=":", label="random sets")
        ax.set_xlabel(label)
    axes[0].set_ylabel("top-25% Jaccard between seeds (worst source)")
    axes[0].set_ylim(0, 1)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_inputs(parser, PRESETS)
    add_cell_options(parser, ROOT / "benchmarks" / "results" / "stability", ROOT / "benchmarks" / "STABILITY.md")
    parser.add_argument(
        "--lengths",
        type=lambda t: [int(x) for x in t.split(",")],
        help="stage-1 lengths to run (default: the preset's)",
    )
    parser.add_argument(
        "--estimators",
        type=lambda t: t.split(","),
        default=[*NO_STAGE2, *ESTIMATORS],
        help="comma-separated estimators of the seed rows (default: all)",
    )
    return parsed_inputs(parser, argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse(sys.argv[1:] if argv is None else list(argv))
    _offline_and_quiet()
    results = run(args)
    write_study(args, "stability", results, page(results, args))
    frontier(args.cells / args.preset / "frontier.png", results)
    return results


if __name__ == "__main__":
    main()
