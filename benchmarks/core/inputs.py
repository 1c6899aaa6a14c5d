"""A benchmark's inputs: preset, model and datasets from the command line, each dataset prepared once over one base
model, and the identity of the data a cell depends on."""

from __future__ import annotations

import argparse
import random
from dataclasses import replace
from pathlib import Path

import torch

from peft_ila.app.data import fingerprint
from peft_ila.app.pipeline import Prepared, prepare

ROOT = Path(__file__).resolve().parents[2]
DATASETS = {  # name -> (training data, separate held-out file or None); {shared} is ../shared beside the checkout
    "alpaca": ("alpaca_en_demo", None),
    "lima": ("{shared}/data/lima_1k.json", None),
    "dolly": ("{shared}/data/dolly_train_4k.json", "{shared}/data/dolly_test_200.json"),
}


def add_inputs(parser: argparse.ArgumentParser, presets: dict) -> None:
    """The options every benchmark script takes: preset, model, datasets, their files, progress bars."""
    parser.add_argument("--preset", choices=sorted(presets), default="quick")
    parser.add_argument("--model", default="smollm2", help="as for peft-ila (default: %(default)s)")
    parser.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated, the first is the primary")
    data_help = "use FILE for dataset NAME, split like alpaca (the smoke tests use tiny files)"
    parser.add_argument("--data", action="append", default=[], metavar="NAME=FILE", help=data_help)
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared", help="the shared data folder")
    parser.add_argument("--progress", action="store_true", help="show progress bars")


def parsed_inputs(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse, with --datasets as a list and --data as a dict."""
    args = parser.parse_args(argv)
    args.datasets = [d for d in args.datasets.split(",") if d]
    args.data = dict(item.split("=", 1) for item in args.data)
    return args


def dataset_files(args: argparse.Namespace, name: str) -> tuple[str, str | None]:
    """Dataset `name`'s training data spec and its held-out file (None: split off the training data), `{shared}`
    filled in; a `--data NAME=FILE` replaces both."""
    data, eval_data = DATASETS[name] if name not in args.data else (args.data[name], None)
    return tuple(s.format(shared=args.shared) if s else s for s in (data, eval_data))


def absent(args: argparse.Namespace, name: str) -> str | None:
    """Why dataset `name` cannot be read here (its file under ../shared is missing), or None when it can."""
    data = dataset_files(args, name)[0]
    if name in args.data or "{shared}" not in DATASETS[name][0] or Path(data).exists():
        return None
    return f"skipping {name}: {data} is absent (../shared holds it beside a developer checkout)"


class Inputs:
    """The datasets of one invocation that can be read here, each prepared once (tokenized, split, at most
    `train_limit[name]` training examples drawn with seed 0) over one base model, in evaluation mode.

    `shape`: the settings of examples and batches (`max_length`, `batch_size`, `eval_size`); `identity_keys`: those
    of them a cell's key names (studies keyed their cells before they shared this class)."""

    def __init__(
        self,
        args: argparse.Namespace,
        shape: dict,
        identity_keys: tuple[str, ...] = ("max_length", "batch_size", "eval_size"),
        train_limit: dict[str, int] | None = None,
    ) -> None:
        self.args, self.shape, self.identity_keys = args, shape, identity_keys
        self.train_limit = train_limit or {}
        self.names = []
        for name in args.datasets:
            if why := absent(args, name):
                print(why)
            else:
                self.names.append(name)
        self._prepared: dict[str, Prepared] = {}
        self._identities: dict[str, dict] = {}
        self.base: torch.nn.Module | None = None

    @property
    def primary(self) -> str:
        return self.names[0]

    def __getitem__(self, name: str) -> Prepared:
        """Dataset `name`, prepared on first use."""
        if name not in self._prepared:
            prepared = self.load(name)
            self.base = self.base or prepared.model.eval()
            self._prepared[name] = replace(prepared, model=self.base)
        return self._prepared[name]

    def load(self, name: str, quantize: str | None = None) -> Prepared:
        """Dataset `name` prepared anew with a model of its own (loaded as `quantize` says), for a study that
        changes the model it trains."""
        data, eval_data = dataset_files(self.args, name)
        shape = {key: self.shape[key] for key in ("max_length", "eval_size")}
        prepared = prepare(
            self.args.model, data, **shape, overlong="truncate", seed=0, eval_data=eval_data, quantize=quantize
        )
        limit = self.train_limit.get(name)
        if limit is not None and len(prepared.train) > limit:
            keep = sorted(random.Random(0).sample(range(len(prepared.train)), limit))
            prepared = replace(prepared, train=[prepared.train[i] for i in keep])
        return prepared

    def batches(self, name: str, seed: int, held_out: bool = False):
        """Dataset `name`'s batches of the preset's size (training: shuffled with `seed`)."""
        return self[name].batches(self.shape["batch_size"], seed, held_out=held_out)

    def identity(self, name: str) -> dict:
        """What a cell depends on besides its own settings: the dataset, its data's SHA-256 (hashed once), the model,
        and the shape of the examples and batches."""
        if name not in self._identities:
            sha256 = fingerprint(dataset_files(self.args, name)[0])[1]
            shape = {k: self.shape[k] for k in self.identity_keys}
            self._identities[name] = {"dataset": name, "data_sha256": sha256, "model": self.args.model, **shape}
        return self._identities[name]
