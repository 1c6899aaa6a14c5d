"""The learning–forgetting frontier: along the whole training curve, does any way of choosing layers with ILA reach a
better (held-out loss, forgetting) frontier than LoRA on all layers, and than the selectors a PEFT user already has
for the same share of layers?

    python -m benchmarks.frontier --preset full --dry-run   # the plan and its cost, measured here (estimate.json)
    python -m benchmarks.frontier --preset full             # resumable: a finished run is kept, a missing one run
    python -m benchmarks.frontier --preset quick            # smoke-sized

Every arm is a `Recipe` (`ARMS`) run by the library's executor (`peft_ila.app.executor.run_recipe`) for `epochs`
epochs on the grid's data, model and judges, measured at `evals` evenly spaced checkpoints by held-out loss and the
other datasets' held-out loss (their mean rise over the base model's is the forgetting); at the end and at the
checkpoint of lowest held-out loss also by the share of verifiable instructions obeyed (`peft_ila.app.instructions`)
on held-out prompts of every dataset, the share of general-knowledge questions answered right (ARC-Easy) and the loss
on general text (BBC News, `general_text.py`): at every checkpoint these three would about double a run's cost (the
dry run times them, `closing_seconds` against a checkpoint's `point_seconds` in estimate.json). ILA's arms rank the
layers by the grid's mask cell of their dataset (library defaults, seed 0); identification inside the fine-tune
identifies on each run's own data order.

The plan: every arm on the primary dataset with every seed, then LoRA-all, the best two ILA arms and the best peer
(by forgetting at matched held-out loss on the primary dataset) on the others with `other_seeds` (LoRA-all's runs
there wait for no choice). The dry run's estimate decides what is cut (`CUT`, in order) to keep within
`budget_hours`. `--arms` and `--seeds` split the plan between processes: each computes its arms' runs of its seeds
and reads the others', so the choice is made on every arm's cells whichever process makes it. Cells
(`benchmarks/results/frontier/<preset>/`): `run-*` (one arm, dataset, seed; while it runs, its progress is kept in
`run-*.running.safetensors`, and a rerun goes on from there), `follow-*` (the base model's instruction
score), `general-*` (its loss on the general text), `peer-*` (KappaTune's and Spectrum's rankings); the grid's base,
knowledge and mask cells are read (or computed) in the grid's folder. Writes `frontier.json`, `FRONTIER.md` and one
`frontier-<dataset>.png` per dataset (`frontier_report.py`).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch
from accelerate import Accelerator

from benchmarks import frontier_report, general_text
from benchmarks.core.cells import Missing, Study, key
from benchmarks.core.inputs import ROOT
from benchmarks.core.page import Finding
from benchmarks.core.recipes import train_briefly
from benchmarks.frontier_report import REFERENCE, cut
from benchmarks.grid import ADAPTER, LR, Grid
from peft_ila import ILAConfig, Selection
from peft_ila.app.executor import STATE_SUFFIX, Evaluation, Schedule, run_recipe, trained_like
from peft_ila.app.files import write_json
from peft_ila.app.instructions import InstructionProbe
from peft_ila.app.recipe import INSIDE, Recipe
from peft_ila.identification.checkpoint import checkpoint_record
from peft_ila.identification.peers import peer_layers
from peft_ila.identification.training import evaluate_loss

ARMS = {
    "lora-all": Recipe("LoRA-all"),
    "lora-slow": Recipe("LoRA-all, a third of the rate", lr_scale=1 / 3),
    "ila-75": Recipe("ILA top 75%, fresh adapters", "identify", top_k=0.75),
    "ila-50": Recipe("ILA top 50%, fresh adapters", "identify", top_k=0.5),
    "ila-ranks": Recipe("ILA ranks: every layer, rank by importance", "identify", ranks="importance"),
    "inside": Recipe("ILA inside (train's default)", "inside", top_k=INSIDE["top_k"], estimator=INSIDE["estimator"]),
    "random-75": Recipe("random 75%", "random", top_k=0.75),
    "random-50": Recipe("random 50%", "random", top_k=0.5),
    "kappa-75": Recipe("KappaTune 75%", "kappa", top_k=0.75),
    "spectrum-75": Recipe("Spectrum SNR 75%", "spectrum", top_k=0.75),
}
ILA_ARMS = ("ila-75", "ila-50", "ila-ranks", "inside")
PEER_ARMS = ("random-75", "random-50", "kappa-75", "spectrum-75")
GENERATE_BATCH = 48  # prompts answered at once (fewer sequential decoding steps than batches of 16 on a CPU)
VERSION = 1  # part of every cell's key: bump it when what a cell computes changes

QUICK = dict(
    arms=[arm for arm in ARMS if not arm.endswith("-50")],
    grid="quick",
    epochs=1,
    evals=3,
    seeds=[0],
    other_seeds=[0],
    prompts=4,
    max_new_tokens=16,
    general=2,
    budget_hours=25,
)
PRESETS = {
    "quick": QUICK,  # every path on the real model in a few minutes (the 50% arms run as the 75% ones do)
    "smoke": {**QUICK, "arms": list(ARMS), "max_new_tokens": 8},  # the test suite's, on a tiny model: every path
    "full": dict(
        arms=list(ARMS),
        grid="full",
        epochs=3,  # the modes study's long regime, where ILA's top 75% forgot less than LoRA-all
        evals=12,
        seeds=[0, 1, 2],  # the primary dataset: every arm
        other_seeds=[0, 1],  # the others: LoRA-all, the best two ILA arms and the best peer
        prompts=150,  # instruction prompts, held out from every dataset
        max_new_tokens=160,  # enough for the longest answer an instruction asks (80 words)
        general=100,  # general-text paragraphs (BBC News)
        budget_hours=25,  # of CPU (2 cores); arms are cut in `CUT`'s order until the estimate fits
    ),
}


class Frontier(Study):
    """The frontier's runs; the grid (its data, base model, judges and cells) underneath."""

    name, page_name, target, presets = "frontier", "FRONTIER.md", "make bench-frontier", PRESETS

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        planned = sorted({*self.p["seeds"], *self.p["other_seeds"]})
        if outside := sorted(set(args.seeds or planned) - set(planned)):
            raise SystemExit(f"--seeds {outside}: the {args.preset} preset plans seeds {planned}; choose among them")
        self.grid = Grid.beneath(args, self.p["grid"])
        self.data, self.base = self.grid.data, self.grid.base
        stages = dict(stage1_max_steps=self.grid.p["stage1"], stage2_steps=self.grid.p["stage2"])
        self.config = ILAConfig(task_type="CAUSAL_LM", **ADAPTER, **stages, stage1_lr=LR, lora_dropout=0.0)
        self.accelerator = Accelerator()
        self.general = general_text.paragraphs(args.general_text or general_text.bbc_folder(), self.p["general"])
        self._evaluations: dict[str, Evaluation] = {}
        self._probe: InstructionProbe | None = None
        self._general_batches = None

    @classmethod
    def options(cls, parser: argparse.ArgumentParser) -> None:
        Grid.options(parser)
        folder = ROOT / "benchmarks" / "results" / "grid"
        parser.add_argument("--grid-cells", type=Path, default=folder, help="the grid's cells (one folder per preset)")
        parser.add_argument("--dry-run", action="store_true", help="measure the plan's cost, write estimate.json")
        listed = ", ".join(ARMS)
        parser.add_argument(
            "--arms", type=_arm_names, help=f"compute only these arms' runs, comma-separated: {listed} (default: all)"
        )
        seeds = "compute only these seeds' runs of those arms, comma-separated (default: all)"
        parser.add_argument("--seeds", type=_seed_numbers, help=seeds)
        parser.add_argument(
            "--general-text", type=Path, help="general text: a folder of sections of .txt articles (default: BBC News)"
        )

    # --- what every run shares -----------------------------------------------------------------------------------

    def steps(self, name: str) -> int:
        return self.p["epochs"] * self.grid.steps(name)

    def checkpoints(self, name: str) -> list[int]:
        """`evals` evenly spaced steps, the last the end."""
        steps, evals = self.steps(name), self.p["evals"]
        return sorted({max(1, round(i * steps / evals)) for i in range(1, evals + 1)})

    def probe(self) -> InstructionProbe:
        """The instruction prompts: an even share of `prompts` from every dataset's held-out examples."""
        if self._probe is None:
            sources = [self.data[name].held_out_conversations for name in self.data.names]
            primary = self.data[self.data.primary]
            shape = dict(max_new_tokens=self.p["max_new_tokens"], batch_size=GENERATE_BATCH)
            self._probe = InstructionProbe.of(sources, primary.tokenizer, primary.plain, self.p["prompts"], **shape)
        return self._probe

    def evaluation(self, name: str) -> Evaluation:
        """Where a run on `name` is measured: its held-out set and the other datasets' (forgetting) at every
        checkpoint; the instructions, the questions and the general text at the end and at the best checkpoint."""
        if name not in self._evaluations:
            others = [other for other in self.data.names if other != name]
            references = {other: self.data.batches(other, 0, held_out=True) for other in others}
            held_out = self.data.batches(name, 0, held_out=True)
            closing = {
                "instructions": self.probe().score,
                "knowledge": self.grid.knowledge,
                "general": self.general_loss,
            }
            evaluation = Evaluation(held_out, references, self.checkpoints(name), self.accelerator, closing=closing)
            self._evaluations[name] = evaluation
        return self._evaluations[name]

    def based(self, name: str) -> Evaluation:
        """`evaluation(name)` with the base model's figures (the grid's cells): what forgetting is measured from."""
        evaluation = self.evaluation(name)
        references = {other: self.grid.base_loss(other)["loss"] for other in evaluation.references}
        evaluation.base = {"held_out": self.grid.base_loss(name)["loss"], "references": references}
        return evaluation

    def general_loss(self, model: torch.nn.Module) -> float:
        """`model`'s mean loss per token on the general-text sample (tokenized once)."""
        if self._general_batches is None:
            shape = (self.grid.p["max_length"], self.grid.p["batch_size"])
            tokenizer = self.data[self.data.primary].tokenizer
            self._general_batches = general_text.text_batches(self.general, tokenizer, *shape)
        return evaluate_loss(model, self._general_batches, self.accelerator)

    def general_identity(self) -> dict:
        return {**general_text.identity(self.general), "max_length": self.grid.p["max_length"]}

    # --- cells ---------------------------------------------------------------------------------------------------

    def run_settings(self, name: str, arm: str, seed: int) -> dict:
        """What a run cell's key holds: the data, the arm's recipe, the schedule, the measures."""
        recipe, evaluation = ARMS[arm], self.evaluation(name)
        settings = {**self.grid.identity(name), "arm": arm, "seed": seed, "steps": self.steps(name), "lr": LR}
        settings.update(recipe={k: v for k, v in asdict(recipe).items() if k != "label"}, **ADAPTER)
        settings.update(at=evaluation.at, others={o: self.grid.identity(o) for o in evaluation.references})
        settings.update(knowledge=self.grid.knowledge_identity, instructions=self.probe().identity())
        settings.update(general=self.general_identity())
        settings.update(stages=[self.config.stage1_max_steps, self.config.stage2_steps], version=VERSION)
        if recipe.layers == "identify":
            settings["mask"] = self.grid.mask(name)["settings"]
        if recipe.layers in ("kappa", "spectrum"):
            settings["peer"] = recipe.layers  # ranked by a peer cell
        return settings

    def run_cell(self, name: str, arm: str, seed: int) -> dict:
        """`ARMS[arm]` fine-tuned on `name` with `seed` for `epochs` epochs: the executor's run record (only read
        when `--arms` or `--seeds` leaves the run to another process)."""
        recipe, evaluation, settings = ARMS[arm], self.based(name), self.run_settings(name, arm, seed)

        def compute(stem: Path) -> dict:
            prepared = replace(self.data[name], model=copy.deepcopy(self.base))
            schedule = Schedule(self.steps(name), LR, LR, 0.1, self.grid.p["batch_size"])
            ranking, state = self.ranking(name, arm), stem.with_name(stem.name + STATE_SUFFIX)
            return run_recipe(
                recipe, prepared, self.config, schedule, seed, evaluation, self.args.progress, None, ranking, state
            )

        return self.cell("run", settings, compute, read_only=not self.computes(arm, seed))

    def computes(self, arm: str, seed: int) -> bool:
        """Whether this process computes `arm`'s run with `seed` (`--arms`, `--seeds`) or only reads its cell."""
        return arm in (self.args.arms or ARMS) and (self.args.seeds is None or seed in self.args.seeds)

    def under_way(self, name: str, arm: str, seed: int) -> dict | None:
        """How far a run that has not finished went, from its state file: {dataset, arm, seed, step, of}; None if
        it has not started."""
        try:
            stem = f"run-{key(self.run_settings(name, arm, seed))}"
        except Missing:
            return None
        saved = checkpoint_record(self.folder / (stem + STATE_SUFFIX))
        if saved is None:
            return None
        return {"dataset": name, "arm": arm, "seed": seed, "step": saved["notes"]["step"], "of": self.steps(name)}

    def ranking(self, name: str, arm: str) -> Selection | None:
        """How `arm` ranks the layers before a run on `name`: ILA's by the grid's mask cell, KappaTune's and
        Spectrum's by a cell of their own (they depend on the base model only); None when the run ranks them itself
        (the random draw, identification inside the fine-tune, or every layer)."""
        layers, candidates = ARMS[arm].layers, self.grid.candidates
        if layers == "identify":
            return Selection.from_json(self.grid.mask(name)["selection"])
        if layers not in ("kappa", "spectrum"):
            return None
        settings = {"model": self.args.model, "peer": layers, "version": VERSION}

        def ranked(stem: Path) -> dict:
            return {"ranked": peer_layers(layers, self.base, candidates, len(candidates), 0)}

        return Selection(candidates, self.cell("peer", settings, ranked)["ranked"])

    def base_general(self) -> dict:
        """The base model's loss on the general-text sample."""
        settings = {"model": self.args.model, **self.general_identity(), "version": VERSION}
        return self.cell("general", settings, lambda stem: {"loss": self.general_loss(self.base)})

    def base_following(self) -> dict:
        """The base model's instruction score."""
        settings = {"model": self.args.model, **self.probe().identity(), "version": VERSION}
        return self.cell("follow", settings, lambda stem: self.probe().score(self.base))

    # --- the plan ------------------------------------------------------------------------------------------------

    def arms(self, estimate: dict | None) -> list[str]:
        """The preset's arms less those the estimate cuts (`cut`). `--arms` does not change the plan, only which of
        its runs this process computes: the choice of arms for the other datasets is made on the whole plan."""
        dropped = cut(estimate, self.p["budget_hours"])["cut"] if estimate else []
        return [arm for arm in self.p["arms"] if arm not in dropped]

    def run(self) -> dict:
        estimate = self.estimate_record()
        if estimate is None and not self.args.existing_only:
            why = "what the plan cuts depends on it"
            sys.exit(f"benchmarks.frontier: no estimate.json in {self.folder}: run with --dry-run first ({why})")
        primary, names = self.data.primary, self.data.names
        arms = self.arms(estimate)
        results = {"datasets": names, "primary": primary, "settings": self.settings(), "arms": arms, "runs": []}
        results["under_way"] = []
        results.update(estimate=estimate, labels={arm: ARMS[arm].label for arm in ARMS}, base=self.bases())
        if following := self.collect("the base model's instruction score", self.base_following):
            results["base"]["instructions"] = verdicts(following)
        for seed in self.p["seeds"]:
            for arm in arms:
                self.add(results, primary, arm, seed)
        others = self.collect("the arms on the other datasets", frontier_report.chosen, results, arms)
        results["others"] = others
        for seed in self.p["other_seeds"]:
            for name in names[1:]:
                for arm in others or [REFERENCE]:  # LoRA-all runs there whichever arms are chosen
                    self.add(results, name, arm, seed)
        return results

    def add(self, results: dict, name: str, arm: str, seed: int) -> None:
        if record := self.collect(f"{name}: {arm}, seed {seed}", self.run_cell, name, arm, seed):
            results["runs"].append({"dataset": name, "arm": arm, "seed": seed, **kept(record)})
        elif progress := self.under_way(name, arm, seed):
            results["under_way"].append(progress)

    def bases(self) -> dict:
        """The base model's held-out loss on each dataset and its share of right answers (the grid's cells)."""
        try:
            losses = {name: self.grid.base_loss(name)["loss"] for name in self.data.names}
            knowledge = self.grid.base_knowledge()["accuracy"]
            return {"held_out": losses, "knowledge": knowledge, "general": self.base_general()["loss"]}
        except Missing:
            return {}

    def settings(self) -> dict:
        shape = ("batch_size", "max_length", "eval_size", "stage1", "stage2", "questions")
        grid = {k: self.grid.p[k] for k in shape}
        steps = {name: self.steps(name) for name in self.data.names}
        return {**self.p, "grid": grid, "steps": steps, "lr": LR, **ADAPTER, "candidates": len(self.grid.candidates)}

    def findings(self, results: dict) -> list[Finding]:
        return frontier_report.findings(results)

    def page(self, results: dict) -> str:
        """The page; the frontier plots written beside the cells."""
        frontier_report.plots(self.folder, results)
        prefix = "" if self.page_path().parent == self.folder else f"results/frontier/{self.args.preset}/"
        return frontier_report.page(results, prefix)

    # --- the dry run ---------------------------------------------------------------------------------------------

    def estimate_record(self) -> dict | None:
        path = self.folder / "estimate.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def estimate(self) -> dict:
        """The cost of every run of the plan (no arm cut), from a few LoRA-all steps, one checkpoint evaluation and
        one of the closing measures timed here; written to estimate.json."""
        primary = self.data.primary
        evaluation = self.based(primary)
        model = trained_like(ARMS["lora-all"], copy.deepcopy(self.base), self.config, 0)[0]
        step = statistics.mean(train_briefly(model, self.data.batches(primary, 0), 4, LR)[0])
        evaluation.point(model, 0)
        point = evaluation.seconds
        evaluation.closed(model)
        return {
            "step_seconds": step,
            "point_seconds": point,
            "closing_seconds": evaluation.seconds - point,
            "runs": plan_runs(self.data.names, self.p["arms"], self.p, self.steps, self.checkpoints, self.config),
            "machine": {"threads": torch.get_num_threads()},
        }

    @classmethod
    def main(cls, argv: list[str] | None = None) -> dict:
        """`Study.main`, or with --dry-run the plan's cost (estimate.json) and what it cuts, computing no run."""
        args = cls.parse(sys.argv[1:] if argv is None else list(argv))
        if not args.dry_run:
            return super().main(argv)
        study = cls(args)
        estimate = study.estimate()
        write_json(study.folder / "estimate.json", estimate)
        print(frontier_report.estimate_text(estimate, cut(estimate, study.p["budget_hours"])))
        return estimate


def _arm_names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in ARMS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown arm(s) {unknown or text!r}: choose from {', '.join(ARMS)}")
    return names


def _seed_numbers(text: str) -> list[int]:
    try:
        seeds = [int(seed) for seed in text.split(",") if seed.strip()]
    except ValueError:
        seeds = []
    if not seeds or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"seeds {text!r}: give whole numbers from 0, comma-separated, e.g. 0,1")
    return seeds


def plan_runs(names: list[str], arms: list[str], p: dict, steps, checkpoints, config: ILAConfig) -> list[dict]:
    """Every run the plan holds (the other datasets' with four arms, as chosen later), each with its optimizer
    steps (identification's stage 2 added for an arm that identifies inside) and its checkpoints."""
    extra = {"inside": config.stage2_steps}
    planned = [(names[0], arm, seed) for seed in p["seeds"] for arm in arms]
    planned += [(name, f"other-{i}", seed) for seed in p["other_seeds"] for name in names[1:] for i in range(4)]
    return [
        {"dataset": d, "arm": a, "seed": s, "steps": steps(d) + extra.get(a, 0), "points": len(checkpoints(d))}
        for d, a, s in planned
    ]


def kept(record: dict) -> dict:
    """What the page needs of a run cell (each instruction score's verdicts by prompt in one string, `verdicts`)."""
    out = {key: record[key] for key in ("checkpoints", "steps", "seconds", "trainable_params")}
    if "evaluation_seconds" in record:  # absent from a cell computed before the executor timed evaluation
        out["evaluation_seconds"] = record["evaluation_seconds"]
    out["closing"] = {at: {**measured} for at, measured in record["closing"].items()}
    for measured in out["closing"].values():
        measured["instructions"] = verdicts(measured["instructions"])
    return {**out, "selected": len(record["identification"].get("selected", [])) or None}


def verdicts(score: dict) -> dict:
    """An instruction score (`InstructionProbe.score`) with its verdicts by prompt as one string, "1" where the
    answer obeyed: {share, se, obeyed}."""
    return {**score, "obeyed": "".join("1" if verdict else "0" for verdict in score["obeyed"])}


if __name__ == "__main__":
    Frontier.main()
