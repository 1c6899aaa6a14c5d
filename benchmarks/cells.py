"""Benchmark cells: one JSON record per finished piece of a study, keyed by its settings, computed at most once.

A study too long for one sitting is a grid of cells: each is saved when it finishes and read back afterwards, so a
rerun computes only what is missing, and `--existing-only` computes nothing and lists what is.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from peft_ila.app.files import write_json


class Missing(Exception):
    """A cell that `--existing-only` does not compute."""


def key(settings: dict) -> str:
    """12 hex digits of the SHA-256 of the settings (JSON, sorted keys): a cell's name."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def cell(folder: Path, kind: str, settings: dict, compute: Callable[[Path], dict], existing_only: bool) -> dict:
    """The record of a cell `folder/<kind>-<key>.json`: read if it exists, else `compute(path stem)` and saved
    (written whole or not at all); `Missing` when absent and `existing_only`."""
    stem = folder / f"{kind}-{key(settings)}"
    if stem.with_suffix(".json").exists():
        return json.loads(stem.with_suffix(".json").read_text())
    if existing_only:
        raise Missing(stem.name)
    print(f"  computing {kind} {settings}", flush=True)
    record = {"kind": kind, "settings": settings, **compute(stem)}
    write_json(stem.with_suffix(".json"), record)
    return record


def add_cell_options(parser: argparse.ArgumentParser, folder: Path, page: Path) -> None:
    """The options of a study made of cells: where they are kept, the page to write (`page` for the full preset,
    beside the cells for the others, so a smoke run never overwrites the committed page), and --existing-only."""
    parser.add_argument("--cells", type=Path, default=folder, help="where cells are kept (one folder per preset)")
    parser.add_argument(
        "--markdown", type=Path, help=f"page to write (default: {page.name} for --preset full, else beside the cells)"
    )
    parser.set_defaults(full_page=page)
    parser.add_argument(
        "--existing-only", action="store_true", help="compute no cell: write the page from the cells there are"
    )


def write_study(args: argparse.Namespace, name: str, results: dict, page: str) -> None:
    """A study's results as `<cells>/<preset>/<name>.json` and its Markdown page (see `add_cell_options`)."""
    write_json(args.cells / args.preset / f"{name}.json", results)
    default = args.full_page if args.preset == "full" else args.cells / args.preset / args.full_page.name
    (args.markdown or default).write_text(page)
