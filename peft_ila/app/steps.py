"""What the `peft-ila` commands share: options to config and accelerator, prepared data, identification into a run
directory (with its checkpoint), saving an adapter, and the printed summaries."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path


def accelerator_for(args):
    """Device, precision and accumulation; under torchrun/accelerate launch also the process group (gloo without a
    GPU)."""
    import torch
    from accelerate import Accelerator

    from . import UsageError

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: torch sees no CUDA GPU here; drop the option (or --device cpu).")
    return Accelerator(
        cpu=args.device == "cpu" or not torch.cuda.is_available(),
        mixed_precision="bf16" if args.bf16 else "no",
        gradient_accumulation_steps=args.grad_accum,
    )


def ila_config(args, **overrides):
    """The ILAConfig of the command's options; an invalid value is a usage error naming the option (checked before
    any loading)."""
    from ..tuner.config import ILAConfig
    from .args import CONFIG_OPTIONS, usage_error

    fields = {field: getattr(args, field) for options in CONFIG_OPTIONS.values() for field, _, _ in options}
    fields.update(task_type="CAUSAL_LM", target_modules=args.target_modules, seed=args.seed)
    if args.top_k is not None:  # else ILAConfig's default
        fields["top_k"] = args.top_k
    try:
        return ILAConfig(**{**fields, **overrides})
    except ValueError as exc:
        raise usage_error(exc) from None


def candidates_of(model, config) -> list[str]:
    """The candidate layers `config` gives on `model` (nothing is wrapped); a mismatch is a usage error."""
    from ..tuner.model import find_candidates
    from .args import usage_error

    try:
        return find_candidates(model, config)
    except ValueError as exc:
        raise usage_error(exc) from None


def prepare_data(args, accelerator):
    """The model and the tokenized, split data of the command's options (see `pipeline.prepare`)."""
    from transformers import set_seed

    from .pipeline import prepare

    set_seed(args.seed)  # adapter initialisation outside identification, dropout
    with accelerator.main_process_first():  # rank 0 fills the data and model caches, the others then read them
        return prepare(
            args.model,
            args.data,
            args.max_length,
            args.overlong,
            args.eval_size,
            args.seed,
            args.plain_format,
            accelerator,
            args.eval_data,
            args.columns,
            args.quantize,
            loading_of(args),
        )


def loading_of(args, recorded: dict | None = None):
    """How the command loads the base model: its --dtype (for `eval`, by default the dtype the fine-tune `recorded`)
    and --gradient-checkpointing."""
    from .models import Loading

    dtype = args.dtype or (recorded or {}).get("asked_dtype", "float32")  # before --dtype, every load was float32
    return Loading(dtype, args.gradient_checkpointing)


def checkpoint_file(out: Path) -> Path:
    """Where the job writing `out` keeps its checkpoint: OUT.checkpoint.safetensors beside it."""
    return out.with_name(out.name + ".checkpoint.safetensors")


def checkpoint_path(args, out: Path) -> Path | None:
    """Where identification checkpoints to (None: it does not); checked before any work, like the output path."""
    from . import UsageError

    path = checkpoint_file(out)
    if args.resume and not args.checkpoint_every:
        raise UsageError("--resume needs checkpoints; drop --checkpoint-every 0.")
    if args.resume and not path.is_file():
        raise UsageError(f"--resume: {path} does not exist, there is nothing to resume; run without --resume.")
    _clear_stale(args, path, "identification")
    return path if args.checkpoint_every else None


def finetune_checkpoint(args, identifying: bool):
    """The fine-tune's `FinetuneCheckpoint` at OUT.checkpoint.safetensors, resumed with --resume when that file is
    there (else --resume is the inline identification's, when `identifying`); None with --checkpoint-every 0 and for
    AdaLoRA, whose rank allocation it cannot hold. Checked before any work, like the output path."""
    from . import UsageError
    from .checkpoints import FinetuneCheckpoint
    from .report import inline_run

    path = checkpoint_file(args.out)
    inline = checkpoint_file(inline_run(args.out))
    if args.resume and not args.checkpoint_every:
        raise UsageError("--resume needs checkpoints; drop --checkpoint-every 0.")
    if args.resume and not path.is_file() and not (identifying and inline.is_file()):
        also = f" nor {inline}" if identifying else ""
        raise UsageError(f"--resume: neither {path}{also} exists, there is nothing to resume; run without --resume.")
    _clear_stale(args, path, "fine-tune")
    if not args.checkpoint_every:
        return None
    if args.method == "adalora":
        print("note: --method adalora fine-tunes without checkpoints (its rank allocation is not saved in one)")
        return None
    return FinetuneCheckpoint(path, args.checkpoint_every, resume=args.resume and path.is_file())


def _clear_stale(args, path: Path, what: str) -> None:
    """Refuse to start over while `path` holds an interrupted `what`'s state, unless --overwrite (then it is
    removed, if peft-ila wrote it); with --resume it is kept."""
    from ..identification.checkpoint import checkpoint_record
    from ..identification.distributed import rank
    from . import UsageError

    if args.resume or not path.is_file():
        return
    if not args.overwrite:
        raise UsageError(
            f"{path} holds the state of an interrupted {what}; pass --resume to continue it, or --overwrite to start "
            "over."
        )
    if checkpoint_record(path) is None:
        raise UsageError(f"{path} is not a checkpoint peft-ila wrote; move it away or choose another --out.")
    if rank() == 0:
        path.unlink()


def identify_to_run(args, prepared, accelerator, out: Path, checkpoint: Path | None = None, shown: Path | None = None):
    """Stages 1 and 2 on the training split; the run directory appears whole at `out` or not at all. With a
    `checkpoint`, the run's state is saved there as it goes and removed once the run directory is written."""
    from ..identification.distributed import rank
    from ..tuner.selection import ILALoadError
    from . import UsageError
    from .files import main_process_dir
    from .pipeline import identify
    from .report import write_run

    config = ila_config(args)
    try:
        with main_process_dir(out, args.overwrite, "an identify run") as tmp:
            model, result = identify(
                prepared,
                config,
                args.batch_size,
                args.seed,
                accelerator,
                not args.no_progress,
                checkpoint,
                args.checkpoint_every,
                args.resume,
            )
            info = {**prepared.info, "batch_size": args.batch_size}
            record = write_run(tmp, result, config.run_settings(), info, command_line(args))
    except ILALoadError as exc:  # the checkpoint to resume does not fit this command
        raise UsageError(str(exc)) from None
    except BaseException:
        if checkpoint is not None and checkpoint.is_file() and rank() == 0:
            print(
                f"peft-ila: identification's progress is saved in {checkpoint}; run the same command with --resume "
                "to continue it.",
                file=sys.stderr,
            )
        raise
    if checkpoint is not None and rank() == 0:
        checkpoint.unlink(missing_ok=True)
    print(f"run directory {shown or out}: importance.json, mask.safetensors, heatmap.png, report.md")
    return model, result, record


def mask_config(args, run: dict, saved, mask: Path, prepared):
    """The ILAConfig that applies a run directory's mask (its record `run` and `Selection` `saved`) to the prepared
    model, that `Selection` of this model's candidates, and what the adapter records of it.

    The mask's selection, or with `--top-k` the best k of its ranking. A mask whose candidate layers or
    architecture differ from this model's is refused unless `--allow-other-model` (then its layers that exist here
    are used, the others dropped and counted); other weights of the same architecture get a note."""
    from ..tuner.config import resolve_top_k
    from . import UsageError
    from .args import usage_error

    shape = {"target_modules": run["config"]["target_modules"], "granularity": run["config"]["granularity"]}
    here = candidates_of(prepared.model, ila_config(args, **shape))
    common = [name for name in saved.ranking if name in set(here)]
    _check_mask_model(args, run, saved, mask, here, common, prepared.info["base_model"])
    try:
        k = None if args.top_k is None else resolve_top_k(args.top_k, len(common))
    except ValueError as exc:
        raise usage_error(exc) from None
    try:
        selection = saved.within(here, k)
    except ValueError:
        raise UsageError(
            f"none of the {len(saved.selected)} layers selected by --mask {mask} is a candidate of this model; pass "
            "--top-k K to take the best K of its ranking that are."
        ) from None
    if args.top_k is None:
        top_k, how = run["config"]["top_k"], f"the {len(selection.selected)} layers selected by mask {mask}"
        if len(selection.selected) < len(saved.selected):
            dropped = len(saved.selected) - len(selection.selected)
            print(
                f"note: dropped {dropped} of its {len(saved.selected)} selected layers (not candidates here); "
                f"{len(selection.selected)} left"
            )
    else:
        top_k, how = (
            args.top_k,
            f"the best {len(selection.selected)} of the ranking of mask {mask} (--top-k {args.top_k})",
        )
    config = ila_config(args, **selection.config_fields(), top_k=top_k, **shape)
    info = {"selection": how, "mask": str(mask.resolve()), "top_k": top_k, "layers": len(selection.selected)}
    return config, selection, info


def _check_mask_model(args, run: dict, saved, mask: Path, here: list[str], common: list[str], model: dict) -> None:
    """Refuse a mask found on another model (other candidates or architecture) unless --allow-other-model."""
    from ..tuner.selection import same_weights
    from . import UsageError
    from .report import run_model

    found = run_model(run)
    where = f"--mask {mask} was found on {found['model']} ({len(saved.candidates)} candidate layers)"
    if list(saved.candidates) != here:
        problem = f"{model['model']} has {len(here)}, {len(common)} of them in common"
    elif found.get("architecture_sha256", model["architecture_sha256"]) != model["architecture_sha256"]:
        problem = f"{model['model']} has the same layer names but another architecture (other shapes)"
    else:
        stored = {"found": run.get("quantization") or "unquantized", "here": args.quantize or "unquantized"}
        if stored["found"] != stored["here"]:
            print(f"note: {where} ({stored['found']}); fine-tuning it {stored['here']}")
        elif same_weights(found, model) is False:
            print(f"note: {where}; fine-tuning {model['model']}: same architecture, other weights")
        return
    if not args.allow_other_model:
        raise UsageError(
            f"{where}; {problem}. A mask belongs to the model it was found on: identify on this one, or pass "
            "--allow-other-model to apply the mask's layers that exist here."
        )
    print(f"note: --allow-other-model: {where}; {problem}")


def command_line(args) -> str:
    """The command line that made an output, for its report."""
    return shlex.join(["peft-ila", *args.argv])


def print_top(record: dict, limit: int = 15) -> None:
    from .report import confidence_line

    s1, s2 = record["costs"]["stage1"], record["costs"]["stage2"]
    estimator = record["config"].get("estimator", "gates")
    print(f"\nTop {len(record['selected'])} of {len(record['candidates'])} layers (score: {estimator}):")
    confidence = record.get("confidence") or {}
    print(f"{'rank':>4}  {'score':>6}  {'sure':>4}  layer")
    for i, name in enumerate(record["selected"][:limit], 1):
        sure = f"{confidence[name]:4.0%}" if name in confidence else f"{'–':>4}"
        print(f"{i:>4}  {record['scores'][name]:6.3f}  {sure}  {name}")
    if len(record["selected"]) > limit:
        print(f"      ... {len(record['selected']) - limit} more in report.md")
    print(confidence_line(record))
    budget = (record.get("provenance") or {}).get("budget")
    if budget:
        print(
            f"within --budget {budget['budget']}: layers from {budget['lowest_block']} up, predicted to cost "
            f"{budget['predicted_fraction']:.2f}x of adapting every layer"
        )
    print(
        f"identification cost: stage 1 {s1['steps']} steps, {s1['tokens']} tokens, {s1['seconds']:.0f} s (ended: "
        f"{s1['stop']}); stage 2 {s2['steps']} steps, {s2['tokens']} tokens, {s2['seconds']:.0f} s\n"
    )


def save_adapter(args, model, out: Path, report, prepared, selection: dict, full=None) -> dict:
    """Save the adapter and training.json: what `eval` needs to rebuild the base model and the split (see
    `pipeline.prepare`), how the layers were chosen (`selection`: at least its description and the number of
    `layers`), and the fine-tune's report. With `full` (the `Selection` of a full fine-tune), the whole model
    instead, with its tokenizer and mask: a model directory of its own (`tuner.full.save_with_selection`); with
    `selection["changed_only"]` too, only the tensors it changed, with the mask."""
    from dataclasses import asdict

    from ..identification.distributed import world_size
    from ..tuner.full import save_with_selection
    from .files import main_process_dir, write_json

    settings = {k: getattr(args, k) for k in ("batch_size", "grad_accum", "bf16", "lr", "warmup")}
    record = {"command": command_line(args), **prepared.info, **settings, "processes": world_size()}
    record.update({"top_k": None, **selection, **asdict(report)})
    kind = "an adapter written by train" if full is None else "a model written by train --method full"
    with main_process_dir(out, args.overwrite, kind) as tmp:
        if tmp is not None:
            if full is None:
                model.save_pretrained(tmp)
            elif record.get("changed_only"):
                save_with_selection(model, full, tmp, changed_only=True)
            else:
                save_with_selection(model, full, tmp)
                prepared.tokenizer.save_pretrained(tmp)
            write_json(tmp / "training.json", record)
    return record


def print_finetune(report) -> None:
    mem = ", ".join(f"{k} {v:.0f}" for k, v in report.memory.items())
    print(
        f"held-out loss {report.loss_before:.4f} -> {report.loss_after:.4f}; {report.steps} steps, median "
        f"{report.median_step_seconds:.2f} s/step; {mem}; trainable params {report.trainable_params:,} of "
        f"{report.total_params:,}"
    )
