"""Results and files of an earlier version (`tests/fixtures`, written by `tests/fixtures/make_fixtures.py`) still come
out and load the same: identification (its numbers to float32 rounding, its ranking and selection exactly but for
layers whose scores lie within that rounding of each other), an adapter with its logits and held-out loss, a run
directory as a mask.

How far float32 rounding alone moves a stored number is measured, not guessed: `rounding.json` holds, per quantity,
the largest relative deviation (`deviation`: max |got - stored| / max |stored|) seen when the same code runs under
each of torch's CPU kernel sets and 1-4 threads, which sum in other orders (9e-7 at most when written, on an AVX2
CPU; an AVX-512 CPU moved a gate score by 6e-7 of its 0.52). `TOLERANCE` allows `MARGIN` times the largest spread,
for CPUs and libraries not measured; `test_a_real_change_moves_identification_far_beyond_the_tolerance` shows that
changing the algorithm even slightly moves the scores by well over 100 times `TOLERANCE`, so the margin hides none.
"""

import json
from itertools import combinations
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import alpaca_rows
from fixtures.make_fixtures import CASES, FLOAT_FIELDS, LOGIT_INPUTS, deviation, identify_case, values
from peft_ila.app.cli import main

FIXTURES = Path(__file__).resolve().parent / "fixtures"
STORED = json.loads((FIXTURES / "identify_tiny.json").read_text())
MARGIN = 10  # an order of magnitude over the rounding measured, for kernels (AVX-512, ARM, other BLAS) not measured
TOLERANCE = MARGIN * max(json.loads((FIXTURES / "rounding.json").read_text())["spread"].values())


def near_tie(a: str, b: str, scores: dict[str, float]) -> bool:
    """Whether rounding alone could order `a` and `b` either way: their scores lie within twice `TOLERANCE`."""
    return abs(scores[a] - scores[b]) <= 2 * TOLERANCE * max(map(abs, scores.values()))


def mismatches(got: dict, stored: dict) -> list[str]:
    """What of an identification result `got` differs from `stored` by more than float32 rounding can move it."""
    moved = {field: deviation(values(got[field]), values(stored[field])) for field in FLOAT_FIELDS}
    found = [
        f"{field}: {size:.3g} of its size (tolerance {TOLERANCE:.3g})"
        for field, size in moved.items()
        if not size <= TOLERANCE
    ]
    scores, place = stored["scores"], {name: i for i, name in enumerate(got["ranking"])}
    if sorted(got["ranking"]) != sorted(stored["ranking"]):
        return [*found, "ranking: other layers"]
    found += [
        f"ranking: {b} before {a} (scores {scores[a]}, {scores[b]})"
        for a, b in combinations(stored["ranking"], 2)
        if place[b] < place[a] and not near_tie(a, b, scores)
    ]
    joined, left = set(got["selected"]) - set(stored["selected"]), set(stored["selected"]) - set(got["selected"])
    if len(joined) != len(left) or not all(near_tie(a, b, scores) for a in joined for b in left):
        found.append(f"selected: {sorted(joined)} instead of {sorted(left)}")
    return found


@pytest.mark.parametrize("case", sorted(CASES))
def test_identification_gives_the_stored_result(case):
    assert STORED["settings"][case] == CASES[case]
    assert mismatches(identify_case(case), STORED["results"][case]) == []


CHANGES = {  # small changes of the algorithm's settings, each a different identification
    "one stage-1 step more": dict(stage1_max_steps=13),
    "a 10% higher stage-1 learning rate": dict(stage1_lr=1.1e-2),
    "another estimator": dict(estimator="update-norm"),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_real_change_moves_identification_far_beyond_the_tolerance(case, change):
    got, stored = identify_case(case, **CHANGES[change]), STORED["results"][case]
    assert deviation(values(got["scores"]), values(stored["scores"])) > 100 * TOLERANCE
    assert mismatches(got, stored)


def test_the_tolerance_is_a_rounding_one():
    # the margin over what was measured stays far below what any identification setting moves (0.2% or more)
    assert 1e-7 < TOLERANCE < 2e-5


def test_orders_within_rounding_are_either_way():
    stored = STORED["results"]["module"]
    scores, ranking = dict(stored["scores"]), list(stored["ranking"])
    a, b = ranking[2], ranking[3]
    scores[b] = scores[a] * (1 - TOLERANCE)  # a near tie, stored in one order and found in the other
    ranking[2], ranking[3] = b, a
    tied = {**stored, "scores": scores}
    assert mismatches({**tied, "ranking": ranking}, tied) == []
    assert mismatches({**stored, "ranking": ranking}, stored) == [
        f"ranking: {b} before {a} (scores {scores[a]}, {stored['scores'][b]})"
    ]  # not a tie as stored


@pytest.fixture(scope="module")
def lm():
    # the model the fixtures were written on, stored: drawn again from its seed, its weights would differ in the
    # last bits on a CPU whose kernels draw random numbers otherwise (ATEN_CPU_CAPABILITY=default does)
    return FIXTURES / "lm"


def test_a_stored_adapter_loads_with_its_logits(lm):
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(lm), FIXTURES / "adapter").eval()
    with torch.no_grad():
        logits = model(input_ids=LOGIT_INPUTS).logits
    expected = load_file(FIXTURES / "adapter_logits.safetensors")["logits"]
    assert deviation(logits.flatten().tolist(), expected.flatten().tolist()) <= TOLERANCE


def test_a_stored_adapter_evaluates_where_its_model_and_data_are_now(lm, tmp_path, capsys):
    info = json.loads((FIXTURES / "adapter" / "training.json").read_text())
    assert main(["eval", str(FIXTURES / "adapter"), "--no-progress"]) == 2  # written in a directory that is gone
    assert "is not there any more; pass --data" in capsys.readouterr().err
    (tmp_path / "data.json").write_text(json.dumps(alpaca_rows(40)))
    args = ["--model", str(lm), "--data", str(tmp_path / "data.json"), "--json", str(tmp_path / "e.json")]
    assert main(["eval", str(FIXTURES / "adapter"), *args, "--no-progress"]) == 0
    assert "warning" not in capsys.readouterr().err  # the same data and the same weights
    assert json.loads((tmp_path / "e.json").read_text())["held_out_loss"] == pytest.approx(
        info["loss_after"], rel=TOLERANCE
    )


def test_a_stored_run_directory_is_a_mask(lm, tmp_path):
    run = json.loads((FIXTURES / "run" / "importance.json").read_text())
    (tmp_path / "data.json").write_text(json.dumps(alpaca_rows(40)))
    args = ["--model", str(lm), "--data", str(tmp_path / "data.json"), "--eval-size", "8", "--max-length", "96"]
    out = tmp_path / "adapter"
    assert (
        main(["train", *args, "--steps", "1", "--no-progress", "--mask", str(FIXTURES / "run"), "--out", str(out)]) == 0
    )
    assert json.loads((out / "adapter_config.json").read_text())["selected_layers"] == run["selected"]
