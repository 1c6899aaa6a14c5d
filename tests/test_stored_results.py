"""Results and files of an earlier version (`tests/fixtures`, written by `tests/fixtures/make_fixtures.py`) still come
out and load the same: identification (its ranking exactly, its numbers to float32 rounding on another CPU), an
adapter with its logits, a run directory as a mask."""

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import alpaca_rows, tiny_lm_dir
from fixtures.make_fixtures import CASES, LOGIT_INPUTS, identify_case
from peft_ila.app.cli import main

FIXTURES = Path(__file__).resolve().parent / "fixtures"
STORED = json.loads((FIXTURES / "identify_tiny.json").read_text())


@pytest.mark.parametrize("case", sorted(CASES))
def test_identification_gives_the_stored_result(case):
    assert STORED["settings"][case] == CASES[case]
    got = identify_case(case)
    for key, expected in STORED["results"][case].items():
        if key in ("ranking", "selected"):
            assert got[key] == expected, key  # exact
        else:  # float32 sums round differently on CPUs with other vector units (AVX-512): 1e-7 apart, not more
            assert got[key] == pytest.approx(expected, rel=1e-6, abs=1e-9), key


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return tiny_lm_dir(tmp_path_factory.mktemp("stored") / "lm")  # the model the fixtures were written on


def test_a_stored_adapter_loads_with_its_logits(lm):
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(lm), FIXTURES / "adapter").eval()
    with torch.no_grad():
        logits = model(input_ids=LOGIT_INPUTS).logits
    torch.testing.assert_close(logits, load_file(FIXTURES / "adapter_logits.safetensors")["logits"])


def test_a_stored_adapter_evaluates_where_its_model_and_data_are_now(lm, tmp_path, capsys):
    info = json.loads((FIXTURES / "adapter" / "training.json").read_text())
    assert main(["eval", str(FIXTURES / "adapter"), "--no-progress"]) == 2  # written in a directory that is gone
    assert "is not there any more; pass --data" in capsys.readouterr().err
    (tmp_path / "data.json").write_text(json.dumps(alpaca_rows(40)))
    args = ["--model", str(lm), "--data", str(tmp_path / "data.json"), "--json", str(tmp_path / "e.json")]
    assert main(["eval", str(FIXTURES / "adapter"), *args, "--no-progress"]) == 0
    assert "warning" not in capsys.readouterr().err  # the same data and the same weights
    assert json.loads((tmp_path / "e.json").read_text())["held_out_loss"] == pytest.approx(info["loss_after"])


def test_a_stored_run_directory_is_a_mask(lm, tmp_path):
    run = json.loads((FIXTURES / "run" / "importance.json").read_text())
    (tmp_path / "data.json").write_text(json.dumps(alpaca_rows(40)))
    args = ["--model", str(lm), "--data", str(tmp_path / "data.json"), "--eval-size", "8", "--max-length", "96"]
    out = tmp_path / "adapter"
    assert (
        main(["train", *args, "--steps", "1", "--no-progress", "--mask", str(FIXTURES / "run"), "--out", str(out)]) == 0
    )
    assert json.loads((out / "adapter_config.json").read_text())["selected_layers"] == run["selected"]
