"""README and docs stay true: README's commands are CI's, its examples are the files that run, its measured figures are
generated from the files that record them, the docs document every config field, and every local link resolves."""

import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from peft import PeftConfig, PeftModel
from test_distributed import torchrun
from transformers import AutoModelForCausalLM

from benchmarks import figures
from peft_ila import ILAConfig
from peft_ila.tuner.selection import MASK_KEYS

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOCS = {path: path.read_text() for path in [ROOT / "README.md", ROOT / "benchmarks" / "README.md"]}
DOCS |= {path: path.read_text() for path in sorted((ROOT / "docs").glob("*.md"))}

FENCE = re.compile(r"^ *```.*?^ *```[^\n]*$", flags=re.M | re.S)
REGION = re.compile(r"^<!-- figures: \S+ -->$.*?^<!-- /figures -->$", flags=re.M | re.S)
# a measured number: a decimal (1.4862), a share (87%), a duration or size (404 s, 3.82 s/step, 625 MB), a ratio
# (0.75x, × 0.75)
MEASURED = re.compile(
    r"\d+\.\d+|\d+\s?%|\b\d+(?:\.\d+)?\s?(?:s|ms|min|h|MB|GB)\b|\d(?:\.\d+)?\s?[x×](?!\w)|×\s?\d",
)
# settings, not measurements: the size of a selection (top 25%) and versions (3.11 after Python, 2.13.0, ==0.9.5)
SETTINGS = re.compile(r"\b(?:top|bottom)[- ]\d+%|\bPython \d+\.\d+|\b\d+\.\d+\.\d+\b|[<>=]=\s?\d+(?:\.\d+)*")


def code_blocks(language: str, text: str = README) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def doc(name: str) -> str:
    return (ROOT / "docs" / name).read_text()


def prose(text: str) -> str:
    """The text outside code blocks, generated regions and link targets, settings removed: where no measured number
    may stand."""
    return SETTINGS.sub("", re.sub(r"\]\([^)\s]*\)", "]", FENCE.sub("", REGION.sub("", text))))


def test_readme_opens_with_the_two_commands_and_ci_runs_the_test_one():
    first = code_blocks("bash")[0]
    commands = [line.split("#")[0].strip() for line in first.strip().splitlines()]
    assert commands == ["make demo", "make test"]
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert "make test" in ci


def test_quickstart_block_is_the_example_file():
    assert (ROOT / "examples" / "quickstart.py").read_text() in code_blocks("python")


def test_every_config_field_and_mask_key_is_documented():
    api = doc("api.md")
    own = {f.name for f in dataclasses.fields(ILAConfig)} - {f.name for f in dataclasses.fields(PeftConfig)}
    documented = set(re.findall(r"^\| `(\w+)` \|", api, flags=re.M))
    assert own <= documented, own - documented
    assert all(f"| `{key}` |" in api for key in MASK_KEYS)


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


def test_qlora_example_is_in_its_page_and_runs_as_written(tmp_path):
    example = ROOT / "examples" / "qlora.py"
    assert example.read_text() in code_blocks("python", doc("qlora.md"))
    env = {**os.environ, "TQDM_DISABLE": "1"}
    done = subprocess.run([sys.executable, str(example)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(re.search(r"after reload: (\S+)", done.stdout).group(1)) <= 1e-5
    assert 0 < float(re.search(r"4-bit weights: (\S+)", done.stdout).group(1)) < 1  # rounded, not lost
    assert "quantizes the result again" in done.stderr


def test_deepspeed_example_is_in_its_page_and_both_steps_run_as_written(tmp_path):
    """Step 1 in one process on a 4-bit base; step 2 under torchrun with ZeRO-3 (DeepSpeed's CPU backend, one
    process); the adapter it saved reloads with LoRA on exactly the selected layers, trained (B left zero otherwise)."""
    example = ROOT / "examples" / "deepspeed_zero3.py"
    assert example.read_text() in code_blocks("python", doc("deepspeed.md"))
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT)}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    for command in ([sys.executable, str(example), "identify"], [*launch, str(example), "train"]):
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    selected = json.loads((tmp_path / "ila-selection.json").read_text())["selected"]
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny-llama")
    model = PeftModel.from_pretrained(base, tmp_path / "lora-on-selection")
    adapted = {name for name, module in model.base_model.model.named_modules() if hasattr(module, "lora_B")}
    assert adapted == set(selected) and len(selected) == 4
    assert all(
        module.lora_B["default"].weight.abs().sum() > 0 for module in model.modules() if hasattr(module, "lora_B")
    )


def test_generated_regions_are_up_to_date():
    assert figures.render(README, ROOT) == README, (
        f"README's generated regions are stale ({', '.join(figures.stale(README, ROOT))}): run `make figures`"
    )


def test_readme_has_the_demo_versus_and_headline_regions():
    assert [region.name for region in figures.regions(README)] == ["demo", "versus", "headline"]


def test_readme_is_a_few_screens():
    lines = README.splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; move detail to docs/"
    long = [line[:60] for line in lines if len(line) > 320]
    assert not long, long


@pytest.mark.parametrize(
    "text",
    ["loss 1.5761 -> 1.4862", "took 404 s", "3.82 s/step", "keeps 87% of the gain", "0.75x the step time", "× 0.57"],
)
def test_a_measured_number_is_caught(text):
    assert MEASURED.search(prose(f"Some prose: {text}."))


@pytest.mark.parametrize(
    "text",
    [
        "Python 3.11 and torch 2.13.0",
        "`llamafactory==0.9.5`",
        "ILA's top 25%",
        "30 blocks x 7 layers",
        "128 + 32 steps",
        "[paper](https://arxiv.org/abs/2410.17875)",
    ],
)
def test_a_setting_is_not_caught(text):
    assert not MEASURED.search(prose(f"Some prose: {text}."))


def test_readme_has_no_measured_number_outside_generated_regions():
    found = [(m[0], line) for line in prose(README).splitlines() for m in MEASURED.finditer(line)]
    assert not found, f"measured numbers belong in a generated region (benchmarks/figures.py): {found}"


def test_render_refuses_an_unknown_or_unclosed_region():
    with pytest.raises(ValueError, match=r"unknown figures region 'nope'.*REGIONS"):
        figures.render("text\n<!-- figures: nope -->\n<!-- /figures -->\n", ROOT)
    with pytest.raises(ValueError, match=r"'demo' opened at line 2 is never closed: add a line '<!-- /figures -->'"):
        figures.render("text\n<!-- figures: demo -->\nbody\n", ROOT)
    with pytest.raises(ValueError, match=r"'demo' \(line 1\) is not closed before line 2"):
        figures.render("<!-- figures: demo -->\n<!-- figures: demo -->\n<!-- /figures -->\n", ROOT)
    with pytest.raises(ValueError, match="closes no region"):
        figures.render("text\n<!-- /figures -->\n", ROOT)


def test_render_replaces_only_the_region_bodies(monkeypatch):
    monkeypatch.setitem(figures.REGIONS, "fake", lambda root: "new body")
    text = "before\n<!-- figures: fake -->\nold body\n<!-- /figures -->\nafter\n"
    rendered = figures.render(text, ROOT)
    assert rendered == "before\n<!-- figures: fake -->\n\nnew body\n\n<!-- /figures -->\nafter\n"
    assert figures.render(rendered, ROOT) == rendered
    assert figures.stale(text, ROOT) == ["fake"] and figures.stale(rendered, ROOT) == []


def test_main_checks_and_rewrites_a_file(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(figures.REGIONS, "fake", lambda root: "new body")
    readme = tmp_path / "README.md"
    readme.write_text("<!-- figures: fake -->\n<!-- /figures -->\n")
    readme.chmod(0o644)
    assert figures.main(["--check", "--readme", str(readme)]) == 1
    assert "stale figures regions: fake; run `make figures`" in capsys.readouterr().out
    assert figures.main(["--readme", str(readme)]) == 0
    assert "new body" in readme.read_text() and readme.stat().st_mode & 0o777 == 0o644
    assert figures.main(["--check", "--readme", str(readme)]) == 0
    assert [path.name for path in tmp_path.iterdir()] == ["README.md"]  # no temporary file left


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    return {slug(h) for h in re.findall(r"^#{1,6} (.+)$", FENCE.sub("", text), flags=re.M)}


def test_every_local_link_resolves():
    broken = []
    for path, text in DOCS.items():
        text = re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))  # links in code are not links
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            linked = (path.parent / file).resolve() if file else path
            if not linked.exists():
                broken.append(f"{path.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked.read_text()):
                broken.append(f"{path.relative_to(ROOT)}: {target} (no such heading)")
    assert len(DOCS) >= 7  # README.md, benchmarks/README.md and the docs/ pages
    assert not broken, broken


def test_make_demo_installs_what_the_demo_needs_and_no_test_extra():
    makefile = (ROOT / "Makefile").read_text()
    rule = re.search(r"^\$\(BIN\)/\.app: (.*)\n((?:\t.*\n)+)", makefile, re.M)
    assert rule and ".installed" not in rule.group(1) and "test" not in rule.group(2), rule
    assert re.search(r"^demo: \$\(BIN\)/\.app$", makefile, re.M)


@pytest.mark.parametrize(
    ("example", "printed"),
    [
        ("trainer", r"fine-tune steps: 20"),
        ("trainer_resume", r"resumed at step 8, ended at step 12; the same adapter as uninterrupted: True"),
        ("trainer_layerwise", r"2 of 4 blocks at a time"),
    ],
)
def test_trainer_examples_are_in_their_page_and_run_as_written(tmp_path, example, printed):
    script = ROOT / "examples" / f"{example}.py"
    assert script.read_text() in code_blocks("python", doc("trainer.md"))
    env = {**os.environ, "TQDM_DISABLE": "1"}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.search(printed, done.stdout), done.stdout[-2000:]


def test_every_python_block_in_the_docs_is_a_tested_example():
    examples = {path.read_text() for path in (ROOT / "examples").glob("*.py")}
    for page in sorted((ROOT / "docs").glob("*.md")):
        fences = [line for line in page.read_text().splitlines() if line.lstrip().startswith("```")]
        assert set(fences[0::2]) <= {"```python", "```bash"}, f"{page.name}: a block neither python nor bash: {fences}"
        for block in code_blocks("python", page.read_text()):
            assert block in examples, f"{page.name}: a python block that is not a file of examples/ (run by a test)"


def test_every_command_in_the_docs_parses():
    """Each `peft-ila ...` line of a bash block (docs/ and README) is a command line the parser accepts as written."""
    from peft_ila.app.args import parser

    pages = [README, *(page.read_text() for page in sorted((ROOT / "docs").glob("*.md")))]
    lines = [
        line.split("  #")[0].strip()
        for page in pages
        for block in code_blocks("bash", page)
        for line in block.replace("\\\n", " ").splitlines()  # a command continued over several lines is one
    ]
    commands = [line.split("peft_ila.app.cli ", 1)[-1] if "peft_ila.app.cli " in line else line for line in lines]
    commands = [
        line.removeprefix("peft-ila ") for line in commands if "peft-ila " in line or "peft_ila.app.cli " in line
    ]
    assert len(commands) >= 15, commands
    for command in commands:
        parser().parse_args(shlex.split(command))  # a CommandLineError names what is wrong


def test_fsdp2_example_is_in_its_page_and_runs_on_two_processes(tmp_path):
    example = ROOT / "examples" / "fsdp2.py"
    assert example.read_text() in code_blocks("python", doc("ddp.md"))
    done = torchrun(str(example), cwd=tmp_path)  # two ranks; an aborted one prints its Python stack
    assert "2 ranks selected 7 layers" in done.stdout
    assert PeftConfig.from_pretrained(tmp_path / "ila-fsdp2").selected_layers  # a normal, selected adapter
