"""`peft-ila versus`: every mode (a `Recipe`) fine-tuned on the user's model and data with several seeds, judged
against LoRA on all layers (`versus_page`).

The output directory fills as it goes: `plan.json` (the settings every run shares), `base.json` (the base model's
losses), one `runs/<mode>-seed<k>.json` per finished run, `timing.json` (every mode's steps side by side), then
`versus.json`, `VERSUS.md` and `versus.png`, rewritten after every run. Rerunning the same command continues where
a killed one stopped (finished runs are kept); other settings are refused, naming what differs."""

from __future__ import annotations

import json
import shutil
import statistics
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

from tqdm.auto import tqdm

from ..tuner.config import ILAConfig
from ..tuner.model import find_candidates
from ..tuner.selection import Selection
from . import UsageError
from .args import CONFIG_OPTIONS
from .data import batches, encode, fingerprint, read_dataset, split
from .executor import STATE_SUFFIX, Evaluation, Schedule, run_recipe, side_by_side, train_briefly, trained_like
from .files import MANIFEST, check_free, read_json, write_json, written_by_peft_ila
from .instructions import PROMPT_TOKENS, InstructionProbe
from .pipeline import Prepared, load_base, wrap
from .recipe import MODES
from .steps import accelerator_for, ila_config, loading_of, prepare_data
from .versus_page import write_results

KIND = "a versus directory"
ROUNDS = 2  # side by side: rounds of a few steps of every mode in turn


def run_versus(args) -> dict | None:
    """The command: check, prepare, plan (and stop there with --dry-run), run what is missing, judge, write."""
    config = ila_config(args)
    _check_modes(args)
    if not args.dry_run:
        _check_out(args.out, args.overwrite)
    conversations = _reference_sets(args)  # read before the model loads: where mistakes are cheap to find
    accelerator = accelerator_for(args)
    prepared = prepare_data(args, accelerator)
    schedule = _schedule(args, prepared)
    _check_budget(args, schedule)
    references = _references(args, prepared, conversations)
    settings = _settings(args, prepared, schedule, config, references)
    held_out = prepared.batches(args.batch_size, args.seed, held_out=True)
    evaluation = Evaluation(held_out, references, _checkpoint_steps(schedule.steps, args.evals), accelerator)
    if probe := _instructions(args, prepared):
        evaluation.closing["instructions"] = probe.score
        settings["instructions"] = probe.identity()
    if args.dry_run:
        print(_estimate(args, prepared, config, schedule, evaluation))
        return None
    _open(args, settings)
    evaluation.base = _cached(args.out / "base.json", lambda: _base(prepared.model, evaluation))
    prepared = replace(prepared, model=None)  # each run loads its own; two copies need not be held
    runs = _run_all(args, prepared, config, schedule, evaluation, settings)
    timing = _cached(args.out / "timing.json", lambda: _timing(args, prepared, accelerator, config, schedule, runs))
    return _written(args, settings, evaluation.base, runs, timing)


def _instructions(args, prepared: Prepared) -> InstructionProbe | None:
    """--instructions held-out prompts with an instruction each (drawn with --seed), or None."""
    if not args.instructions:
        return None
    sources = [prepared.held_out_conversations]
    shape = dict(max_new_tokens=args.instruction_tokens)
    probe = InstructionProbe.of(sources, prepared.tokenizer, prepared.plain, args.instructions, args.seed, **shape)
    if len(probe.texts) < args.instructions:
        fit = f"{len(probe.texts)} held-out prompts fit (at most {PROMPT_TOKENS} tokens each)"
        print(f"--instructions {args.instructions}: {fit}; scoring on those")
    return probe


def _base(model, evaluation: Evaluation) -> dict:
    """The base model's checkpoint (step 0), with its closing measures (the instruction score) when there are."""
    point = evaluation.point(model, 0)
    return {**point, "closing": evaluation.closed(model)} if evaluation.closing else point


def _check_modes(args) -> None:
    unknown = [m for m in args.modes if m not in MODES]
    if unknown:
        raise UsageError(f"--modes {','.join(unknown)}: unknown; choose from {', '.join(MODES)}.")
    if "lora-all" not in args.modes:
        raise UsageError("--modes must include lora-all, the reference every other mode is judged against.")
    full = [m for m in args.modes if MODES[m].method == "full"]
    if args.quantize and full:
        raise UsageError(
            f"--modes {','.join(full)} trains full weights, which a --load-in-{args.quantize} base stores quantized; "
            "leave it out of --modes (or load the base unquantized)."
        )


def _check_out(out: Path, overwrite: bool) -> None:
    """An existing --out is continued when it is a versus directory (its settings are checked later), else refused
    as for every command (`check_free`)."""
    if out.exists() and not overwrite and written_by_peft_ila(out) == KIND:
        return
    check_free(out, overwrite)


def _schedule(args, prepared: Prepared) -> Schedule:
    """The budget in optimizer steps: --steps, or --epochs over the training examples."""
    per_epoch = -(-len(prepared.train) // (args.batch_size * args.grad_accum))
    steps = args.steps or round(args.epochs * per_epoch)
    return Schedule(max(steps, 1), args.lr, args.full_lr, args.warmup, args.batch_size)


def _check_budget(args, schedule: Schedule) -> None:
    if "inside" in args.modes and args.stage1_max_steps >= schedule.steps:
        raise UsageError(
            f"--stage1-max-steps {args.stage1_max_steps} leaves nothing of the {schedule.steps} steps to mode inside, "
            "whose identification's stage 1 counts in them: lower it, or raise --steps/--epochs."
        )


def _checkpoint_steps(steps: int, evals: int) -> list[int]:
    """`evals` evenly spaced steps, the last `steps` (duplicates of a short run dropped)."""
    return sorted({max(1, round(i * steps / evals)) for i in range(1, evals + 1)})


def _reference_sets(args) -> dict[str, list]:
    """Each --reference file's conversations, named by the file's stem. A reference that is the --data or
    --eval-data file (by content) is refused: its loss rise would be the held-out loss again, not forgetting."""
    if not args.reference:
        return {}
    given = (("--eval-data", args.eval_data), ("--data", args.data))
    own = {fingerprint(spec)[1]: f"{flag} {spec}" for flag, spec in given if spec}  # SHA-256 -> option and spec
    out: dict[str, list] = {}
    for spec in args.reference:
        name = Path(spec).stem
        if name in out:
            raise UsageError(f"--reference {spec}: another reference file is named {name} too; rename one.")
        dataset = read_dataset(spec)
        if dataset.sha256 in own:
            raise UsageError(
                f"--reference {spec} has the same content as {own[dataset.sha256]}: its loss rise would be held-out "
                "loss, not forgetting; pass data the runs neither train on nor are judged on."
            )
        out[name] = dataset.conversations
    return out


def _references(args, prepared: Prepared, conversations: dict[str, list]) -> dict[str, object]:
    """Each reference set's batches: --reference-size of its examples (drawn with --seed), formatted as the data is
    and truncated to --max-length."""
    out = {}
    for (name, turns), spec in zip(conversations.items(), args.reference, strict=True):
        encoded = encode(turns, prepared.tokenizer, args.max_length, plain=prepared.plain)
        size = min(args.reference_size, len(encoded.examples) - 1)
        if size < 1:
            raise UsageError(f"--reference {spec}: fewer than 2 examples left after encoding; add examples.")
        held = split(encoded.examples, size, args.seed)[1]
        out[name] = batches(held, args.batch_size, prepared.tokenizer.pad_token_id, shuffle=False)
    return out


def _settings(args, prepared: Prepared, schedule: Schedule, config: ILAConfig, references: dict) -> dict:
    """What every run shares, and what a continued run must match."""
    info = prepared.info
    data = ("model", "data", "data_sha256", "eval_data_sha256", "columns", "format", "max_length", "overlong")
    identification = {field: getattr(config, field) for field, _, _ in CONFIG_OPTIONS["identification"]}
    settings = {
        **{key: info[key] for key in data},
        "weights": info["base_model"].get("values_sha256"),
        "held_out_ids": info["held_out_ids"],
        "loading": {**info["loading"], "quantization": info["quantization"], "bf16": args.bf16},
        "grad_accum": args.grad_accum,
        "schedule": asdict(schedule),
        "adapter": {"r": config.r, "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout},
        "target_modules": sorted(modules) if isinstance(modules := config.target_modules, set) else modules,
        "identification": identification,
        "references": {name: fingerprint(spec)[1] for name, spec in zip(references, args.reference, strict=True)},
        "reference_size": args.reference_size,
        "evals": args.evals,
        "timing_steps": args.timing_steps,
    }
    return json.loads(json.dumps(settings))  # as plan.json will hold them (lists, not tuples)


def _open(args, settings: dict) -> None:
    """Start --out (its manifest, then its plan), or continue it when its plan has these settings; refuse other
    settings, naming them. --overwrite starts over (only a directory peft-ila wrote)."""
    out, plan = args.out, args.out / "plan.json"
    if plan.is_file() and not args.overwrite:
        before = read_json(plan)
        changed = [key for key in sorted({*before, *settings}) if before.get(key) != settings.get(key)]
        if changed:
            shown = "; ".join(f"{k}: {_short(before.get(k))} then, {_short(settings.get(k))} now" for k in changed)
            raise UsageError(
                f"{out} holds runs with other settings ({shown}); use another --out, or --overwrite to start over."
            )
        done, cut = (len(list((out / "runs").glob(pattern))) for pattern in ("*.json", f"*{STATE_SUFFIX}"))
        went_on = f"; {cut} run(s) cut short go on from where they were saved" if cut else ""
        print(f"continuing {out}: {done} run(s) already finished are kept{went_on}")
        _note_written(args)  # more modes or seeds than before: their runs' names
        return
    if out.exists():
        shutil.rmtree(out)  # only a peft-ila output gets here (`_check_out`)
    (out / "runs").mkdir(parents=True)
    _note_written(args)
    write_json(plan, settings)


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _note_written(args) -> None:
    """The manifest of --out: what is there and every file this command will write, named before it is written, so
    that a run killed at any moment leaves a directory that a rerun continues and --overwrite replaces (only that)."""
    out = args.out
    stems = [f"runs/{mode}-seed{seed}" for mode in args.modes for seed in range(args.seeds)]
    runs = [f"{stem}{suffix}" for stem in stems for suffix in (".json", STATE_SUFFIX)]  # a run, its state
    planned = {"plan.json", "base.json", "timing.json", "versus.json", "VERSUS.md", "versus.png", "runs", *runs}
    there = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.name != MANIFEST}
    write_json(out / MANIFEST, {"written_by": "peft-ila", "kind": KIND, "entries": sorted(there | planned)})


def _cached(path: Path, compute) -> dict:
    """The JSON in `path`, or `compute()` written there."""
    if path.is_file():
        return json.loads(path.read_text())
    value = compute()
    write_json(path, value)
    return value


def _fresh(args, prepared: Prepared, accelerator) -> Prepared:
    """`prepared` with the base model loaded anew onto the accelerator's device (a run changes the model it
    trains)."""
    model = load_base(args.model, args.quantize, accelerator, loading_of(args))[0]
    return replace(prepared, model=model)


def _run_all(args, prepared, config, schedule, evaluation, settings) -> dict[tuple[str, int], dict]:
    """Every (mode, seed) run: read when finished, else fine-tuned and saved at once; a bar over the runs' steps."""
    folder, runs = args.out / "runs", {}
    cells = [(mode, seed) for mode in args.modes for seed in range(args.seeds)]
    pending = [cell for cell in cells if not (folder / f"{cell[0]}-seed{cell[1]}.json").is_file()]
    bar = tqdm(total=len(pending) * schedule.steps, desc="versus", unit="step", disable=args.no_progress)
    for mode, seed in cells:
        path = folder / f"{mode}-seed{seed}.json"
        if path.is_file():
            runs[mode, seed] = json.loads(path.read_text())
            continue
        bar.set_postfix_str(f"{mode}, seed {seed}")
        done = bar.n

        def advance(step: int, done: int = done) -> None:
            bar.update(done + step - bar.n)

        fresh = _fresh(args, prepared, evaluation.accelerator)
        state = (folder / f"{mode}-seed{seed}{STATE_SUFFIX}") if args.checkpoint_every else None
        shape = (evaluation, False, advance, None, state, args.checkpoint_every)
        record = run_recipe(MODES[mode], fresh, config, schedule, seed, *shape)
        runs[mode, seed] = {"mode": mode, "seed": seed, "recipe": asdict(MODES[mode]), **record}
        write_json(path, runs[mode, seed])
        bar.update(done + schedule.steps - bar.n)
        _written(args, settings, evaluation.base, runs, None)
    bar.close()
    return runs


def _timing(args, prepared: Prepared, accelerator, config: ILAConfig, schedule: Schedule, runs: dict) -> dict:
    """Every mode's training (after its identification, on seed 0's selection), and identification's two stages
    when a mode identifies, `--timing-steps` steps each, side by side (`ROUNDS` rounds in one process)."""
    rows = [*args.modes, *(("probe-stage1", "probe-stage2") if any(MODES[m].identifies for m in args.modes) else ())]
    timed = {row: partial(_timed, args, row, prepared, accelerator, config, schedule, runs) for row in rows}
    return side_by_side(timed, ROUNDS)


def _timed(args, row: str, prepared: Prepared, accelerator, config, schedule: Schedule, runs: dict, round_: int):
    """`--timing-steps` steps of one timing row: (step seconds but the first, memory rise)."""
    prepared = _fresh(args, prepared, accelerator)
    batches, steps = prepared.batches(schedule.batch_size, round_), args.timing_steps
    if row.startswith("probe-"):
        probe = wrap(prepared.model, replace(config, seed=round_))
        if row == "probe-stage1":
            return train_briefly(probe, batches, steps, config.stage1_lr)
        with probe.base_model.gate_stage() as bank:  # the gate logits train (a buffer, not a parameter)
            return train_briefly(probe, batches, steps, config.gate_lr, [bank.logits])
    recipe = replace(MODES[row], interval=1)  # a sampled mode draws anew at every step
    selected = runs[row, 0]["identification"].get("selected")
    chosen = Selection(find_candidates(prepared.model, config), selected) if selected else None
    model, how = trained_like(recipe, prepared.model, config, round_, chosen)
    return train_briefly(model, batches, steps, schedule.full_lr if recipe.method == "full" else schedule.lr, **how)


def _estimate(args, prepared: Prepared, config: ILAConfig, schedule: Schedule, evaluation: Evaluation) -> str:
    """The plan and its cost: a few LoRA-all steps, one evaluation and (with --instructions) one instruction scoring
    timed here, scaled to every run's steps (identification's stage budgets included), evaluations and scorings."""
    evaluation.point(prepared.model, 0)
    per_point = evaluation.seconds
    evaluation.closed(prepared.model)
    per_score = evaluation.seconds - per_point
    lora = trained_like(MODES["lora-all"], prepared.model, config, 0)[0]
    step = statistics.mean(train_briefly(lora, prepared.batches(schedule.batch_size, 0), 3, schedule.lr)[0])
    identify = config.stage1_max_steps + config.stage2_steps
    runs = [(mode, seed) for mode in args.modes for seed in range(args.seeds)]
    steps = sum(schedule.steps + (identify if MODES[m].layers == "identify" else 0) for m, _ in runs)
    points = len(runs) * (len(evaluation.at) + 1)
    scorings = 2 * len(runs) + 1 if evaluation.closing else 0  # at the end and the best of each run, and the base
    seconds = steps * step + points * per_point + scorings * per_score
    modes = ", ".join(f"{m} ({MODES[m].label})" for m in args.modes)
    scored = f" and {scorings} instruction scorings at {per_score:.0f} s" if scorings else ""
    return (
        f"plan: {len(runs)} runs ({modes}; seeds 0-{args.seeds - 1}) of {schedule.steps} steps each, held-out loss"
        f"{' and ' + str(len(evaluation.references)) + ' reference set(s)' if evaluation.references else ''} at "
        f"steps {', '.join(map(str, evaluation.at))}\n"
        f"estimate: {steps:,} training steps at {step:.2f} s (a LoRA-all step timed here), {points} evaluations at "
        f"{per_point:.1f} s{scored}: about {_hours(seconds)}, plus {len(args.modes) * ROUNDS * args.timing_steps} "
        "timing steps; nothing was written"
    )


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def _written(args, settings: dict, base: dict, runs: dict, timing: dict | None) -> dict:
    """versus.json, VERSUS.md and versus.png from what there is (`timing` None: the cost columns wait for it)."""
    return write_results(args.out, settings, base, list(runs.values()), timing, args.modes, args.seeds, args.argv)
