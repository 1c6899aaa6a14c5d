"""The one executor: `run_recipe` fine-tunes a `Recipe` on prepared data and returns its run record (checkpoints'
losses, forgetting and other measures, closing measures such as instruction scores, steps, seconds, memory,
identification's data position); `train_briefly` times a few steps of what a recipe trains, and `side_by_side`
several of those in turn."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from peft import LoraConfig

from ..identification.checkpoint import FINETUNE_FORMAT, checkpoint_record
from ..identification.importance import Identification
from ..identification.peers import PEERS, peer_layers
from ..identification.training import cycle, evaluate_loss, train_steps
from ..tuner.config import ILAConfig, resolve_top_k
from ..tuner.layerwise import LayerSampler, LayerwiseConfig, block_groups
from ..tuner.model import find_candidates
from ..tuner.ranks import importance_lora_config
from ..tuner.selection import Selection
from .checkpoints import FinetuneCheckpoint
from .files import peak_memory_mb, reset_peak_memory
from .judge import forgetting
from .pipeline import Prepared, finetune, wrap
from .recipe import Recipe

STATE_EVERY = 25  # optimizer steps between saves of a run's state (a minute of the frontier's on 2 CPU cores)
STATE_SUFFIX = ".running.safetensors"  # a run's state file is named after its record's: run-1a2b + STATE_SUFFIX


@dataclass(frozen=True)
class Schedule:
    """What every recipe of a comparison shares: optimizer `steps` (an inside identification's stage 1 counts in
    them), AdamW rates for adapters (`lr`) and for full weights (`full_lr`), warmup fraction, micro-batch size."""

    steps: int
    lr: float
    full_lr: float
    warmup: float
    batch_size: int


@dataclass
class Evaluation:
    """Where a run is measured: the held-out batches, reference sets' batches by name (their loss rise over the
    base model's, `base`, is the forgetting), other `measures` by name (a model -> a number), and the steps `at`
    which (the last is the end). `closing` measures (a model -> any JSON value: a share of right answers, an
    `InstructionProbe`'s score) are taken at the end and at the fine-tune's checkpoint of lowest held-out loss only
    (not one in an inside identification's stage 1, whose adapters on every layer are not all kept)."""

    held_out: object
    references: dict[str, object]
    at: list[int]
    accelerator: Accelerator
    base: dict = field(default_factory=dict)
    measures: dict[str, Callable[[torch.nn.Module], float]] = field(default_factory=dict)
    closing: dict[str, Callable[[torch.nn.Module], object]] = field(default_factory=dict)
    seconds: float = 0.0  # spent evaluating, left out of a run's wall time

    def point(self, model: torch.nn.Module, step: int, held_out: float | None = None) -> dict:
        """{step, held_out, references: {name: loss}, forgetting: mean rise over the base's, or None, measures}."""
        start = time.perf_counter()
        loss = held_out if held_out is not None else evaluate_loss(model, self.held_out, self.accelerator)
        references = {name: evaluate_loss(model, b, self.accelerator) for name, b in self.references.items()}
        measured = {name: measure(model) for name, measure in self.measures.items()}
        self.seconds += time.perf_counter() - start
        rise = forgetting(references, self.base.get("references", {}))
        point = {"step": step, "held_out": loss, "references": references, "forgetting": rise}
        return {**point, "measures": measured} if measured else point

    def closed(self, model: torch.nn.Module) -> dict:
        """The `closing` measures of `model`, their time counted as evaluation."""
        start = time.perf_counter()
        measured = {name: measure(model) for name, measure in self.closing.items()}
        self.seconds += time.perf_counter() - start
        return measured


class Best:
    """The checkpoint of lowest held-out loss so far and a copy of the weights that change (`params`) there (one
    buffer per parameter, allocated once and overwritten in place)."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        self.params, self.point = params, None
        self.weights = [p.detach().clone() for p in params]

    @torch.no_grad()
    def offer(self, point: dict) -> None:
        if self.point is None or point["held_out"] < self.point["held_out"]:
            self.point = point
            for weight, param in zip(self.weights, self.params, strict=True):
                weight.copy_(param)

    @torch.no_grad()
    def restore(self) -> None:
        for param, weight in zip(self.params, self.weights, strict=True):
            param.copy_(weight)


class RunState:
    """A run's progress, kept while it runs in one file (`path`; None: nowhere) as its fine-tune's checkpoint
    (`checkpoints.FinetuneCheckpoint`, saved every `every` optimizer steps, after their evaluations, if any):
    the run's global step (an inside identification's stage 1 counted), the checkpoints' figures, the best one's
    step and weights, the seconds so far without evaluation and those of evaluation, and how often the run was
    resumed. Made from the file of an interrupted run, it holds that run's progress, and the fine-tune goes on from
    its saved state: the run's record is the one an uninterrupted run would have written, but for its clock."""

    def __init__(self, path: Path | None, evaluation: Evaluation, every: int = STATE_EVERY) -> None:
        exists = path is not None and Path(path).exists()
        saved = checkpoint_record(path) if exists else None
        if exists and (saved or {}).get("format") != FINETUNE_FORMAT:
            raise ValueError(f"{path} is not a run's state that peft-ila wrote: give run_recipe another path.")
        self.path, self.every, self.resuming = path, every, saved is not None
        fresh = {"checkpoints": [], "best": None, "seconds": 0.0, "evaluation_seconds": 0.0, "resumed": 0}
        self.notes = saved["notes"] if saved else fresh
        self.notes["resumed"] += int(self.resuming)
        self.began, self.evaluated = time.perf_counter(), evaluation.seconds
        self.carried, self.carried_evaluation = self.notes["seconds"], self.notes["evaluation_seconds"]

    def started(
        self, evaluation: Evaluation, best: Best | None, identified: dict, step: int
    ) -> FinetuneCheckpoint | None:
        """Mark the fine-tune's start at the run's global `step` (a fresh run's seconds so far are its setup's: an
        identification, say, whose record, `identified`, an interrupted run keeps, and the evaluations of the
        checkpoints in it); the fine-tune's checkpoint, with `best`'s weights in it."""
        self.notes.setdefault("identification", identified)
        self.notes.setdefault("step", step)
        if not self.resuming:
            self.carried, self.carried_evaluation = self.seconds(evaluation), self.evaluation_seconds(evaluation)
        self.began, self.evaluated = time.perf_counter(), evaluation.seconds
        if best is not None and self.notes["best"] is not None:
            best.point = next(c for c in self.notes["checkpoints"] if c["step"] == self.notes["best"])
        if self.path is None:
            return None
        kept = {str(i): weight for i, weight in enumerate(best.weights)} if best is not None else {}
        return FinetuneCheckpoint(Path(self.path), self.every, self.resuming, self.notes, kept)

    def seconds(self, evaluation: Evaluation) -> float:
        """Seconds of the run so far, evaluation left out."""
        return self.carried + time.perf_counter() - self.began - (evaluation.seconds - self.evaluated)

    def evaluation_seconds(self, evaluation: Evaluation) -> float:
        """Seconds the run's evaluations took so far."""
        return self.carried_evaluation + evaluation.seconds - self.evaluated

    def noted(self, evaluation: Evaluation, best: Best | None, step: int) -> None:
        """After the run's global `step` (before its save): that step, the seconds so far and the best checkpoint's
        step."""
        self.notes["step"] = step
        self.notes["seconds"] = self.seconds(evaluation)
        self.notes["evaluation_seconds"] = self.evaluation_seconds(evaluation)
        self.notes["best"] = best.point["step"] if best is not None and best.point is not None else None

    def record(self, evaluation: Evaluation, report, offset: int) -> dict:
        """The run record but its closing measures, after the fine-tune's `report` (`offset`: the steps before it,
        an inside identification's stage 1) and the last checkpoint's evaluation."""
        return {
            "checkpoints": self.notes["checkpoints"],
            "steps": offset + report.steps,
            "seconds": self.seconds(evaluation),
            "median_step_seconds": report.median_step_seconds,
            "memory": report.memory,
            "trainable_params": report.trainable_params,
            "identification": self.notes["identification"],
            "resumed": self.notes["resumed"],
        }

    def done(self) -> None:
        """The run is recorded: its state file goes."""
        if self.path is not None:
            Path(self.path).unlink(missing_ok=True)


def run_recipe(
    recipe: Recipe,
    prepared: Prepared,
    config: ILAConfig,
    schedule: Schedule,
    seed: int,
    evaluation: Evaluation,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
    ranking: Selection | None = None,
    state: Path | None = None,
    state_every: int = STATE_EVERY,
) -> dict:
    """Fine-tune `recipe` on `prepared` (its model is changed) with `seed` (adapters, data order, identification,
    draws): the run record (checkpoints, closing measures, steps, seconds with identification and without
    evaluation, evaluation's seconds, median step seconds, memory, trainable parameters, identification's steps and
    data position).
    `config`: the adapters' shape and identification's budget; `on_step(global step)` after every fine-tune step (a
    progress bar); `ranking`: every candidate ranked before (by an identification, or by a peer selector that does
    not depend on the seed): a recipe that does not identify inside the fine-tune takes its top `top_k` instead of
    ranking anew. `state`: a file where the run keeps its progress (`RunState`, saved every `state_every` steps and
    at least once between checkpoints); given an interrupted run's, the run goes on from it (its setup done again:
    an identification inside is deterministic on a CPU, a different one refused); it goes once the record is made."""
    torch.manual_seed(seed)
    gaps = [b - a for a, b in zip(evaluation.at, evaluation.at[1:], strict=False)]
    run = RunState(state, evaluation, max(1, min([state_every, *gaps])))  # saved at least once between checkpoints
    checkpoints = run.notes["checkpoints"]

    def measured(model: torch.nn.Module, step: int) -> dict | None:
        """The figures at the run's global `step` if it is a checkpoint before the end not measured yet (a resumed
        run's identification passes its checkpoints again), else None."""
        if step not in evaluation.at[:-1] or any(c["step"] == step for c in checkpoints):
            return None
        checkpoints.append(evaluation.point(model, step))
        return checkpoints[-1]

    setup = (recipe, prepared, config, schedule, seed, evaluation.accelerator, progress, ranking, measured)
    model, how, identified = _build(*setup)
    offset = identified.get("stage1_steps", 0) if recipe.layers == "inside" else 0
    best = Best(_changing(model, how)) if evaluation.closing else None

    def step_done(stats) -> None:
        step = offset + stats.steps  # the run's global step
        point = measured(model, step)
        if point is not None and best is not None:
            best.offer(point)
        run.noted(evaluation, best, step)
        if on_step is not None:
            on_step(step)

    lr = (schedule.full_lr if recipe.method == "full" else schedule.lr) * recipe.lr_scale
    shape = (schedule.steps - offset, lr, schedule.batch_size, seed, schedule.warmup, evaluation.accelerator)
    saved = run.started(evaluation, best, identified, offset)
    before = evaluation.base["held_out"]
    report = finetune(model, prepared, *shape, progress, on_step=step_done, loss_before=before, checkpoint=saved, **how)
    checkpoints.append(evaluation.point(model, schedule.steps, report.loss_after))
    record = run.record(evaluation, report, offset)
    if best is not None:
        record["closing"] = _closing(model, evaluation, best, checkpoints[-1])
    run.done()
    return {**record, "evaluation_seconds": run.evaluation_seconds(evaluation)}


def _closing(model: torch.nn.Module, evaluation: Evaluation, best: Best, end: dict) -> dict:
    """The closing measures at the end and at the checkpoint of lowest held-out loss (the end's when it is that
    one): {"end": measures, "best": measures with its "step"}; `model` is left with the best checkpoint's weights."""
    measured = {"end": evaluation.closed(model)}
    best.offer(end)
    if best.point is end:
        return {**measured, "best": {**measured["end"], "step": end["step"]}}
    best.restore()
    return {**measured, "best": {**evaluation.closed(model), "step": best.point["step"]}}


def _changing(model: torch.nn.Module, how: dict) -> list[torch.nn.Parameter]:
    """The parameters a fine-tune may change: the trainable ones, or every one a layerwise sampler may draw."""
    sampler = how.get("sampler")
    return sampler.parameters() if sampler is not None else [p for p in model.parameters() if p.requires_grad]


def _build(
    recipe: Recipe,
    prepared: Prepared,
    config: ILAConfig,
    schedule: Schedule,
    seed: int,
    accelerator,
    progress: bool,
    ranking: Selection | None,
    measured: Callable[[torch.nn.Module, int], object] | None = None,
):
    """(model, what `finetune` takes beside it, how the layers were chosen) of `recipe` on `prepared.model`;
    `measured(model, step)` after each step of an identification inside the fine-tune's stage 1 (the run's first)."""
    if recipe.layers == "all":
        return (*trained_like(recipe, prepared.model, config, seed), {})
    candidates = find_candidates(prepared.model, config)
    k = resolve_top_k(recipe.top_k, len(candidates))
    if ranking is not None and recipe.layers != "inside":
        chosen = ranking.top(k)
    elif recipe.layers in PEERS:
        chosen = Selection(candidates, peer_layers(recipe.layers, prepared.model, candidates, k, seed))
    else:
        return _identified(recipe, prepared, config, seed, schedule.batch_size, accelerator, progress, measured)
    return (*trained_like(recipe, prepared.model, config, seed, chosen), {"selected": list(chosen.selected)})


def _identified(
    recipe: Recipe,
    prepared: Prepared,
    config: ILAConfig,
    seed: int,
    batch_size: int,
    accelerator,
    progress: bool,
    measured: Callable[[torch.nn.Module, int], object] | None,
):
    """`_build` of a recipe that identifies: ILA's probe on `prepared.model` identifies on the fine-tune's data order
    (`batch_size` examples a step); inside, its stage 1 is the run's first steps (`measured` after each) and its top
    `top_k` go on with their stage-1 weights, else fresh adapters on them (or, with ranks from importance, plain LoRA
    on every layer at the ranks its scores give)."""
    inside = recipe.layers == "inside"
    scored = dict(estimator=recipe.estimator) if recipe.estimator else {}
    probe = wrap(prepared.model, replace(config, top_k=recipe.top_k, seed=seed, keep_stage1_weights=inside, **scored))
    start = time.perf_counter()
    batches = prepared.batches(batch_size, seed)
    identification, evaluating = Identification(probe, accelerator=accelerator), []
    if inside and measured is not None:

        def stage1_step(stats) -> None:
            if identification.stage == 1:  # the run's first steps (not the estimator's, which train gates only)
                begun = time.perf_counter()
                measured(probe, stats.steps)
                evaluating.append(time.perf_counter() - begun)

        identification.on_step = stage1_step
    result = identification.run(batches, progress)
    identified = {
        "stage1_steps": result.stage1.steps,
        "stage2_steps": result.stage2.steps,
        "micro_batches": result.stage1.micro_batches,
        "seconds": time.perf_counter() - start - sum(evaluating),  # its checkpoints' evaluations left out
        "selected": list(result.selection.selected),
    }
    if recipe.ranks == "importance":
        base = probe.unload()  # fresh adapters carry no update: the base model as it was
        return (*trained_like(recipe, base, config, seed, result.selection), identified)
    return probe, {"skip": result.stage1.micro_batches if inside else 0}, identified


def trained_like(
    recipe: Recipe, model: torch.nn.Module, config: ILAConfig, seed: int, selection: Selection | None = None
) -> tuple[torch.nn.Module, dict]:
    """(model, what `finetune` or `train_briefly` takes beside it) training what `recipe` trains after its layers
    are chosen (`selection`, for a recipe that chooses): LoRA on every candidate, sampled blocks of full weights,
    ILA's adapters on the selected layers, or LoRA on every candidate at the ranks `selection`'s scores give."""
    shape = dict(r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout)
    if recipe.method == "full":
        groups = block_groups(model, find_candidates(model, config))
        return model, {"sampler": LayerSampler(groups, LayerwiseConfig(recipe.active, recipe.interval, seed=seed))}
    if recipe.ranks == "importance":
        ranked = importance_lora_config(model, selection, rho=recipe.rho, task_type="CAUSAL_LM", **shape)
        return wrap(model, ranked), {}
    if recipe.selects:
        return wrap(model, replace(config, selected_layers=list(selection.selected), seed=seed)), {}
    targets = config.target_modules or "all-linear"  # ILA's candidates when None; LoRA's default would be fewer
    return wrap(model, LoraConfig(task_type="CAUSAL_LM", target_modules=targets, **shape)), {}


def side_by_side(rows: dict[str, Callable[[int], tuple[list[float], float]]], rounds: int) -> dict[str, dict]:
    """Time several trainings in one process: in each of `rounds` rounds every row runs in turn (`rows[name](round)`
    trains a few steps and gives its step seconds and memory rise, as `train_briefly` does). Per row: the mean step
    seconds over every round and the largest memory rise (MB), so that rows are compared on the same machine at the
    same time."""
    seconds: dict[str, list[float]] = {row: [] for row in rows}
    rises: dict[str, list[float]] = {row: [] for row in rows}
    for round_ in range(rounds):
        for row, timed in rows.items():
            took, rise = timed(round_)
            seconds[row] += took
            rises[row].append(rise)
    return {row: {"step_seconds": statistics.mean(seconds[row]), "memory_rise_mb": max(rises[row])} for row in rows}


def train_briefly(
    model: torch.nn.Module,
    batches,
    steps: int,
    lr: float,
    params: list[torch.nn.Parameter] | None = None,
    sampler: LayerSampler | None = None,
) -> tuple[list[float], float]:
    """`steps` AdamW steps on `params` (default: `model`'s trainable parameters, or a layerwise `sampler`'s groups,
    its active set drawn as `finetune` draws it): the seconds of each step but the first (which allocates the
    optimizer's state), and the peak memory's rise (MB) over the start: CUDA's peak allocation over what was
    allocated at the start on a GPU, else the resident memory's, as `finetune` measures it."""
    if params is None:
        params = sampler.parameters() if sampler else [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    on_step = None
    if sampler is not None:
        sampler.train_only_groups(model)
        on_step = sampler.hook(optimizer)
    start = reset_peak_memory()
    allocated = torch.cuda.memory_allocated() / 2**20 if torch.cuda.is_available() else None
    stats = train_steps(model, cycle(batches), optimizer, steps, on_step=on_step, progress=False)
    peak = peak_memory_mb(start)
    rise = peak["cuda_peak_mb"] - allocated if allocated is not None else peak.get("rss_rise_mb", 0.0)
    return stats.step_seconds[1:], rise
