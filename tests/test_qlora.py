"""QLoRA: ILA adapters on a bitsandbytes 4-bit or 8-bit base (CPU), identified, trained, saved, reloaded and merged."""

import importlib.util
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from conftest import lm_batches, tiny_lm_dir
from peft_ila import ILAConfig, identify_important_layers
from peft_ila.identification.training import cycle, train_steps
from peft_ila.tuner.model import keep_4bit_layers_differentiable

QUANTIZED = {"4bit": dict(load_in_4bit=True), "8bit": dict(load_in_8bit=True)}
SELECTED = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    return tiny_lm_dir(tmp_path_factory.mktemp("lm"), layers=2)


def quantized(lm_dir, bits: str):
    return AutoModelForCausalLM.from_pretrained(
        lm_dir, quantization_config=BitsAndBytesConfig(**QUANTIZED[bits]), device_map="cpu"
    )


def batches(n: int = 2) -> list[dict]:
    return [{k: v if k == "attention_mask" else v % 200 for k, v in b.items()} for b in lm_batches(n)]


def fill_adapters(model, marker: str) -> None:
    """The same random adapter weights for ILA and LoRA (parameter names sort alike: A before B, module order)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in sorted((n, p) for n, p in model.named_parameters() if marker in n):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("bits", sorted(QUANTIZED))
def test_merging_into_a_quantized_base_is_what_peft_does_for_lora(lm_dir, bits):
    x, merged = batches(1)[0], {}
    for kind in ("ila", "lora"):
        if kind == "ila":
            config = ILAConfig(r=2, lora_alpha=4, selected_layers=SELECTED)
        else:
            config = LoraConfig(r=2, lora_alpha=4, target_modules=[n.removeprefix("model.") for n in SELECTED])
        base = quantized(lm_dir, bits)
        # as ILA and load_model do: bitsandbytes' repacking for CPU inference fails on layers this small
        keep_4bit_layers_differentiable(base)
        model = get_peft_model(base, config)
        fill_adapters(model, "ila_" if kind == "ila" else "lora_")
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            unmerged = model(**x).logits
            merged[kind] = model.merge_and_unload()(**x).logits
        if kind == "ila":
            assert any("quantizes the result again" in str(w.message) for w in caught)
            assert 0 < (merged[kind] - unmerged).abs().max() < 0.1 * unmerged.abs().max()  # rounded, not lost
    assert torch.equal(merged["ila"], merged["lora"])


def test_identify_train_save_and_reload_on_a_4bit_base_in_a_fresh_process(lm_dir, tmp_path):
    model = get_peft_model(quantized(lm_dir, "4bit"), ILAConfig(r=2, top_k=3, stage1_max_steps=3, stage2_steps=2))
    result = identify_important_layers(model, batches(), progress=False)
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(p.dtype == torch.float32 for p in params)  # adapters train in float beside 4-bit weights
    train_steps(model, cycle(batches()), torch.optim.AdamW(params, lr=1e-2), 3, progress=False)
    model.save_pretrained(tmp_path / "adapter")
    x = batches(1)[0]
    with torch.no_grad():
        save_file({"input_ids": x["input_ids"], "logits": model(input_ids=x["input_ids"]).logits}, tmp_path / "x.st")
    script = f"""
import torch, peft_ila
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
base = AutoModelForCausalLM.from_pretrained({str(lm_dir)!r}, device_map="cpu",
    quantization_config=BitsAndBytesConfig(load_in_4bit=True))
model = PeftModel.from_pretrained(base, {str(tmp_path / "adapter")!r})
x = load_file({str(tmp_path / "x.st")!r})
with torch.no_grad():
    save_file({{"logits": model(input_ids=x["input_ids"]).logits}}, {str(tmp_path / "y.st")!r})
print(model.peft_config["default"].selected_layers)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert eval(done.stdout.strip().splitlines()[-1]) == result.selected
    expected, got = load_file(tmp_path / "x.st")["logits"], load_file(tmp_path / "y.st")["logits"]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_a_4bit_base_still_passes_gradients_after_an_evaluation(lm_dir):
    # bitsandbytes repacks 4-bit weights for a no-gradient kernel at the first forward in eval mode without
    # gradients on a CPU with AVX512-BF16; the lowest adapter must still get its gradient after such an evaluation
    model = get_peft_model(quantized(lm_dir, "4bit"), ILAConfig(r=2, selected_layers=SELECTED))
    fill_adapters(model, "ila_")  # B nonzero, so A's gradient is too
    batch = batches(1)[0]
    model.eval()
    with torch.no_grad():
        model(**batch)
    model.train()
    model(**batch).loss.backward()
    lowest = [p for n, p in model.named_parameters() if "layers.0.self_attn.q_proj.ila_A" in n]
    assert len(lowest) == 1 and lowest[0].grad is not None and lowest[0].grad.abs().sum() > 0


def test_identification_on_an_8bit_base_selects_and_trains(lm_dir):
    model = get_peft_model(quantized(lm_dir, "8bit"), ILAConfig(r=2, top_k=3, stage1_max_steps=2, stage2_steps=2))
    result = identify_important_layers(model, batches(), progress=False)
    trained = {
        n.split(".ila_")[0].removeprefix("base_model.model.") for n, p in model.named_parameters() if p.requires_grad
    }
    assert trained == set(result.selected) and len(result.selected) == 3
    kinds = {type(m.weight).__name__ for n, m in model.named_modules() if n.endswith(("q_proj", "down_proj"))}
    assert kinds == {"Int8Params"}  # the base stays 8-bit, adapted or not


def test_the_cli_identifies_trains_and_evaluates_on_a_4bit_base(work, run, capsys):
    from conftest import common, identify
    from peft_ila.app.cli import main

    quantized_run = work / "run-4bit"
    identify(work, quantized_run, "--load-in-4bit")
    assert json.loads((quantized_run / "importance.json").read_text())["quantization"] == "4bit"
    out = work / "adapter-4bit"
    capsys.readouterr()
    assert main(["train", *common(work, "--steps", "3", "--load-in-4bit"), "--mask", str(run), "--out", str(out)]) == 0
    assert f"--mask {run} was found on" in capsys.readouterr().out  # a mask found unquantized, noted, applied
    info = json.loads((out / "training.json").read_text())
    assert info["quantization"] == "4bit" and info["loss_after"] < info["loss_before"]
    assert main(["eval", str(out), "--json", str(work / "eval-4bit.json"), "--no-progress"]) == 0
    assert json.loads((work / "eval-4bit.json").read_text())["held_out_loss"] == pytest.approx(info["loss_after"])


def test_the_cli_says_what_to_install_without_bitsandbytes(work, monkeypatch, capsys):
    from conftest import common
    from peft_ila.app.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    assert (
        main(["train", *common(work, "--steps", "1", "--load-in-8bit"), "--all-layers", "--out", str(work / "x")]) == 2
    )
    assert "--load-in-8bit needs the bitsandbytes package" in capsys.readouterr().err


def test_prepare_model_for_kbit_training_keeps_identification_working_and_backward_short(lm_dir):
    """peft's QLoRA recipe (gradient checkpointing, embeddings hooked to require grad) under ILA's adapters: identify
    and train as usual, and once only a high layer is selected, backward still stops at its block."""
    from peft import prepare_model_for_kbit_training

    base = prepare_model_for_kbit_training(quantized(lm_dir, "4bit"))
    assert base.is_gradient_checkpointing
    model = get_peft_model(base, ILAConfig(r=2, top_k=3, stage1_max_steps=3, stage2_steps=2))
    assert len(identify_important_layers(model, batches(), progress=False).selected) == 3
    high = get_peft_model(
        prepare_model_for_kbit_training(quantized(lm_dir, "4bit")),
        ILAConfig(r=2, selected_layers=["model.layers.1.mlp.down_proj"]),
    )
    embedded = []
    high.get_input_embeddings().register_forward_hook(lambda m, args, out: embedded.append(out.requires_grad))
    high.train()
    losses = train_steps(high, cycle(batches()), torch.optim.AdamW(high.parameters(), lr=1e-2), 3, progress=False)
    assert embedded == [False] * 3  # the embedding hook is gone: nothing below block 1 is differentiated
    assert losses.losses[-1] < losses.losses[0]


WITHOUT_KERNELS = 'sys.modules["kernels"] = None  # the optional package absent, as on a machine that lacks it'
AS_ON_AN_AVX512_BF16_CPU = """
import importlib.abc, importlib.util, sys


class ReportAvx512Bf16(importlib.abc.MetaPathFinder):
    # bitsandbytes.functional.has_avx512bf16() says yes, before its CPU backend asks it at import
    def find_spec(self, name, path, target=None):
        if name != "bitsandbytes.functional":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            module.has_avx512bf16 = lambda: True

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, ReportAvx512Bf16())
"""


@pytest.mark.parametrize("kernels", ["absent", "offline"])
@pytest.mark.parametrize("first_import", ["peft_ila.app.cli", "peft_ila", "peft"])
def test_importing_peft_ila_prints_no_bitsandbytes_notice(first_import, kernels):
    # on a CPU with AVX512-BF16, importing bitsandbytes (which peft does) logs that an optional kernel of a path
    # peft-ila turns off could not be fetched, and with the Hub offline `kernels` first logs that it skips the
    # kernel's publisher check; those lines must not reach a peft-ila user. Imported through peft first, they do
    # reach stderr: the simulation reproduces them.
    script = f"{AS_ON_AN_AVX512_BF16_CPU}\n{WITHOUT_KERNELS if kernels == 'absent' else ''}\n"
    script += f"import {first_import}\nimport peft_ila.app.cli\n"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    notices = ["gemm_4bit_forward", *(["Skipping publisher trust check"] if kernels == "offline" else [])]
    assert [n for n in notices if n in done.stderr] == (notices if first_import == "peft" else []), done.stderr
