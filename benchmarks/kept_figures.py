"""Is every figure of the study pages at an earlier revision still on a page now? For a change that rewrites how the
pages are made: their numbers must survive it.

    python -m benchmarks.kept_figures 3c31fb5            # the pages at that revision against the working tree's
    python -m benchmarks.kept_figures 3c31fb5 --show 20  # and the first 20 figures that are gone

A figure is a decimal number (1.5214, 0.45, +0.0016) or a whole number of three or more digits (224 steps), its sign
left out: "+0.0016" on the old page is kept by "0.0016" anywhere on a page now. Exit status 1 when one is gone.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections import Counter

from benchmarks.core.inputs import ROOT

PAGES = ("GRID.md", "MODES.md", "STABILITY.md", "METHODS.md")
FIGURE = re.compile(r"(?<![\w.])\d+\.\d+(?![\w.])|(?<![\w.])\d{3,}(?![\w.])")


def figures(text: str) -> Counter:
    """How often each figure occurs in `text` (code spans and links left out: cell keys, paths, commands)."""
    text = re.sub(r"`[^`\n]*`|\]\([^)]*\)", " ", text)
    return Counter(FIGURE.findall(text))


def old_pages(revision: str) -> dict[str, str]:
    """The study pages as they were at `revision`."""
    pages = {}
    for page in PAGES:
        shown = ["git", "show", f"{revision}:benchmarks/{page}"]
        pages[page] = subprocess.run(shown, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return pages


def gone(old: dict[str, str], now: str) -> list[tuple[str, str]]:
    """(page, figure) for every figure of the `old` pages that the text `now` does not hold."""
    present = figures(now)
    return [(page, figure) for page, text in old.items() for figure in figures(text) if figure not in present]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("revision", help="the git revision whose pages are the reference")
    parser.add_argument("--show", type=int, default=10, help="figures gone to list (default: %(default)s)")
    args = parser.parse_args(argv)
    old = old_pages(args.revision)
    now = "\n".join(path.read_text() for path in sorted((ROOT / "benchmarks").glob("*.md")))
    missing = gone(old, now)
    total = sum(sum(figures(text).values()) for text in old.values())
    print(f"{total - len(missing)} of the {total} figures of {', '.join(PAGES)} at {args.revision} are on a page now")
    for page, figure in missing[: args.show]:
        print(f"  gone: {figure} ({page})")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
