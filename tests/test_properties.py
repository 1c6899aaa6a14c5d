"""Property tests (hypothesis): config validation, top-k arithmetic, and a selection's round trip through its forms."""

import json
import math

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import get_peft_model

from conftest import tiny_llama
from peft_ila import ILAConfig, ILALayer, resolve_top_k
from peft_ila.tuner.selection import Selection

numbers = st.one_of(st.integers(-5, 5), st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none())


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# field -> the values it accepts (the rule in its help text)
ACCEPTS = {
    "r": lambda v: is_int(v) and v >= 1,
    "lora_alpha": lambda v: is_number(v) and v > 0,
    "lora_dropout": lambda v: is_number(v) and 0 <= v < 1,
    "top_k": lambda v: (is_int(v) and v >= 1) or (isinstance(v, float) and 0 < v <= 1),
    "stage1_max_steps": lambda v: is_int(v) and v >= 1,
    "stability_window": lambda v: is_int(v) and v >= 1,
    "stage2_steps": lambda v: is_int(v) and v >= 1,
    "stage1_lr": lambda v: is_number(v) and v > 0,
    "stability_epsilon": lambda v: is_number(v) and v > 0,
    "gate_lr": lambda v: is_number(v) and v > 0,
    "gate_init": lambda v: is_number(v) and 0 < v < 1,
    "sparsity_weight": lambda v: is_number(v) and v >= 0,
    "seed": is_int,
}


@given(field=st.sampled_from(sorted(ACCEPTS)), value=numbers)
def test_config_accepts_exactly_its_documented_domain(field, value):
    if ACCEPTS[field](value):
        assert getattr(ILAConfig(**{field: value}), field) == value
    else:
        with pytest.raises(ValueError, match=rf"ILAConfig\.{field}=.* is invalid: it must be"):
            ILAConfig(**{field: value})


@given(n=st.integers(1, 1000), fraction=st.floats(0, 1, exclude_min=True))
def test_fraction_top_k_is_the_nearest_count_and_at_least_one(n, fraction):
    k = resolve_top_k(fraction, n)
    assert 1 <= k <= n and abs(k - max(fraction * n, 1)) <= 0.5 + 1e-9


@given(n=st.integers(1, 1000), top_k=st.integers(-5, 1005))
def test_int_top_k_is_taken_as_is_or_refused(n, top_k):
    if 1 <= top_k <= n:
        assert resolve_top_k(top_k, n) == top_k
    else:
        with pytest.raises(ValueError, match=rf"use an int in \[1, {n}\]"):
            resolve_top_k(top_k, n)


@settings(max_examples=15)
@given(
    layers=st.integers(1, 3),
    granularity=st.sampled_from(["module", "block"]),
    top_k=st.one_of(st.integers(1, 21), st.floats(0.01, 1)),
)
def test_top_k_layers_carry_adapters_at_either_granularity(layers, granularity, top_k):
    n = 7 * layers if granularity == "module" else layers
    try:
        k = resolve_top_k(top_k, n)
    except ValueError:
        with pytest.raises(ValueError, match="top_k"):
            get_peft_model(tiny_llama(layers=layers), ILAConfig(r=2, top_k=top_k, granularity=granularity))
        return
    model = get_peft_model(tiny_llama(layers=layers), ILAConfig(r=2, top_k=top_k, granularity=granularity))
    candidates = model.base_model.candidate_layers()
    assert len(candidates) == n
    model.base_model.select_layers(candidates[-k:])
    adapted = [name for name, m in model.base_model.model.named_modules() if isinstance(m, ILALayer)]
    assert len(adapted) == (k if granularity == "module" else 7 * k)
    assert all(any(name == c or name.startswith(c + ".") for c in candidates[-k:]) for name in adapted)


names = st.lists(
    st.text(st.characters(exclude_characters="\n", exclude_categories=["Cs"]), min_size=1, max_size=40),
    min_size=1,
    unique=True,
)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), candidates=names)
def test_a_selection_round_trips_through_every_form(data, candidates):
    chosen = data.draw(st.lists(st.sampled_from(candidates), unique=True, min_size=1))
    scored = data.draw(st.lists(st.sampled_from(candidates), unique=True))
    scores = {name: data.draw(st.floats(0, 1)) for name in scored}
    sure = {name: data.draw(st.floats(0, 1)) for name in data.draw(st.lists(st.sampled_from(candidates), unique=True))}
    selection = Selection(tuple(candidates), tuple(chosen), scores, confidence=sure)
    assert selection.scores == {n: float(torch.tensor(s, dtype=torch.float32)) for n, s in scores.items()}
    tensors = safetensors.torch.load(safetensors.torch.save(selection.to_tensors()))
    from_tensors = Selection.from_tensors(tensors)
    from_json = Selection.from_json(json.loads(json.dumps(selection.to_json())))
    assert from_json == selection  # the JSON form keeps everything, the ranking included
    assert from_tensors.differences(selection) == [] and from_tensors.candidates == tuple(candidates)
    assert set(from_tensors.selected) == set(chosen)  # the tensors keep the set, not its order
    if not scores or set(chosen) <= set(scores):  # a config needs a score for every selected layer, or none
        config = ILAConfig(**selection.config_fields())
        assert config.selected_layers == list(chosen) and (config.layer_scores or {}) == selection.scores
    assert [n for n in selection.ranking if n not in chosen] == sorted(
        set(candidates) - set(chosen), key=lambda n: (-selection.scores.get(n, -1.0), candidates.index(n))
    )


def test_layer_names_that_cannot_round_trip_are_refused():
    for bad in (["a\nb"], ["a", ""], ["a", "a"], []):
        with pytest.raises(ValueError, match=r"Selection\.candidates=.* is invalid"):
            Selection(tuple(bad), ("a",))
    with pytest.raises(ValueError, match=r"Selection\.scores=.* is invalid"):
        Selection(("a",), ("a",), {"a": 1.5})
    with pytest.raises(ValueError, match=r"Selection\.selected names 1 layer"):
        Selection(("a",), ("b",))
