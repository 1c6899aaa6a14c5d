"""README.md's measured figures, generated from the files that record them (`make figures`).

Each region of README.md between a line `<!-- figures: NAME -->` and a line `<!-- /figures -->` holds what the
generator `REGIONS[NAME]` writes from the repository's result files; everything else in README.md is left as it is.

    python -m benchmarks.figures           # rewrite README.md's regions in place
    python -m benchmarks.figures --check   # change nothing; exit 1 naming the regions that are stale
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchmarks.core.inputs import ROOT
from benchmarks.core.page import Finding, cell_text, table
from peft_ila.tuner.atomic import written_atomically
from peft_ila.tuner.selection import CERTAIN

OPEN = re.compile(r"<!-- figures: (\S+) -->")
CLOSE = "<!-- /figures -->"
WIDTH = 120  # prose in a region is wrapped like the rest of README.md


@dataclass(frozen=True)
class Region:
    """A region of a text split into lines: lines[start:end] is its body, lines[start - 1] and lines[end] its
    markers."""

    name: str
    start: int
    end: int


def regions(text: str) -> list[Region]:
    """The text's regions in order; ValueError, naming the line and the fix, for an unknown or unclosed one."""
    found, opened = [], None
    for number, line in enumerate(text.split("\n"), 1):
        marker = OPEN.fullmatch(line.strip())
        if marker and opened:
            raise ValueError(
                f"figures region '{opened[0]}' (line {opened[1]}) is not closed before line {number} opens "
                f"'{marker[1]}': add a line '{CLOSE}' after its body"
            )
        if marker:
            if marker[1] not in REGIONS:
                raise ValueError(
                    f"line {number}: unknown figures region '{marker[1]}' (known: {', '.join(REGIONS)}): fix the name "
                    "or add its generator to REGIONS in benchmarks/figures.py"
                )
            opened = (marker[1], number)
        elif line.strip() == CLOSE:
            if not opened:
                raise ValueError(f"line {number}: '{CLOSE}' closes no region: remove it or open one before it")
            found.append(Region(opened[0], opened[1], number - 1))
            opened = None
    if opened:
        raise ValueError(
            f"figures region '{opened[0]}' opened at line {opened[1]} is never closed: add a line '{CLOSE}' after its "
            "body"
        )
    return found


def body(name: str, root: Path) -> list[str]:
    """The lines a region's body should be: its generator's Markdown between two blank lines."""
    return ["", *REGIONS[name](root).strip("\n").split("\n"), ""]


def render(text: str, root: Path) -> str:
    """`text` with the body of every region replaced by what its generator writes from the files under `root`."""
    lines, out, done = text.split("\n"), [], 0
    for region in regions(text):
        out += [*lines[done : region.start], *body(region.name, root)]
        done = region.end
    return "\n".join(out + lines[done:])


def stale(text: str, root: Path) -> list[str]:
    """The names of the regions whose body differs from what their generator writes now."""
    lines = text.split("\n")
    return [r.name for r in regions(text) if lines[r.start : r.end] != body(r.name, root)]


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _wrap(text: str) -> str:
    return textwrap.fill(text, WIDTH, break_long_words=False, break_on_hyphens=False)


def _machine(record: dict) -> str:
    """Where a recorded run ran, as "a 2-core machine without GPU" (`record`: `peft_ila.app.report.machine`)."""
    where = "without GPU" if record.get("gpu") is None else f"with {record['gpu']}"
    return f"a {record['cpu_count']}-core machine {where}"


def demo(root: Path) -> str:
    """The recorded demo run (`docs/demo/`: demo.json, importance.json, training.json): time, costs, losses."""
    folder = root / "docs" / "demo"
    run, record, training = (_json(folder / name) for name in ("demo.json", "importance.json", "training.json"))
    selected, stage1, stage2 = record["selected"], record["costs"]["stage1"], record["costs"]["stage2"]
    sure = ""
    if record.get("confidence"):  # as the CLI prints it (`peft_ila.app.report.confidence_line`)
        certain = sum(record["confidence"][name] >= CERTAIN for name in selected)
        share = len(selected) / len(record["candidates"])
        sure = f" (`top-{share:.0%} set: {certain} of {len(selected)} layers certain at {CERTAIN:.0%}`)"
    identification = f"{stage1['steps']} + {stage2['steps']} steps in {stage1['seconds'] + stage2['seconds']:.0f} s"
    if run.get("loss_after_identification") is not None:  # identification began the fine-tune (weights kept)
        identification += f" (held-out loss {run['loss_after_identification']:.4f} after it)"
    before, after, reload = (run[f"held_out_loss_{key}"] for key in ("before", "after", "after_reload"))
    layers = f"the top {len(selected)} of {len(record['candidates'])} layers"
    return _wrap(
        f"On {_machine(run['machine'])} the recorded run (`docs/demo/`, written by "
        f"`make demo-docs`) took **{run['seconds']:.0f} s** for the demo itself: identification {identification}"
        f"{sure}, fine-tuning {training['steps']} steps on {layers} at a median "
        f"{training['median_step_seconds']:.2f} s/step, held-out loss **{before:.4f} -> {after:.4f}** ({reload:.4f} "
        "after the reload)."
    )


def _short(evidence: str, limit: int = 110) -> str:
    """The evidence up to its first ';', cut after a whole item when it runs past `limit` characters."""
    clause = evidence.split(";")[0].strip().rstrip(".")
    if len(clause) <= limit:
        return clause
    cut = clause.rfind(", ", 0, limit)
    return clause[:cut] + ", …" if cut > 0 else clause[:limit] + "…"


def findings(root: Path, study: str) -> list[Finding]:
    """The findings `study`'s full run stored with its results (`benchmarks/results/<study>/full/<study>.json`)."""
    path = root / "benchmarks" / "results" / study / "full" / f"{study}.json"
    return [Finding(**finding) for finding in _json(path)["findings"]]


HEADLINE = {  # the findings the README's headline answers, by study and id, in order
    "grid": [
        "grid-overlap",
        "grid-freeze-quarter",
        "grid-top25",
        "grid-quarter-stage1",
        "grid-equal-time",
        "grid-forgetting",
        "grid-budget",
        "grid-cheap-selectors",
    ],
    "stability": ["stability-defaults", "stability-found-early"],
    "methods": ["methods-ila-top-25"],
    "modes": ["modes-goal", "modes-importance-draws", "modes-forgetting", "modes-equal-time", "modes-long"],
    "frontier": [
        "frontier-ila-75",
        "frontier-peers-ila-75",
        "frontier-past-best-ila-75",
        "frontier-ila-ranks",
        "frontier-inside",
        "frontier-peers-inside",
        "frontier-instructions",
    ],
}


def headline(root: Path) -> str:
    """One table of the studies' answers (`HEADLINE`), each row linked to the page that holds its figures and rule."""
    rows = []
    for study, ids in HEADLINE.items():
        found = {finding.id: finding for finding in findings(root, study)}
        page = f"benchmarks/{study.upper()}.md"
        for name in ids:
            if name not in found:
                raise ValueError(f"{study}.json has no finding {name!r} (it has {', '.join(found)}): fix HEADLINE")
            finding = found[name]
            cells = [cell_text(text) for text in (finding.claim, finding.verdict, _short(finding.evidence))]
            rows.append([*cells, f"[{Path(page).name}]({page})"])
    lines = table(["question", "answer", "evidence", "page"], rows)
    note = (
        "Evidence: the first figures of each finding (Δ: a difference in held-out loss, or in forgetting where the "
        "question is whether a mode forgets less, ± its standard error from the seed-to-seed spread); the page has all "
        "of it and the rule behind each answer."
    )
    return "\n".join([*lines, "", _wrap(note)])


def versus(root: Path) -> str:
    """The recorded `peft-ila versus` run's answer (`docs/versus/versus.json`) and its budget."""
    results = _json(root / "docs" / "versus" / "versus.json")
    return _wrap(f"> {results['answer']} (`{results['command']}`, on {_machine(results['machine'])}.)")


REGIONS: dict[str, Callable[[Path], str]] = {"demo": demo, "versus": versus, "headline": headline}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 naming the stale regions")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md", help="the file to fill (default: README.md)")
    args = parser.parse_args(argv)
    text = args.readme.read_text()
    if args.check:
        old = stale(text, ROOT)
        print(f"{args.readme}: stale figures regions: {', '.join(old)}; run `make figures`" if old else "up to date")
        return 1 if old else 0
    new = render(text, ROOT)
    if new != text:
        with written_atomically(args.readme) as tmp:  # whole or not at all
            tmp.write_text(new)
    print(f"{args.readme}: {'regions rewritten' if new != text else 'up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
