"""Cells, and the study made of them.

A study too long for one sitting is a grid of cells: each is saved when it finishes and read back afterwards, so a
rerun computes only what is missing, and `--existing-only` computes nothing and lists what is.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from benchmarks.core.inputs import ROOT, add_inputs, parsed_inputs
from benchmarks.core.page import Finding
from peft_ila.app.cli import offline_and_quiet
from peft_ila.app.files import write_json
from peft_ila.app.report import machine
from peft_ila.tuner.atomic import written_atomically

T = TypeVar("T")


class Missing(Exception):
    """A cell that `--existing-only` does not compute (its file name), or a cell that waits for one."""


def key(settings: dict) -> str:
    """12 hex digits of the SHA-256 of the settings (JSON, sorted keys): a cell's name."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def cell(
    folder: Path,
    kind: str,
    settings: dict,
    compute: Callable[[Path], dict],
    existing_only: bool,
    defaults: dict | None = None,
) -> dict:
    """The record of a cell `folder/<kind>-<key>.json`: read if it exists, else `compute(path stem)` and saved
    (written whole or not at all); `Missing` when absent and `existing_only`. A setting at its value in `defaults`
    is left out of the key and the record, so that a setting added to a kind of cell later keeps the cells made
    before it (which ran at its default)."""
    settings = {k: v for k, v in settings.items() if k not in (defaults or {}) or v != defaults[k]}
    stem = folder / f"{kind}-{key(settings)}"
    if stem.with_suffix(".json").exists():
        return json.loads(stem.with_suffix(".json").read_text())
    if existing_only:
        raise Missing(stem.name)
    print(f"  computing {kind} {settings}", flush=True)
    record = {"kind": kind, "settings": settings, **compute(stem)}
    write_json(stem.with_suffix(".json"), record)
    return record


class Study(ABC):
    """A study: its cells in `<--cells>/<preset>/`, the ones it could not read listed in `missing`, a results
    dict, its findings and a Markdown page. A subclass names itself (`name`, `page_name`, `target`: the make target
    that runs it), gives its `presets`, and implements `options` (its own arguments), `run` (the results),
    `findings` and `page`."""

    name: str
    page_name: str
    target: str
    presets: dict[str, dict]

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.p = args, self.presets[args.preset]
        self.folder = args.cells / args.preset
        self.folder.mkdir(parents=True, exist_ok=True)
        self.missing: list[str] = []

    def cell(
        self,
        kind: str,
        settings: dict,
        compute: Callable[[Path], dict],
        defaults: dict | None = None,
        read_only: bool = False,
    ) -> dict:
        """The record of a cell of this study (see `cell`); `read_only`: this one is never computed, as with
        `--existing-only`."""
        return cell(self.folder, kind, settings, compute, self.args.existing_only or read_only, defaults)

    def collect(self, what: str, get: Callable[..., T], *args) -> T | None:
        """`get(*args)`, or None when a cell it needs is missing: then `what` (and the missing cell) joins
        `missing`."""
        try:
            return get(*args)
        except Missing as absent:
            self.missing.append(f"{what} ({absent})")
            return None

    @abstractmethod
    def run(self) -> dict:
        """The study's results from its cells (computing those missing unless `--existing-only`)."""

    @abstractmethod
    def findings(self, results: dict) -> list[Finding]:
        """What the results answer, each judged by its rule."""

    @abstractmethod
    def page(self, results: dict) -> str:
        """The page, from the results and their findings (`results["findings"]`, as JSON)."""

    @classmethod
    @abstractmethod
    def options(cls, parser: argparse.ArgumentParser) -> None:
        """The study's own command-line options."""

    @classmethod
    def parse(cls, argv: list[str]) -> argparse.Namespace:
        module = sys.modules[cls.__module__]
        parser = argparse.ArgumentParser(
            description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        add_inputs(parser, cls.presets)
        folder, page = ROOT / "benchmarks" / "results" / cls.name, ROOT / "benchmarks" / cls.page_name
        parser.add_argument("--cells", type=Path, default=folder, help="where cells are kept (one folder per preset)")
        parser.add_argument(
            "--markdown",
            type=Path,
            help=f"page to write (default: {page.name} for --preset full, else beside the cells)",
        )
        parser.add_argument(
            "--existing-only", action="store_true", help="compute no cell: write the page from the cells there are"
        )
        cls.options(parser)
        return parsed_inputs(parser, argv)

    def page_path(self) -> Path:
        """`--markdown`, else the committed page for the full preset and a page beside the cells for the others (a
        smoke run never overwrites the committed page)."""
        if self.args.markdown:
            return self.args.markdown
        return ROOT / "benchmarks" / self.page_name if self.args.preset == "full" else self.folder / self.page_name

    @classmethod
    def main(cls, argv: list[str] | None = None) -> dict:
        """Parse `argv`, run the study offline, and write `<cells>/<preset>/<name>.json` (results and findings) and
        the page."""
        args = cls.parse(sys.argv[1:] if argv is None else list(argv))
        offline_and_quiet()
        study = cls(args)
        results = {"machine": machine(), "preset": args.preset, **study.run(), "missing": study.missing}
        results["findings"] = [finding.to_json() for finding in study.findings(results)]
        write_json(study.folder / f"{cls.name}.json", results)
        with written_atomically(study.page_path()) as tmp:
            tmp.write_text(study.page(results))
        return results
