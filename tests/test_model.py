"""The tuner: probe and selected states, GPT-2 Conv1D, a plain MLP, and the PEFT contract."""

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

from conftest import TinyMLP, llama_candidates, lm_batches, snapshot, tiny_gpt2, tiny_llama
from peft_ila import ILAConfig, ILALayer, ILAModel, identify_important_layers


def ila_layers(model):
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, ILALayer)}


def randomize(model, seed=1):
    """Give every adapter a non-zero update (what training would do)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ila_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_probe_state_wraps_every_candidate_with_a_gate(llama):
    model = get_peft_model(llama, ILAConfig(r=4))
    layers = ila_layers(model)
    assert list(layers) == llama_candidates() == model.base_model.candidate_layers()
    bank = model.base_model.ila_gates["default"]
    assert bank.logits.shape == (28,) and not bank.logits.requires_grad
    assert sorted(m.gate_index["default"] for m in layers.values()) == list(range(28))


def test_probe_state_forward_equals_base_until_trained(llama, inputs):
    expected = llama(**inputs).logits
    model = get_peft_model(llama, ILAConfig(r=4))
    torch.testing.assert_close(model(**inputs).logits, expected)


def test_gate_scales_the_update(llama, inputs):
    model = get_peft_model(llama, ILAConfig(r=4, init_weights=False))
    bank = model.base_model.ila_gates["default"]
    with_updates = model(**inputs).logits
    bank.active = True
    with torch.no_grad():
        bank.logits.fill_(-1e4)  # every gate closed: the base model
    with model.disable_adapter():
        base = model(**inputs).logits
    torch.testing.assert_close(model(**inputs).logits, base)
    with torch.no_grad():
        bank.logits.fill_(1e4)  # every gate open: same as ungated
    torch.testing.assert_close(model(**inputs).logits, with_updates)


def test_selected_state_wraps_exactly_k_and_leaves_the_rest_identical(llama):
    originals = dict(llama.named_modules())
    before = snapshot(llama)
    selected = ["model.layers.0.mlp.down_proj", "model.layers.3.self_attn.q_proj", "model.layers.2.mlp.up_proj"]
    model = get_peft_model(llama, ILAConfig(r=4))
    model.base_model.select_layers(selected, {n: 0.5 for n in llama_candidates()})
    assert sorted(ila_layers(model)) == sorted(selected)
    assert "default" not in model.base_model.ila_gates
    for name, module in model.base_model.model.named_modules():
        if name in selected or any(name.startswith(s + ".") for s in selected):
            continue
        assert module is originals[name], name  # the base model's own object
    after = {k.replace(".base_layer", ""): v for k, v in model.base_model.model.state_dict().items() if "ila_" not in k}
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 6 and all(".ila_" in n for n in trainable)
    assert all(m.gate("default") is None for m in ila_layers(model).values())


def test_selected_layers_in_config_inject_only_there(llama):
    selected = ["model.layers.1.self_attn.v_proj", "model.layers.2.mlp.gate_proj"]
    model = get_peft_model(llama, ILAConfig(r=4, selected_layers=selected))
    assert sorted(ila_layers(model)) == sorted(selected)
    assert "default" not in model.base_model.ila_gates
    assert model.get_nb_trainable_parameters()[0] == 4 * (32 + 16) + 4 * (32 + 64)  # v_proj: 32 -> 16


def test_block_granularity_has_one_gate_per_block(llama):
    model = get_peft_model(llama, ILAConfig(r=2, granularity="block"))
    tuner = model.base_model
    assert tuner.candidate_layers() == [f"model.layers.{i}" for i in range(4)]
    indices = {n: m.gate_index["default"] for n, m in ila_layers(model).items()}
    assert all(indices[n] == int(n.split(".")[2]) for n in indices)
    tuner.select_layers(["model.layers.2"])
    assert sorted(ila_layers(model)) == sorted(n for n in llama_candidates() if n.startswith("model.layers.2."))


def test_gpt2_conv1d(inputs):
    base = tiny_gpt2()
    expected = base(**inputs).logits
    model = get_peft_model(base, ILAConfig(r=4, init_weights=False))
    layers = ila_layers(model)
    assert {n.split(".")[-1] for n in layers} == {"c_attn", "c_proj", "c_fc"}
    assert all(m.fan_in_fan_out for m in layers.values())
    out = model(**inputs).logits
    assert not torch.allclose(out, expected)
    merged = model.merge_and_unload()
    torch.testing.assert_close(merged(**inputs).logits, out, atol=1e-5, rtol=1e-5)


def test_plain_mlp_with_modules_to_save():
    mlp = TinyMLP()
    x = torch.randn(8, 10)
    model = get_peft_model(mlp, ILAConfig(r=2, target_modules=["lin0", "lin1"], modules_to_save=["head"], top_k=1))
    assert sorted(ila_layers(model)) == ["lin0", "lin1"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("modules_to_save.default" in n for n in trainable)
    batches = [{"x": torch.randn(16, 10), "labels": torch.randint(0, 3, (16,))} for _ in range(4)]
    model.base_model.peft_config["default"].stage1_max_steps = 5
    model.base_model.peft_config["default"].stage2_steps = 3
    result = identify_important_layers(model, batches, progress=False)
    assert len(result.selected) == 1 and result.stage1.tokens == 5 * 16
    assert model(x).logits.shape == (8, 3)


def test_merge_unload_and_disable(llama, inputs):
    base_out = llama(**inputs).logits
    model = get_peft_model(llama, ILAConfig(r=4, init_weights=False, selected_layers=llama_candidates()[:5]))
    out = model(**inputs).logits
    assert not torch.allclose(out, base_out)
    with model.disable_adapter():
        torch.testing.assert_close(model(**inputs).logits, base_out)
    model.merge_adapter()
    torch.testing.assert_close(model(**inputs).logits, out, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(model(**inputs).logits, out)
    merged = model.merge_and_unload(safe_merge=True)
    assert not any(isinstance(m, ILALayer) for m in merged.modules())
    torch.testing.assert_close(merged(**inputs).logits, out, atol=1e-5, rtol=1e-5)


def test_unload_restores_the_base(llama, inputs):
    base_out = llama(**inputs).logits
    model = get_peft_model(llama, ILAConfig(r=4, init_weights=False))
    unloaded = model.unload()
    assert not any(isinstance(m, ILALayer) for m in unloaded.modules())
    torch.testing.assert_close(unloaded(**inputs).logits, base_out)


def test_multiple_adapters(llama, inputs):
    cands = llama_candidates()
    model = get_peft_model(llama, ILAConfig(r=4, init_weights=False, selected_layers=cands[:3]), adapter_name="first")
    out_a = model(**inputs).logits
    model.add_adapter("second", ILAConfig(r=2, init_weights=False, selected_layers=cands[2:6]))
    assert model.active_adapters == ["first"]
    torch.testing.assert_close(model(**inputs).logits, out_a)
    model.set_adapter("second")
    out_b = model(**inputs).logits
    assert not torch.allclose(out_a, out_b)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".second." in n for n in trainable)
    model.delete_adapter("first")
    assert sorted(ila_layers(model)) == sorted(cands[2:6])  # layers only "first" used are plain modules again
    torch.testing.assert_close(model(**inputs).logits, out_b)
    assert list(model.peft_config) == ["second"]


def test_probe_adapter_beside_a_selected_one(llama):
    cands = llama_candidates()
    model = get_peft_model(llama, ILAConfig(r=4, selected_layers=cands[:2]), adapter_name="kept")
    model.add_adapter("probe", ILAConfig(r=2, top_k=3))
    model.set_adapter("probe")
    model.base_model.select_layers(cands[1:4], adapter_name="probe")
    layers = ila_layers(model)
    assert sorted(layers) == sorted(cands[:4])
    assert set(layers[cands[1]].ila_A) == {"kept", "probe"}
    assert set(layers[cands[0]].ila_A) == {"kept"} and set(layers[cands[3]].ila_A) == {"probe"}
    assert layers[cands[0]].active_adapters == ["probe"]  # activity is the model's choice, not changed by selecting


def test_inference_mode_freezes(llama):
    model = get_peft_model(llama, ILAConfig(r=4, inference_mode=True))
    assert not any(p.requires_grad for p in model.parameters())


def test_training_touches_only_adapters(llama):
    model = get_peft_model(llama, ILAConfig(r=4, selected_layers=llama_candidates()[::5]))
    before = snapshot(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for batch in lm_batches(2):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".ila_" in k for k in changed)
    assert any(".ila_A." in k for k in changed) and any(".ila_B." in k for k in changed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_dtypes(dtype, inputs):
    base = tiny_llama().to(dtype)
    model = get_peft_model(base, ILAConfig(r=4, init_weights=False))
    out = model(**inputs).logits
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if ".ila_" in n)  # autocast to fp32
    model.base_model.select_layers(llama_candidates()[:4])
    assert model(**inputs).logits.dtype == dtype


def test_low_cpu_mem_usage_probe_state(llama, inputs, tmp_path):
    model = get_peft_model(llama, ILAConfig(r=4))
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, low_cpu_mem_usage=True)
    assert not any(p.is_meta for p in loaded.parameters())
    assert isinstance(loaded.base_model, ILAModel) and loaded.base_model.ila_gates["default"].logits.shape == (28,)
    torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits)


def test_unsupported_target_raises(llama):
    with pytest.raises(ValueError, match=r"cannot adapt.*embed_tokens"):
        get_peft_model(llama, ILAConfig(target_modules=["embed_tokens", "q_proj"]))
    with pytest.raises(ValueError, match=r"matches no module.*model\.layers\.0\.self_attn\.q_proj"):
        get_peft_model(tiny_llama(), ILAConfig(target_modules=["nonexistent"]))


def test_top_k_checked_before_any_work(llama):
    with pytest.raises(ValueError, match=r"use an int in \[1, 28\]"):
        get_peft_model(llama, ILAConfig(top_k=29))
    assert not any(isinstance(m, ILALayer) for m in llama.modules())


def test_select_layers_rejects_unknown_names(llama):
    model = get_peft_model(llama, ILAConfig(r=2))
    with pytest.raises(ValueError, match=r"not candidates: model\.layers\.9\.mlp\.up_proj"):
        model.base_model.select_layers(["model.layers.9.mlp.up_proj"])
    for bad in ([], llama_candidates()[:1] * 2):
        with pytest.raises(ValueError, match="non-empty list of distinct layer names"):
            model.base_model.select_layers(bad)
    model.base_model.select_layers(llama_candidates()[:1])
    with pytest.raises(ValueError, match="already has selected layers"):
        model.base_model.select_layers(llama_candidates()[:1])


def test_nn_linear_identity_after_selection_is_plain_linear(llama):
    model = get_peft_model(llama, ILAConfig(r=2))
    model.base_model.select_layers(llama_candidates()[:1])
    q1 = model.base_model.model.model.layers[1].self_attn.q_proj
    assert type(q1) is nn.Linear
