"""What the `peft-ila` commands share: options to config and accelerator, prepared data, identification into a run
directory (with its checkpoint), saving an adapter, and the printed summaries."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path


def accelerator_for(args):
    """Precision and accumulation; under torchrun/accelerate launch also the process group (gloo without a GPU)."""
    import torch
    from accelerate import Accelerator

    return Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision="bf16" if args.bf16 else "no",
        gradient_accumulation_steps=args.grad_accum,
    )


def ila_config(args, **overrides):
    """The ILAConfig of the command's options; an invalid value is a usage error (checked before any loading)."""
    from ..config import ILAConfig
    from . import UsageError

    fields = dict(
        task_type="CAUSAL_LM",
        r=args.r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=args.target_modules,
        top_k=args.top_k,
        granularity=args.granularity,
        stage1_max_steps=args.stage1_max_steps,
        stage1_lr=args.stage1_lr,
        stability_epsilon=args.epsilon,
        stability_window=args.window,
        stage2_steps=args.stage2_steps,
        gate_lr=args.gate_lr,
        sparsity_weight=args.sparsity_weight,
        seed=args.seed,
    )
    try:
        return ILAConfig(**{**fields, **overrides})
    except ValueError as exc:
        raise UsageError(str(exc)) from None


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
        )


def checkpoint_path(args, out: Path) -> Path | None:
    """Where identification checkpoints to (None: it does not); checked before any work, like the output path."""
    from ..distributed import rank
    from . import UsageError

    path = out.with_name(out.name + ".checkpoint.safetensors")
    if args.resume and not args.checkpoint_every:
        raise UsageError("--resume needs checkpoints; drop --checkpoint-every 0.")
    if args.resume and not path.is_file():
        raise UsageError(f"--resume: {path} does not exist, there is nothing to resume; run without --resume.")
    if path.is_file() and not args.resume:
        if not args.overwrite:
            raise UsageError(
                f"{path} holds the state of an interrupted identification; pass --resume to continue it, or "
                "--overwrite to start over."
            )
        if rank() == 0:
            path.unlink()
    return path if args.checkpoint_every else None


def identify_to_run(args, prepared, accelerator, out: Path, checkpoint: Path | None = None, shown: Path | None = None):
    """Stages 1 and 2 on the training split; the run directory appears whole at `out` or not at all. With a
    `checkpoint`, the run's state is saved there as it goes and removed once the run directory is written."""
    from ..distributed import rank
    from ..mask import ILALoadError
    from . import UsageError
    from .files import main_process_dir
    from .pipeline import identify
    from .report import write_run

    config = ila_config(args)
    try:
        with main_process_dir(out, args.overwrite) as tmp:
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
            candidates = model.base_model.candidate_layers()
            info = {**prepared.info, "batch_size": args.batch_size}
            record = write_run(tmp, result, config.run_settings(), candidates, info, command_line(args))
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


def command_line(args) -> str:
    """The command line that made an output, for its report."""
    return shlex.join(["peft-ila", *args.argv])


def print_top(record: dict, limit: int = 15) -> None:
    s1, s2 = record["costs"]["stage1"], record["costs"]["stage2"]
    print(f"\nTop {len(record['selected'])} of {len(record['candidates'])} layers (gate = learned importance):")
    print(f"{'rank':>4}  {'gate':>6}  layer")
    for i, name in enumerate(record["selected"][:limit], 1):
        print(f"{i:>4}  {record['scores'][name]:6.3f}  {name}")
    if len(record["selected"]) > limit:
        print(f"      ... {len(record['selected']) - limit} more in report.md")
    print(
        f"identification cost: stage 1 {s1['steps']} steps, {s1['tokens']} tokens, {s1['seconds']:.0f} s (ended: "
        f"{s1['stop']}); stage 2 {s2['steps']} steps, {s2['tokens']} tokens, {s2['seconds']:.0f} s\n"
    )


def save_adapter(args, model, out: Path, report, prepared, selection: str) -> dict:
    """Save the adapter and training.json (what `eval` needs to rebuild the base model and the split)."""
    from dataclasses import asdict

    from ..distributed import world_size
    from .files import main_process_dir, write_json

    settings = {k: getattr(args, k) for k in ("batch_size", "grad_accum", "bf16", "lr", "warmup")}
    record = {"command": command_line(args), **prepared.info, **settings, "processes": world_size()}
    record.update(selection=selection, **asdict(report))
    with main_process_dir(out, args.overwrite) as tmp:
        if tmp is not None:
            model.save_pretrained(tmp)
            write_json(tmp / "training.json", record)
    return record


def print_finetune(report) -> None:
    mem = ", ".join(f"{k} {v:.0f}" for k, v in report.memory.items())
    print(
        f"held-out loss {report.loss_before:.4f} -> {report.loss_after:.4f}; {report.steps} steps, median "
        f"{report.median_step_seconds:.2f} s/step; {mem}; trainable params {report.trainable_params:,} of "
        f"{report.total_params:,}"
    )
