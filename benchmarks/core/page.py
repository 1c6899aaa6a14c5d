"""What every study's page is made of: findings (claim, verdict, evidence, rule), tables, and the list of cells not
computed yet."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Finding:
    """One question a study answers: the `claim` tested, the `verdict` its `rule` gives on the `evidence` (the
    measured figures). An empty rule is left out (a finding that reports without judging). `id`: the study's name
    for the question, which stays when its wording changes (the README's headline names findings by it)."""

    claim: str
    verdict: str
    evidence: str
    rule: str = ""
    id: str = ""

    def line(self) -> str:
        """The finding as one Markdown line (without its number)."""
        rule = f" Rule: {self.rule}." if self.rule else ""
        return f"**{self.claim}**: {self.verdict}. Measured: {self.evidence}.{rule}"

    def to_json(self) -> dict:
        return asdict(self)


def findings_section(findings: list[Finding]) -> list[str]:
    """The page's numbered findings, under their heading."""
    return ["## Findings", "", *(f"{number}. {f.line()}" for number, f in enumerate(findings, 1)), ""]


def table(header: list[str], rows: list[list[str]], align: str = "") -> list[str]:
    """A Markdown table; `align` has one character per column, `l` (default) or `r`."""
    marks = ["---:" if a == "r" else "---" for a in align.ljust(len(header), "l")]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(marks) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


Column = tuple[str, str, Callable[[Any], str]]  # a table's column: header, alignment ("l" or "r"), a row's text


def columns(spec: list[Column], rows: Iterable) -> list[str]:
    """A Markdown table of `rows`, one column per (header, alignment, text of a row) of `spec`."""
    body = [[text(row) for _, _, text in spec] for row in rows]
    return table([header for header, _, _ in spec], body, "".join(align for _, align, _ in spec))


def number(value: float | None, spec: str = ".2f", missing: str = "–") -> str:
    """`value` in format `spec`, or `missing` when there is none."""
    return missing if value is None else format(value, spec)


def cell_text(text: str) -> str:
    """Text for a Markdown table cell (a '|' would end the cell)."""
    return text.replace("|", "\\|")


def missing_section(missing: list[str], target: str) -> list[str]:
    """The cells a page could not read, and the make target that computes them."""
    if not missing:
        return []
    return [f"Not computed yet ({len(missing)}; `{target}` continues the grid):", "", *(f"- {m}" for m in missing)]
