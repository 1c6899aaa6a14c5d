"""ILAConfig validation, top-k arithmetic and JSON round trip."""

import json

import pytest
from peft import PeftConfig

from peft_ila import ILAConfig, resolve_top_k

INVALID = [
    ("r", 0),
    ("r", 2.5),
    ("r", True),
    ("lora_alpha", 0),
    ("lora_alpha", -1),
    ("lora_alpha", float("nan")),
    ("lora_dropout", -0.1),
    ("lora_dropout", 1.0),
    ("init_weights", "gaussian"),
    ("top_k", 0),
    ("top_k", -3),
    ("top_k", 0.0),
    ("top_k", 1.5),
    ("top_k", True),
    ("top_k", "25%"),
    ("granularity", "layer"),
    ("stage1_max_steps", 0),
    ("stability_window", 0),
    ("stage2_steps", 0),
    ("stage2_steps", 1.0),
    ("stage1_lr", 0),
    ("stability_epsilon", -1e-3),
    ("gate_lr", -0.1),
    ("gate_init", 0),
    ("gate_init", 1),
    ("sparsity_weight", -1),
    ("keep_stage1_weights", 1),
    ("seed", 1.5),
    ("selected_layers", []),
    ("selected_layers", ["a", "a"]),
    ("selected_layers", [""]),
    ("selected_layers", "a"),
    ("layer_scores", {"a": 1.5}),
    ("layer_scores", {"a": -0.1}),
    ("layer_scores", ["a"]),
]


@pytest.mark.parametrize(("field", "value"), INVALID)
def test_invalid_value_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"ILAConfig\.{field}=.*must be"):
        ILAConfig(**{field: value})


def test_selected_layers_need_scores_when_scores_given():
    with pytest.raises(ValueError, match="without a score"):
        ILAConfig(selected_layers=["a", "b"], layer_scores={"a": 0.9})


def test_defaults_are_valid_and_typed():
    config = ILAConfig()
    assert config.peft_type == "ILA"
    assert config.top_k == 0.25 and config.granularity == "module" and config.selected_layers is None


@pytest.mark.parametrize(
    ("top_k", "n", "k"),
    [
        (0.25, 28, 7),
        (0.75, 28, 21),
        (1.0, 28, 28),
        (0.25, 210, 53),
        (0.75, 210, 158),
        (3, 28, 3),
        (28, 28, 28),
        (0.5, 1, 1),
        (0.02, 28, 1),
        (0.01, 28, 1),  # a fraction keeps at least one layer
        (0.25, 1, 1),
    ],
)
def test_resolve_top_k(top_k, n, k):
    assert resolve_top_k(top_k, n) == k


@pytest.mark.parametrize(
    ("top_k", "n", "message"), [(29, 28, r"\[1, 28\]"), (0, 28, r"\[1, 28\]"), (3, 0, "no candidate")]
)
def test_resolve_top_k_errors(top_k, n, message):
    with pytest.raises(ValueError, match=message):
        resolve_top_k(top_k, n)


def test_json_round_trip(tmp_path):
    config = ILAConfig(
        r=4,
        top_k=3,
        target_modules=["q_proj", "v_proj"],
        selected_layers=["x.q_proj", "x.v_proj"],
        layer_scores={"x.q_proj": 0.9, "x.v_proj": 0.8, "x.k_proj": 0.1},
        granularity="module",
    )
    config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "ILA" and data["selected_layers"] == ["x.q_proj", "x.v_proj"]
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, ILAConfig)
    assert loaded.top_k == 3 and isinstance(loaded.top_k, int)
    assert loaded.target_modules == {"q_proj", "v_proj"}
    assert loaded.selected_layers == config.selected_layers and loaded.layer_scores == config.layer_scores


def test_command_line_defaults_are_the_config_defaults():
    import dataclasses

    from peft_ila.app.args import FLAGS, parser

    identify = parser()._subparsers._group_actions[0].choices["identify"]
    defaults = {action.option_strings[0]: action.default for action in identify._actions if action.option_strings}
    fields = {f.name: f.default for f in dataclasses.fields(ILAConfig)}
    by_design = {"top_k": None, "target_modules": "all-linear", "selected_layers": None}  # None: the config's own
    compared = [name for name, flag in FLAGS.items() if flag in defaults]
    assert len(compared) >= 13, compared
    for name in compared:
        assert defaults[FLAGS[name]] == by_design.get(name, fields[name]), FLAGS[name]


def test_command_line_options_of_config_fields_carry_the_fields_help():
    from peft_ila.app.args import CONFIG_OPTIONS, parser

    identify = parser()._subparsers._group_actions[0].choices["identify"]
    helps = {action.dest: action.help for action in identify._actions}
    options = [field for group in CONFIG_OPTIONS.values() for field, _, _ in group]
    assert len(options) == 15 and {"gate_init", "budget", "keep_stage1_weights"} <= set(options)
    for field in options:
        first_words = ILAConfig.__dataclass_fields__[field].metadata["help"].split("`")[0]
        assert helps[field].startswith(first_words.replace("%", "%%")), field
        assert helps[field].endswith("(default: %(default)s)")


def test_a_config_error_carries_its_field_and_the_command_line_names_the_option():
    from peft_ila import FieldError
    from peft_ila.app.args import usage_error

    with pytest.raises(FieldError) as caught:
        ILAConfig(top_k=0)
    assert (caught.value.field, caught.value.value, caught.value.owner) == ("top_k", 0, "ILAConfig")
    assert str(caught.value) == "ILAConfig.top_k=0 is invalid: it must be an int >= 1 or a fraction in (0, 1]."
    assert str(usage_error(caught.value)) == "--top-k 0 is invalid: it must be an int >= 1 or a fraction in (0, 1]."
    assert str(usage_error(FieldError("target_modules", "matches nothing.", {"b", "a"}))) == (
        "--target-modules a,b matches nothing."
    )
    other = FieldError("active", "is too large.", 9, owner="LayerwiseConfig")  # no option of its own: as it is
    assert str(usage_error(other)) == "LayerwiseConfig.active=9 is too large."
