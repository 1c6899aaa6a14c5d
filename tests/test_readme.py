"""README stays true: its commands are CI's, its quickstart is the example that runs, its tables match the code."""

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from peft import PeftConfig

from peft_ila import ILAConfig
from peft_ila.tuner.selection import MASK_KEYS

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def subsection(heading: str) -> str:
    """The README's text from the line starting with `heading` to the next heading of level 2 or 3."""
    after = README.split("\n" + heading, 1)[1]
    return re.split(r"\n#{2,3} ", after, maxsplit=1)[0]


def quoted_findings(section: str) -> list[str]:
    return [line for line in section.splitlines() if re.match(r"\d\. \*\*", line)]


def code_blocks(language):
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_readme_opens_with_the_two_commands_and_ci_runs_the_test_one():
    first = code_blocks("bash")[0]
    commands = [line.split("#")[0].strip() for line in first.strip().splitlines()]
    assert commands == ["make demo", "make test"]
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert "make test" in ci


def test_quickstart_block_is_the_example_file():
    assert (ROOT / "examples" / "quickstart.py").read_text() in code_blocks("python")


def test_every_config_field_and_mask_key_is_documented():
    own = {f.name for f in dataclasses.fields(ILAConfig)} - {f.name for f in dataclasses.fields(PeftConfig)}
    documented = set(re.findall(r"^\| `(\w+)` \|", README, flags=re.M))
    assert own <= documented, own - documented
    assert all(f"| `{key}` |" in README for key in MASK_KEYS)


def test_quickstart_runs_as_written(tmp_path):
    env = {**os.environ, "TQDM_DISABLE": "1"}
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")],
        cwd=tmp_path,
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    ).stdout
    assert "important layers: [" in out and "trainable params" in out
    diff = float(re.search(r"after reload: (\S+)", out).group(1))
    assert diff <= 1e-5
    assert (tmp_path / "ila-quickstart" / "adapter_model.safetensors").exists()


def test_qlora_example_is_in_the_readme_and_runs_as_written(tmp_path):
    example = ROOT / "examples" / "qlora.py"
    assert example.read_text() in code_blocks("python")
    env = {**os.environ, "TQDM_DISABLE": "1"}
    done = subprocess.run([sys.executable, str(example)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(re.search(r"after reload: (\S+)", done.stdout).group(1)) <= 1e-5
    assert 0 < float(re.search(r"4-bit weights: (\S+)", done.stdout).group(1)) < 1  # rounded, not lost
    assert "quantizes the result again" in done.stderr


def test_demo_figures_match_the_recorded_run():
    demo = json.loads((ROOT / "docs" / "demo" / "demo.json").read_text())
    record = json.loads((ROOT / "docs" / "demo" / "importance.json").read_text())
    costs = record["costs"]
    certain = sum(record["confidence"][name] >= 0.9 for name in record["selected"])
    training = json.loads((ROOT / "docs" / "demo" / "training.json").read_text())
    quoted = [
        f"**{demo['seconds']:.0f} s**",
        f"identification {costs['stage1']['steps']} + {costs['stage2']['steps']} steps in "
        f"{costs['stage1']['seconds'] + costs['stage2']['seconds']:.0f} s",
        f"fine-tuning {training['steps']} steps at a median {training['median_step_seconds']:.2f} s/step",
        f"**{demo['held_out_loss_before']:.4f} -> {demo['held_out_loss_after']:.4f}**",
        f"({demo['held_out_loss_after_reload']:.4f} after the reload)",
        f"top-25% set: {certain} of {len(record['selected'])} layers certain at 90%",
    ]
    flat = " ".join(README.split())
    assert all(q in flat for q in quoted), [q for q in quoted if q not in flat]
    assert (ROOT / "docs" / "demo" / "heatmap.png").exists() and "docs/demo/heatmap.png" in README


def test_grid_noise_scale_and_findings_are_quoted_from_grid_md():
    section = subsection("### The grid: fine-tunes long enough to judge")
    page = (ROOT / "benchmarks" / "GRID.md").read_text()
    findings = quoted_findings(section)
    assert len(findings) == 8 and all(line in page for line in findings), [f for f in findings if f not in page]
    noise = [line for line in section.splitlines() if line.startswith("Noise scale (")]
    assert len(noise) == 1 and noise[0] in page.splitlines()
    assert "make bench`" in section and (ROOT / "benchmarks" / "results" / "grid" / "full" / "grid.json").exists()
    incomplete = "Not computed yet" in page  # the README says so exactly while the page lists missing cells
    assert ("The grid is not complete yet" in section) == incomplete
    assert ("(being computed)" in section.splitlines()[0]) == incomplete


def test_short_study_findings_are_quoted_from_results_md():
    section = subsection("### The first, short study")
    findings = quoted_findings(section)
    results = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    assert len(findings) == 4 and all(line in results for line in findings), findings
    assert "make bench-short" in section and (ROOT / "benchmarks" / "results" / "full.json").exists()


def test_stability_findings_are_quoted_from_stability_md():
    section = subsection("### Stability of the ranking")
    findings = quoted_findings(section)
    page = (ROOT / "benchmarks" / "STABILITY.md").read_text()
    assert len(findings) >= 5 and all(line in page for line in findings), [f for f in findings if f not in page]
    assert "make bench-stability" in section


def test_methods_tables_and_findings_are_quoted_from_methods_md():
    section = subsection("### Fine-tuning methods on a selection")
    rows = [line for line in section.splitlines() if line.startswith("|")]
    page = (ROOT / "benchmarks" / "METHODS.md").read_text()
    assert len(rows) >= 3 and rows == [line for line in page.splitlines() if line.startswith("|")]
    findings = quoted_findings(section)
    assert len(findings) >= 4 and all(line in page for line in findings), [f for f in findings if f not in page]
    assert "make bench-methods" in section
