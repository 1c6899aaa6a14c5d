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

Then `stability.json` and a Markdown page: top-k Jaccard (k = 5, 10, 25, 50% of the candidates) and Spearman between
two runs that differ in one source of noise only (adapter initialisation, data order, or stage 2 alone), against the
Jaccard of two random sets; overlap across datasets beside the seed-to-seed overlap; and the cost of each estimator.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
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

from benchmarks.baselines import gradnorm_scores  # noqa: E402
from benchmarks.run import DATASETS, add_inputs, parsed_inputs  # noqa: E402
from peft_ila import ILAConfig, identify_important_layers  # noqa: E402
from peft_ila.app.cli import _offline_and_quiet  # noqa: E402
from peft_ila.app.compare import jaccard, spearman  # noqa: E402
from peft_ila.app.data import fingerprint  # noqa: E402
from peft_ila.app.files import write_json  # noqa: E402
from peft_ila.app.pipeline import Prepared, lora_all_layers, prepare  # noqa: E402
from peft_ila.app.report import machine  # noqa: E402
from peft_ila.identification.importance import Identification  # noqa: E402
from peft_ila.identification.training import StepStats, cycle, train_steps  # noqa: E402
from peft_ila.tuner.selection import as_float32  # noqa: E402

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
    ),
}
ADAPTER = dict(task_type="CAUSAL_LM", r=8, lora_alpha=16, stage1_lr=1e-3)
# name -> ILAConfig fields of the estimator's stage (update-norm comes free with every stage-1 cell)
ESTIMATORS = {
    "gates": dict(estimator="gates"),
    "gates from 0.9": dict(estimator="gates", gate_init=0.9),
    "first-order": dict(estimator="first-order"),
}
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
        """The update-norm scores now (as `UpdateNorm` scores them), and the stage's cost and losses so far."""
        norms = self.update_norms()
        top = max(norms.values())
        scores = {n: as_float32(v / top if top > 0 else 0.0) for n, v in norms.items()}
        return {"scores": scores, "seconds": stats.seconds, "tokens": stats.tokens, "losses": list(stats.losses)}


def key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


class Study:
    """The cells of one preset: each computed at most once, read back from `cells` afterwards."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.p = args, PRESETS[args.preset]
        self.cells: Path = args.cells / args.preset
        self.cells.mkdir(parents=True, exist_ok=True)
        self.prepared: dict[str, Prepared] = {}
        self.base = None

    def files(self, dataset: str) -> tuple[str, str | None]:
        """The training data spec and the held-out file (None: split off the training data)."""
        data, eval_data = self.args.data.get(dataset, DATASETS[dataset][0]), None
        if dataset not in self.args.data:
            eval_data = DATASETS[dataset][1]
        return tuple(s.format(shared=self.args.shared) if s else s for s in (data, eval_data))

    def identity(self, dataset: str) -> dict:
        """What a cell's result depends on besides its own settings: the model, the data's SHA-256, the shape."""
        return {
            "dataset": dataset,
            "data_sha256": fingerprint(self.files(dataset)[0])[1],
            "model": self.args.model,
            "max_length": self.p["max_length"],
            "batch_size": self.p["batch_size"],
        }

    def data(self, dataset: str) -> Prepared:
        if dataset not in self.prepared:
            data, eval_data = self.files(dataset)
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
        stem = self.cells / f"{kind}-{key(settings)}"
        if stem.with_suffix(".json").exists():
            return json.loads(stem.with_suffix(".json").read_text())
        if self.args.existing_only:
            raise Missing(f"{kind}-{key(settings)}")
        print(f"  computing {kind} {settings}", flush=True)
        record = {"kind": kind, "settings": settings, **compute(stem)}
        write_json(stem.with_suffix(".json"), record)
        return record

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
            dataset = stage1["settings"]["dataset"]
            fields = {**ESTIMATORS[estimator], "stage2_steps": self.p["stage2"], "top_k": 0.25}
            probe = get_peft_model(copy.deepcopy(self.data(dataset).model), self.config(**fields))
            assert probe.load_state_dict(self.weights(stage1), strict=False).unexpected_keys == []
            batches = self.data(dataset).batches(self.p["batch_size"], 1000 + stage2_seed)
            result = identify_important_layers(probe, batches, progress=self.args.progress, train_stage1=False)
            return {"scores": result.scores, "seconds": result.stage2.seconds, "tokens": result.stage2.tokens}

        return self.cell("score", settings, compute)

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


def agreement(a: dict[str, float], b: dict[str, float]) -> dict:
    """Top-k Jaccard at each fraction and Spearman of two score dicts over their common layers."""
    names = [n for n in a if n in b]
    out = {"spearman": spearman([a[n] for n in names], [b[n] for n in names])}
    for f in FRACTIONS:
        k = max(1, math.floor(f * len(names) + 0.5))
        top = [set(sorted(names, key=lambda n, s=s: (-s[n], names.index(n)))[:k]) for s in (a, b)]
        out[f"jaccard@{f:g}"] = jaccard(*top)
    return out


class Missing(Exception):
    """A cell that `--existing-only` does not compute."""


def run(args: argparse.Namespace) -> dict:
    study = Study(args)
    datasets = [d for d in args.datasets if study.available(d)]
    primary = datasets[0]
    results = {"machine": machine(), "preset": args.preset, "rows": [], "cross": [], "random": {}, "missing": []}
    reference = study.reference(primary)
    for steps in sorted(args.lengths or study.p["stage1"], reverse=True):  # the longest run gives the shorter ones
        for name in [e for e in ("update-norm", *ESTIMATORS) if e in args.estimators]:
            try:
                results["rows"].append(seed_row(study, primary, steps, name, reference))
            except Missing as cell:
                results["missing"].append(f"{name} at {steps} stage-1 steps ({cell})")
    try:
        results["rows"].append(gradnorm_row(study, primary, reference))
    except Missing as cell:
        results["missing"].append(f"gradient norm ({cell})")
    results["cross"] = cross_rows(study, datasets, results["missing"])
    n = len(study.stage1(primary, study.p["lengths_for_datasets"], 0, 0)["scores"])
    results["random"] = {
        f"jaccard@{f:g}": expected_random_jaccard(n, max(1, math.floor(f * n + 0.5))) for f in FRACTIONS
    }
    results.update(candidates=n, reference=reference)
    return results


def seed_row(study: Study, dataset: str, steps: int, name: str, reference: dict) -> dict:
    """One estimator at one stage-1 length: agreement between runs that differ in one source of noise, and cost."""
    stage1 = {seeds: study.stage1(dataset, steps, *seeds) for seeds in SEEDS}
    if name == "update-norm":
        cells = dict(stage1)
    else:
        cells = {seeds: study.score(cell, name) for seeds, cell in stage1.items()}
        cells["stage2"] = study.score(stage1[(0, 0)], name, stage2_seed=1)
    row = {"estimator": name, "stage1_steps": steps, "stage2_steps": 0 if name == "update-norm" else study.p["stage2"]}
    sources = dict(SOURCES, **({"stage2": ((0, 0), "stage2")} if "stage2" in cells else {}))
    for source, (x, y) in sources.items():
        row[source] = agreement(cells[x]["scores"], cells[y]["scores"])
    seconds = stage1[(0, 0)]["seconds"] + (0 if name == "update-norm" else cells[(0, 0)]["seconds"])
    row.update(seconds=seconds, cost=seconds / reference["fine_tune_seconds"])
    row["cost_steps"] = (steps + row["stage2_steps"]) / (EPOCHS * reference["epoch_steps"])
    return row


def gradnorm_row(study: Study, dataset: str, reference: dict) -> dict:
    grad = [study.gradnorm(dataset, seed) for seed in (0, 1)]
    return {
        "estimator": "gradient norm (fresh adapters)",
        "stage1_steps": study.p["gradnorm"],
        "stage2_steps": 0,
        "seed": agreement(grad[0]["scores"], grad[1]["scores"]),
        "seconds": grad[0]["seconds"],
        "cost": grad[0]["seconds"] / reference["fine_tune_seconds"],
        "cost_steps": study.p["gradnorm"] / (EPOCHS * reference["epoch_steps"]),
    }


def cross_rows(study: Study, datasets: list[str], missing: list[str]) -> list[dict]:
    """Each estimator's agreement between every two datasets (seed 0, the preset's stage-1 length)."""
    steps, rows = study.p["lengths_for_datasets"], []
    for name in ("update-norm", *ESTIMATORS):
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


def page(results: dict, args: argparse.Namespace) -> str:
    """The Markdown page of a study."""
    ref, rnd = results["reference"], results["random"]
    lines = [
        "# Stability of the layer ranking",
        "",
        f"Written by `python benchmarks/stability.py --preset {results['preset']}` (`make bench-stability`) from the "
        f"cells in `{(args.cells / args.preset).relative_to(ROOT) if args.cells.is_relative_to(ROOT) else args.cells}`"
        f"; {results['candidates']} candidate layers; {results['machine']['cpu_count']} CPU cores, torch "
        f"{results['machine']['torch']}. Cost is identification's optimizer steps (stage 1 + stage 2), or its seconds, "
        f"over those of a {EPOCHS}-epoch LoRA-all fine-tune of the same data ({ref['epoch_steps']} steps/epoch, "
        f"{ref['step_seconds']:.2f} s/step). Seconds were measured on a shared machine; steps are the steadier unit.",
        "",
        "Two runs that differ in one source of noise only: `init` (the stage-1 adapter initialisation seed), `order` "
        "(the data order), `stage2` (the estimator's stage alone, on the same stage-1 adapters). Jaccard of the top-k "
        f"sets; two random sets overlap {rnd['jaccard@0.25']:.2f} at 25% (5%: {rnd['jaccard@0.05']:.2f}, 10%: "
        f"{rnd['jaccard@0.1']:.2f}, 50%: {rnd['jaccard@0.5']:.2f}).",
        "",
        "| estimator | stage-1 steps | stage-2 steps | cost (steps) | cost (seconds) | J@25% init | J@25% order "
        "| J@25% stage2 | Spearman init | Spearman order | J@5/10/50% init |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in sorted(results["rows"], key=lambda r: (r["estimator"], r["stage1_steps"])):
        init, order = row.get("init", row.get("seed")), row.get("order", {})
        stage2 = row.get("stage2", {})
        cell = lambda d, k: f"{d[k]:.2f}" if k in d else "–"  # noqa: E731
        small = "/".join(cell(init, f"jaccard@{f:g}") for f in (0.05, 0.1, 0.5))
        lines.append(
            f"| {row['estimator']} | {row['stage1_steps']} | {row['stage2_steps']} | {row['cost_steps']:.3f}x | "
            f"{row['cost']:.3f}x | "
            f"{cell(init, 'jaccard@0.25')} | {cell(order, 'jaccard@0.25')} | {cell(stage2, 'jaccard@0.25')} | "
            f"{cell(init, 'spearman')} | {cell(order, 'spearman')} | {small} |"
        )
    lines += ["", "The gradient-norm row compares two seeds that differ in both initialisation and data order.", ""]
    lines += ["## Across datasets, against the seed-to-seed floor", ""]
    lines += ["| estimator | stage-1 steps | datasets | J@25% | Spearman | J@25% between seeds (same data) |"]
    lines += ["|---|---:|---|---:|---:|---:|"]
    for cross in results["cross"]:
        same = [r for r in results["rows"] if r["estimator"] == cross["estimator"]]
        same = [r for r in same if r["stage1_steps"] == cross["stage1_steps"] and "init" in r]
        floor = statistics.mean([same[0]["init"]["jaccard@0.25"], same[0]["order"]["jaccard@0.25"]]) if same else None
        shown = f"{floor:.2f}" if floor is not None else "–"
        lines.append(
            f"| {cross['estimator']} | {cross['stage1_steps']} | {cross['a']} / {cross['b']} | "
            f"{cross['jaccard@0.25']:.2f} | {cross['spearman']:.2f} | {shown} |"
        )
    if not results["cross"]:
        lines.append("| (no cross-dataset cells in this run: LIMA and Dolly come from ../shared) | | | | | |")
    if results["missing"]:
        lines += ["", f"Not computed yet ({len(results['missing'])}; `make bench-stability` continues the grid):", ""]
        lines += [f"- {entry}" for entry in results["missing"]]
    lines += ["", "![Jaccard against cost](results/stability/" + results["preset"] + "/frontier.png)", ""]
    return "\n".join(lines)


def frontier(path: Path, results: dict) -> None:
    """Seed-to-seed top-25% Jaccard (the lower of init and order) against cost, one line per estimator."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["estimator"] for r in results["rows"]):
        rows = sorted((r for r in results["rows"] if r["estimator"] == name), key=lambda r: r["cost_steps"])
        worst = [min(r[s]["jaccard@0.25"] for s in ("init", "order", "seed") if s in r) for r in rows]
        ax.plot([r["cost_steps"] for r in rows], worst, marker="o", label=name)
    ax.axhline(results["random"]["jaccard@0.25"], color="grey", linestyle=":", label="random sets")
    ax.set_xlabel("identification steps / steps of a 3-epoch LoRA-all fine-tune")
    ax.set_ylabel("top-25% Jaccard between seeds (worst source)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_inputs(parser, PRESETS)
    parser.add_argument(
        "--cells",
        type=Path,
        default=ROOT / "benchmarks" / "results" / "stability",
        help="where cells are kept (one folder per preset)",
    )
    parser.add_argument("--markdown", type=Path, default=ROOT / "benchmarks" / "STABILITY.md", help="page to write")
    parser.add_argument(
        "--lengths",
        type=lambda t: [int(x) for x in t.split(",")],
        help="stage-1 lengths to run (default: the preset's)",
    )
    parser.add_argument(
        "--estimators",
        type=lambda t: t.split(","),
        default=["update-norm", *ESTIMATORS],
        help="comma-separated estimators of the seed rows (default: all)",
    )
    parser.add_argument(
        "--existing-only", action="store_true", help="compute no cell: write the page from the cells there are"
    )
    return parsed_inputs(parser, argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse(sys.argv[1:] if argv is None else list(argv))
    _offline_and_quiet()
    results = run(args)
    write_json(args.cells / args.preset / "stability.json", results)
    args.markdown.write_text(page(results, args))
    frontier(args.cells / args.preset / "frontier.png", results)
    return results


if __name__ == "__main__":
    main()
