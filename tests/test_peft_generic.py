"""PEFT's generic behaviours on ILA, in the shape of peft's own test matrix (`tests/testing_common.py`): every row
(a model x an ILA state) goes through save/load, trainability, merging, dtype autocast, mixed-adapter batches,
weighted adapters, biases, the low-level API and transformers' `load_adapter`. Each behaviour works as it does for
LoRA (checked against a LoRA twin where LoRA defines the result) or raises one line naming ILA."""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from peft import (
    LoraConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from conftest import VOCAB, TinyMLP, llama_candidates, lm_batches, tiny_gpt2, tiny_llama
from peft_ila import ILAConfig, ILALayer, identify_important_layers
from peft_ila.app.export import export_lora

PREFIX = "ila_"
NAN_MESSAGE = "NaNs detected in the merged weights. The adapter default seems to be broken"  # peft's, for LoRA


class TinyConv1D(nn.Module):
    """transformers' Conv1D layers (weights stored [in, out], as GPT-2's), with biases, and a plain head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv0 = Conv1D(20, 10)
        self.conv1 = Conv1D(20, 20)
        self.head = nn.Linear(20, 3)
        with torch.no_grad():
            for conv in (self.conv0, self.conv1):
                conv.weight.normal_(std=0.3)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> types.SimpleNamespace:
        logits = self.head(torch.relu(self.conv1(torch.relu(self.conv0(x)))))
        return types.SimpleNamespace(logits=logits, loss=None)


def _tokens(batch: int = 4) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (batch, 10), generator=torch.Generator().manual_seed(7))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _features(batch: int = 4) -> dict[str, torch.Tensor]:
    return {"x": torch.randn(batch, 10, generator=torch.Generator().manual_seed(7))}


@dataclass(frozen=True)
class Row:
    """A model of the matrix: how to build it, its candidate modules, a reused mask, and its inputs."""

    name: str
    build: Callable[[], nn.Module]
    targets: list[str] | None
    mask: list[str]
    other_mask: list[str]  # a second adapter's, overlapping the first or not
    inputs: Callable[..., dict[str, torch.Tensor]]
    lm: bool


GPT2_MASKS = (
    ["transformer.h.0.attn.c_attn", "transformer.h.2.mlp.c_fc"],
    ["transformer.h.2.mlp.c_fc", "transformer.h.1.attn.c_proj"],
)
ROWS = {
    "linear": Row("linear", TinyMLP, ["lin0", "lin1"], ["lin1"], ["lin0", "lin1"], _features, False),
    "conv1d": Row("conv1d", TinyConv1D, ["conv0", "conv1"], ["conv0"], ["conv1"], _features, False),
    "llama": Row("llama", tiny_llama, None, llama_candidates()[3:8], llama_candidates()[6:10], _tokens, True),
    "gpt2": Row("gpt2", tiny_gpt2, None, *GPT2_MASKS, _tokens, True),
}
STATES = ["selected", "probe"]  # a reused mask; the probe state (gated adapters on every candidate)
MATRIX = [pytest.param(ROWS[r], s, id=f"{r}-{s}") for r in ROWS for s in STATES]


def ila_config(row: Row, state: str, other: bool = False, **extra) -> ILAConfig:
    mask = (row.other_mask if other else row.mask) if state == "selected" else None
    return ILAConfig(r=4, target_modules=row.targets, selected_layers=mask, init_weights=False, **extra)


def output(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def adapter_params(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if PREFIX in n}


def seeded(seed: int, make: Callable[[], nn.Module]) -> nn.Module:
    """`make()` after seeding: adapters drawn with init_weights=False come out the same."""
    torch.manual_seed(seed)
    return make()


# --- save, load, trainability ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("row", "state"), MATRIX)
def test_save_load_and_requires_grad(row, state, tmp_path):
    model = get_peft_model(row.build(), ila_config(row, state)).eval()
    assert adapter_params(model) and all(p.requires_grad for p in adapter_params(model).values())
    assert not any(p.requires_grad for n, p in model.named_parameters() if PREFIX not in n)
    expected = output(model, row.inputs())
    model.save_pretrained(tmp_path)
    for trainable in (False, True):
        loaded = PeftModel.from_pretrained(row.build(), tmp_path, is_trainable=trainable).eval()
        torch.testing.assert_close(output(loaded, row.inputs()), expected)
        assert {n: p.requires_grad for n, p in adapter_params(loaded).items()} == dict.fromkeys(
            adapter_params(model), trainable
        )


@pytest.mark.parametrize(("row", "state"), MATRIX)
def test_training_gives_a_gradient_to_exactly_what_trains(row, state):
    model = get_peft_model(row.build(), ila_config(row, state)).train()
    (output_with_grad := model(**row.inputs()).logits).sum().backward()
    assert output_with_grad.requires_grad
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad == (PREFIX in name), name


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize(("row", "state"), [p for p in MATRIX if p.values[0].lm])
def test_gradient_checkpointing_gives_the_same_gradients(row, state, use_reentrant):
    model = get_peft_model(row.build(), ila_config(row, state)).train()

    def gradients() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        (model(**row.inputs()).logits ** 2).sum().backward()
        return {n: p.grad.clone() for n, p in adapter_params(model).items() if p.grad is not None}

    plain = gradients()
    model.prepare_model_for_gradient_checkpointing(model)
    model.gradient_checkpointing_enable({"use_reentrant": use_reentrant})
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys() == adapter_params(model).keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("row", "state"), MATRIX)
def test_autocast_adapter_dtype(row, state, dtype, tmp_path):
    dtypes = lambda model, adapter: {p.dtype for n, p in adapter_params(model).items() if f".{adapter}." in n}  # noqa: E731
    assert dtypes(get_peft_model(row.build().to(dtype), ila_config(row, state)), "default") == {torch.float32}
    model = get_peft_model(row.build().to(dtype), ila_config(row, state), autocast_adapter_dtype=False)
    assert dtypes(model, "default") == {dtype}
    model.add_adapter("added", ila_config(row, state), autocast_adapter_dtype=False)
    assert dtypes(model, "added") == {dtype}
    model.save_pretrained(tmp_path)
    model.load_adapter(tmp_path, adapter_name="loaded", autocast_adapter_dtype=False)
    assert dtypes(model, "loaded") == {dtype}


# --- merging ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("row", "state"), MATRIX)
def test_merge_unmerge_disable(row, state):
    base_out = output(row.build().eval(), row.inputs())
    model = get_peft_model(row.build(), ila_config(row, state)).eval()
    out = output(model, row.inputs())
    assert not torch.allclose(out, base_out)
    with model.disable_adapter():
        torch.testing.assert_close(output(model, row.inputs()), base_out)
    model.merge_adapter()
    torch.testing.assert_close(output(model, row.inputs()), out, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(output(model, row.inputs()), out, atol=1e-5, rtol=1e-5)
    merged = model.merge_and_unload(safe_merge=True)
    assert not any(isinstance(m, ILALayer) for m in merged.modules())
    torch.testing.assert_close(output(merged, row.inputs()), out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bad", [torch.nan, torch.inf])
@pytest.mark.parametrize(("row", "state"), MATRIX)
def test_broken_merge_raises_peft_message(row, state, bad):
    model = get_peft_model(row.build(), ila_config(row, state))
    with torch.no_grad():
        for p in adapter_params(model).values():
            p[0] = bad
    with pytest.raises(ValueError, match=NAN_MESSAGE):
        model.merge_and_unload(safe_merge=True)


# --- mixed-adapter batches ------------------------------------------------------------------------------------


def two_adapters(row: Row, state: str) -> PeftModel:
    """Adapters "one" and "two" with different weights (and, in the selected state, on different layers)."""
    model = get_peft_model(row.build(), ila_config(row, state), adapter_name="one")
    model.add_adapter("two", ila_config(row, state, other=True))
    return model.eval()


ROW_NAMES = ["one", "__base__", "two", "one"]


@pytest.mark.parametrize(("row", "state"), MATRIX)
def test_mixed_batch_gives_each_row_its_own_adapter(row, state):
    model = two_adapters(row, state)
    inputs = row.inputs(len(ROW_NAMES))
    alone = {}
    for name in ("one", "two"):
        model.set_adapter(name)
        alone[name] = output(model, inputs)
    with model.disable_adapter():
        alone["__base__"] = output(model, inputs)
    torch.testing.assert_close(alone["__base__"], output(row.build().eval(), inputs))
    assert not torch.allclose(alone["one"], alone["two"])
    mixed = output(model, {**inputs, "adapter_names": ROW_NAMES})
    for i, name in enumerate(ROW_NAMES):
        torch.testing.assert_close(mixed[i], alone[name][i], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(("row", "state"), MATRIX)
def test_mixed_batch_misuse_raises_naming_ila(row, state):
    model = two_adapters(row, state)
    inputs = row.inputs(len(ROW_NAMES))
    with pytest.raises(ValueError, match=r"ILA: `adapter_names` names adapters this model does not have: three"):
        model(**inputs, adapter_names=["one", "three", "two", "one"])
    with pytest.raises(ValueError, match=r"ILA: `adapter_names` names 2 adapters for a batch of 4 rows"):
        model(**inputs, adapter_names=["one", "two"])
    with pytest.raises(TypeError, match=r"ILA: `adapter_names` must be a list of adapter names"):
        model(**inputs, adapter_names="one")
    model.merge_adapter(["one"])
    with pytest.raises(ValueError, match=r"ILA: cannot pass `adapter_names` while adapters are merged"):
        model(**inputs, adapter_names=ROW_NAMES)
    model.unmerge_adapter()
    model.train()
    with pytest.raises(ValueError, match=r"ILA: cannot pass `adapter_names` in training mode"):
        model(**inputs, adapter_names=ROW_NAMES)


@pytest.mark.parametrize(("row", "state"), [p for p in MATRIX if p.values[0].lm])
def test_mixed_batch_generate_with_beam_search(row, state):
    model = two_adapters(row, state)
    ids = row.inputs(len(ROW_NAMES))["input_ids"]
    settings = dict(max_new_tokens=4, num_beams=2, do_sample=False, pad_token_id=0)
    alone = {}
    for name in ("one", "two"):
        model.set_adapter(name)
        alone[name] = model.generate(input_ids=ids, **settings)
    with model.disable_adapter():
        alone["__base__"] = model.generate(input_ids=ids, **settings)
    mixed = model.generate(input_ids=ids, adapter_names=ROW_NAMES, **settings)
    for i, name in enumerate(ROW_NAMES):
        assert mixed[i].tolist() == alone[name][i].tolist(), (i, name)


# --- weighted adapters: as LoRA's add_weighted_adapter on a LoRA twin with the same weights ---------------------

COMBINATIONS = [
    "svd",
    "linear",
    "cat",
    "ties",
    "ties_svd",
    "dare_ties",
    "dare_linear",
    "dare_ties_svd",
    "dare_linear_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
]


def lora_twin(row: Row, model: PeftModel) -> PeftModel:
    """LoRA adapters with the same names, places and weights as `model`'s ILA adapters."""
    twin = None
    for name, config in model.peft_config.items():
        modules = sorted(
            n for n, m in model.base_model.model.named_modules() if isinstance(m, ILALayer) and name in m.ila_A
        )
        lora = LoraConfig(r=config.r, lora_alpha=config.lora_alpha, target_modules=modules)
        if twin is None:
            twin = get_peft_model(row.build(), lora, adapter_name=name)
        else:
            twin.add_adapter(name, lora)
    weights = {k.replace(".ila_", ".lora_"): v for k, v in model.state_dict().items() if PREFIX in k}
    missing, unexpected = twin.load_state_dict(weights, strict=False)
    assert not unexpected and not [k for k in missing if ".lora_" in k]
    return twin.eval()


@pytest.mark.parametrize("combination", COMBINATIONS)
@pytest.mark.parametrize(("row", "state"), [p for p in MATRIX if p.values[0].name in ("linear", "gpt2")])
def test_weighted_adapter_is_lora_s(row, state, combination):
    model = two_adapters(row, state)
    twin = lora_twin(row, model)
    arguments = dict(adapters=["one", "two"], weights=[0.7, -0.4], adapter_name="mix", combination_type=combination)
    for m in (model, twin):
        torch.manual_seed(0)  # the dare types draw random masks, in the same order for both
        m.add_weighted_adapter(**arguments, density=0.5)
        m.set_adapter("mix")
    torch.testing.assert_close(output(model, row.inputs()), output(twin, row.inputs()), atol=1e-5, rtol=1e-4)
    tuner = model.base_model
    union = set(tuner.selection("one").selected) | set(tuner.selection("two").selected)
    assert model.peft_config["mix"].selected_layers == [c for c in tuner.candidate_layers("one") if c in union]


@pytest.mark.parametrize(("row", "state"), [p for p in MATRIX if p.values[0].name in ("conv1d", "llama")])
def test_weighted_cat_is_the_exact_weighted_sum(row, state):
    model = two_adapters(row, state)
    model.add_weighted_adapter(["one", "two"], [0.7, -0.4], "mix", combination_type="cat")
    for layer in (m for m in model.modules() if isinstance(m, ILALayer)):
        expected = sum(w * layer.get_delta_weight(n) for n, w in (("one", 0.7), ("two", -0.4)) if n in layer.ila_A)
        torch.testing.assert_close(layer.get_delta_weight("mix"), expected, atol=1e-6, rtol=1e-5)


def test_weighted_adapter_refusals():
    row = ROWS["llama"]
    model = two_adapters(row, "selected")
    with pytest.raises(ValueError, match="ILA: an adapter named 'one' exists already"):
        model.add_weighted_adapter(["one", "two"], [1, 1], "one")
    with pytest.raises(ValueError, match=r"ILA: add_weighted_adapter needs existing adapters .*\(unknown: \['six'\]\)"):
        model.add_weighted_adapter(["one", "six"], [1, 1], "mix")
    model.add_adapter("rank2", ILAConfig(r=2, selected_layers=row.mask))
    with pytest.raises(ValueError, match=r"ILA: combination_type='linear' needs adapters of one r \(got \[2, 4\]\)"):
        model.add_weighted_adapter(["one", "rank2"], [1, 1], "mix", combination_type="linear")
    with pytest.raises(ValueError, match="ILA: combination_type='mean' is not one of"):
        model.add_weighted_adapter(["one", "two"], [1, 1], "mix", combination_type="mean")
    q_only = ILAConfig(r=4, target_modules=["q_proj"], selected_layers=["model.layers.0.self_attn.q_proj"])
    model.add_adapter("q_only", q_only)
    with pytest.raises(ValueError, match="ILA: add_weighted_adapter combines adapters over the same candidate layers"):
        model.add_weighted_adapter(["one", "q_only"], [1, 1], "mix")
    assert "mix" not in model.peft_config


# --- bias -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", ["all", "ila_only"])
@pytest.mark.parametrize(("row", "state"), [p for p in MATRIX if p.values[0].name in ("linear", "conv1d", "gpt2")])
def test_bias_trains_saves_loads_and_exports_as_lora_s(row, state, bias, tmp_path):
    model = get_peft_model(row.build(), ila_config(row, state, bias=bias))
    trainable = {n.replace(".base_layer", "") for n, p in model.base_model.model.named_parameters() if p.requires_grad}
    every_bias = {n for n, _ in row.build().named_parameters() if n.endswith(".bias")}
    adapted = {n for n, m in model.base_model.model.named_modules() if isinstance(m, ILALayer)}
    wanted = every_bias if bias == "all" else {n for n in every_bias if n.removesuffix(".bias") in adapted}
    assert wanted and {n for n in trainable if n.endswith(".bias")} == wanted
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".bias") and p.requires_grad:
                p.add_(0.5)
    expected = output(model.eval(), row.inputs())
    model.save_pretrained(tmp_path / "ila")
    torch.testing.assert_close(output(PeftModel.from_pretrained(row.build(), tmp_path / "ila"), row.inputs()), expected)
    export_lora(tmp_path / "ila", tmp_path / "lora")
    as_lora = PeftModel.from_pretrained(row.build(), tmp_path / "lora")
    assert as_lora.peft_config["default"].bias == bias.replace("ila_", "lora_")
    torch.testing.assert_close(output(as_lora, row.inputs()), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(output(model.merge_and_unload(), row.inputs()), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="ILAModel supports only 1 adapter with bias"):
        get_peft_model(row.build(), ila_config(row, state, bias=bias)).add_adapter(
            "b", ila_config(row, state, bias=bias)
        )


def test_bias_of_unselected_layers_stops_training_after_selection():
    model = get_peft_model(tiny_gpt2(), ILAConfig(r=2, bias="ila_only", top_k=2, stage1_max_steps=2, stage2_steps=1))
    identify_important_layers(model, lm_batches(2), progress=False)
    kept = {n for n, m in model.base_model.model.named_modules() if isinstance(m, ILALayer)}
    trainable = {
        n.removesuffix(".base_layer.bias") for n, p in model.base_model.model.named_parameters() if p.requires_grad
    }
    assert {n for n in trainable if PREFIX not in n} == kept and len(kept) == 2


# --- the low-level API, transformers, PeftMixedModel, defaults ----------------------------------------------------


@pytest.mark.parametrize(("row", "state"), MATRIX)
def test_inject_adapter_in_model_and_state_dict_round_trip(row, state):
    expected = output(seeded(1, lambda: get_peft_model(row.build(), ila_config(row, state))).eval(), row.inputs())
    injected = seeded(1, lambda: inject_adapter_in_model(ila_config(row, state), row.build())).eval()
    torch.testing.assert_close(output(injected, row.inputs()), expected)
    state_dict = get_peft_model_state_dict(injected)
    assert "base_model.ila_layer_mask" in state_dict
    again = inject_adapter_in_model(ila_config(row, state), row.build()).eval()
    set_peft_model_state_dict(again, state_dict)
    torch.testing.assert_close(output(again, row.inputs()), expected)


def test_identification_of_an_injected_probe_refuses_naming_the_way():
    injected = inject_adapter_in_model(ILAConfig(r=2), tiny_llama())
    with pytest.raises(TypeError, match=r"ILA's identification .* need the PeftModel that get_peft_model"):
        identify_important_layers(injected, lm_batches(1), progress=False)


@pytest.mark.parametrize(("row", "state"), [p for p in MATRIX if p.values[0].lm])
def test_transformers_load_adapter_gives_peft_s_logits(row, state, tmp_path):
    row.build().save_pretrained(tmp_path / "base")
    get_peft_model(row.build(), ila_config(row, state)).save_pretrained(tmp_path / "adapter")
    expected = output(
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter"),
        row.inputs(),
    )
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    info = plain.load_adapter(str(tmp_path / "adapter"))
    assert not info.missing_keys and all("ila_layer_" in k for k in info.unexpected_keys)  # the mask travels too
    torch.testing.assert_close(output(plain.eval(), row.inputs()), expected)
    assert not torch.allclose(expected, output(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), row.inputs()))


def test_mixed_model_refuses_ila_naming_the_alternatives():
    with pytest.raises(ValueError, match=r"PeftMixedModel cannot hold ILA adapters.*peft-ila export-lora"):
        get_peft_model(tiny_llama(), ILAConfig(selected_layers=llama_candidates()[:1]), mixed=True)


def test_default_config_builds_on_a_single_target():
    model = get_peft_model(TinyMLP(), ILAConfig(target_modules=["lin0"]))
    assert model.base_model.candidate_layers() == ["lin0"]
    model.base_model.peft_config["default"].stage1_max_steps = 2
    model.base_model.peft_config["default"].stage2_steps = 1
    batches = [{"x": torch.randn(4, 10), "labels": torch.randint(0, 3, (4,))} for _ in range(2)]
    assert identify_important_layers(model, batches, progress=False).selected == ["lin0"]


def test_gate_logits_are_unsaved_state_not_a_parameter():
    model = get_peft_model(tiny_llama(), ILAConfig(r=2))
    bank = model.base_model.ila_gates["default"]
    assert "logits" not in dict(bank.named_parameters()) and "logits" not in bank.state_dict()
    with model.base_model.gate_stage() as staged:
        assert staged.logits.requires_grad and not any(p.requires_grad for p in adapter_params(model).values())
    assert not bank.logits.requires_grad and all(p.requires_grad for p in adapter_params(model).values())
