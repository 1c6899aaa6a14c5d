"""`ILAConfig`: the adapter shape, the layer selection, the identification budget and its result."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig
from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from safetensors import safe_open

from ._peft_compat import ILA
from .selection import FieldError, ILALoadError, check_layer_names, check_scores

GRANULARITIES = ("module", "block")
BIASES = ("none", "all", "ila_only")  # LoRA's choices, with ILA's prefix (peft's BaseTuner reads `bias`)
BUDGET_RESOURCES = ("time", "memory")  # what a cost-aware selection can budget (peft_ila.identification.cost)
ESTIMATOR_NAMES = ("gates", "update-norm", "first-order")  # implemented in peft_ila.identification.estimators


def resolve_top_k(top_k: int | float, n_candidates: int, field: str = "top_k", owner: str = "ILAConfig") -> int:
    """Number of layers kept: an int is taken as is, a fraction f of n candidates means round(f * n), halves up,
    and at least 1 (a fraction never selects nothing: 0.25 of a single candidate keeps it).

    Raises `FieldError` (naming `owner.field`, the setting `top_k` came from) when an int is not in [1, n_candidates],
    and naming `target_modules` when there is no candidate.
    """
    if n_candidates < 1:
        raise FieldError("target_modules", "gives ILA no candidate layers; check it.")
    if isinstance(top_k, float):
        return max(1, math.floor(top_k * n_candidates + 0.5))
    if not 1 <= top_k <= n_candidates:
        raise FieldError(
            field,
            f"but the model has {n_candidates} candidate layers; use an int in [1, {n_candidates}] or a fraction in "
            "(0, 1].",
            top_k,
            owner,
        )
    return top_k


def parse_budget(budget: str) -> tuple[str, float]:
    """A selection budget "time:0.6" or "memory:0.5" as (resource, fraction of adapting every layer's cost).

    Raises `FieldError` (a `ValueError`) naming the accepted form."""
    resource, _, number = str(budget).partition(":")
    try:
        fraction = float(number)
    except ValueError:
        fraction = math.nan
    if resource not in BUDGET_RESOURCES or not 0 < fraction <= 1:
        raise FieldError(
            "budget",
            "is invalid: it must be 'time:F' or 'memory:F' with F in (0, 1], the share of the step time or of the "
            "activation memory of adapting every candidate layer (e.g. 'time:0.6').",
            budget,
        )
    return resource, fraction


# what `ILAConfig.run_settings` leaves out: the selection itself, where the adapter came from, and peft's type
_NOT_RUN_SETTINGS = (
    "selected_layers",
    "layer_scores",
    "layer_confidence",
    "provenance",
    "base_model_name_or_path",
    "revision",
    "peft_type",
    "auto_mapping",
)


@dataclass
class ILAConfig(PeftConfig):
    """Configuration of an [`ILAModel`]: LoRA adapters placed only on the layers that ILA finds important.

    Paper: Shi et al., "Understanding Layer Significance in LLM Alignment", https://arxiv.org/abs/2410.17875.
    Without `selected_layers` the model starts in the *probe* state (gated adapters on every candidate layer) and
    `identify_important_layers` fills `selected_layers` and `layer_scores`; with them, adapters go only there.
    """

    # Adapter shape
    r: int = field(default=8, metadata={"help": "LoRA rank of each adapter (int >= 1)."})
    lora_alpha: float = field(default=16, metadata={"help": "LoRA scaling numerator: update = B @ A * lora_alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input, in [0, 1)."})
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": (
                "Candidate modules: a list of names or name suffixes (e.g. ['q_proj', 'v_proj']), a regex, or "
                "'all-linear'. None means 'all-linear'. Only nn.Linear and transformers' Conv1D can be adapted."
            )
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Names, suffixes or a regex of modules never to adapt."}
    )
    bias: Literal["none", "all", "ila_only"] = field(
        default="none",
        metadata={
            "help": (
                "Biases that train and are saved with the adapter, as LoRA's `bias`: 'none', 'all' (every bias of "
                "the model) or 'ila_only' (the biases of the layers that carry adapters). Merging keeps them."
            )
        },
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={"help": "Modules besides the adapters to train fully and save, e.g. a classifier head ['score']."},
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": (
                "True: A Kaiming-uniform, B zero, so a fresh adapter changes nothing. False: B random too (tests only)."
            )
        },
    )

    # Selection
    top_k: int | float = field(
        default=0.25,
        metadata={
            "help": (
                "How many layers keep adapters: an int >= 1, or a fraction in (0, 1] of the candidate layers "
                "(rounded half up, at least 1). 0.75 is the paper's 'freeze the least important 25%'. Ignored when "
                "`selected_layers` is given: those are taken as they are."
            )
        },
    )
    budget: str | None = field(
        default=None,
        metadata={
            "help": (
                "Cost-aware selection: 'time:F' or 'memory:F' keeps the `top_k` most important layers whose fine-tune "
                "is predicted to cost at most F times the step time (or the activation memory) of adapting every "
                "candidate. Backward stops at the lowest adapted block, so this bounds how low the selection may "
                "reach; the cost model is measured on the probe model after scoring. None: plain top-k. Ignored "
                "when `selected_layers` is given."
            )
        },
    )
    granularity: Literal["module", "block"] = field(
        default="module",
        metadata={
            "help": (
                "'module': each adapted weight matrix is a layer (as in the paper), e.g. 'model.layers.7.self_attn"
                ".q_proj'. 'block': one gate per transformer block, e.g. 'model.layers.7' (the name up to its first "
                "numeric part)."
            )
        },
    )

    # Identification budget
    stage1_max_steps: int = field(
        default=128,
        metadata={"help": "Stage 1 steps: adapters train this many steps, or until epsilon-stable if that test is on."},
    )
    stage1_lr: float = field(default=1e-3, metadata={"help": "Stage 1 AdamW learning rate of the adapters."})
    stability_epsilon: float = field(
        default=0.0,
        metadata={
            "help": (
                "Stage 1 is epsilon-stable (and ends) when the mean loss of the last `stability_window` steps differs "
                "from the mean of the window before by less than this fraction of it. 0 (default) turns the test off; "
                "the paper's rule is e.g. 0.01, which on small batches stops each seed at a different step."
            )
        },
    )
    stability_window: int = field(default=20, metadata={"help": "Steps per window of the stability test (>= 1)."})
    stage2_steps: int = field(
        default=32, metadata={"help": "Steps of the estimator's stage (batches of gate gradients; >= 1)."}
    )
    estimator: str = field(
        default="first-order",
        metadata={
            "help": (
                "How layers are scored after stage 1: 'first-order' (default: mean -dL/dgate at gate = `gate_init` "
                "over `stage2_steps` steps, nothing trained), 'gates' (the paper's stage 2: learned gates), "
                "'update-norm' (||dW|| after stage 1, no stage 2). Scores are in [0, 1], higher is more important."
            )
        },
    )
    gate_lr: float = field(default=0.1, metadata={"help": "Stage 2 Adam learning rate of the gate logits (> 0)."})
    gate_init: float = field(
        default=0.5,
        metadata={
            "help": "Gate value every layer starts stage 2 with (for 'first-order': where it is measured), in (0, 1)."
        },
    )
    sparsity_weight: float = field(
        default=0.5,
        metadata={"help": "Stage 2 loss = task loss + sparsity_weight * mean(gates); >= 0. Higher closes more gates."},
    )
    keep_stage1_weights: bool = field(
        default=False,
        metadata={"help": "After selection keep the kept adapters' stage 1 weights instead of re-initialising them."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the identification run (data order is the caller's)."})

    # Result (filled by identification, or by hand to reuse a mask)
    selected_layers: list[str] | None = field(
        default=None,
        metadata={
            "help": (
                "The important layers: set, adapters go only there and no identification is needed. None: probe "
                "state, adapters and gates on every candidate until `identify_important_layers` selects."
            )
        },
    )
    layer_scores: dict[str, float] | None = field(
        default=None,
        metadata={
            "help": "Score in [0, 1] of each candidate layer, as found by identification (by the config's `estimator`)."
        },
    )
    layer_confidence: dict[str, float] | None = field(
        default=None,
        metadata={
            "help": (
                "How sure each layer's membership in the selection is, in [0, 1]: the fraction of bootstrap "
                "resamples of the estimator's stage that agree (filled by identification)."
            )
        },
    )
    provenance: dict | None = field(
        default=None,
        metadata={
            "help": (
                "Where the selection came from (filled by identification): the estimator and its settings, the base "
                "model's identity (architecture and weights SHA-256) and a fingerprint of the data it read."
            )
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = ILA
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        self._validate()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs):
        """Load the config of a saved adapter. Its directory's weights are checked first (this runs before peft
        touches the model): a pickle alone is refused, and so is a damaged or truncated safetensors file."""
        path = os.path.join(pretrained_model_name_or_path, subfolder or "")
        has = lambda name: os.path.isfile(os.path.join(path, name))  # noqa: E731
        if os.path.isdir(path) and has(WEIGHTS_NAME) and not has(SAFETENSORS_WEIGHTS_NAME):
            raise ILALoadError(
                f"{path} holds {WEIGHTS_NAME} (a pickle) but no {SAFETENSORS_WEIGHTS_NAME}; peft-ila loads weights "
                "only from safetensors. Re-save the adapter with save_pretrained(dir) (safe_serialization=True)."
            )
        if has(SAFETENSORS_WEIGHTS_NAME):
            weights = os.path.join(path, SAFETENSORS_WEIGHTS_NAME)
            try:
                with safe_open(weights, framework="pt"):  # parses the header, checks that the data cover the file
                    pass
            except Exception as exc:
                raise ILALoadError(
                    f"{weights} is damaged or truncated ({str(exc).splitlines()[0]}); save the adapter again."
                ) from None
        return super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)

    def run_settings(self) -> dict:
        """The fields that decide how layers are found and trained, as plain JSON (sets as sorted lists): `to_dict()`
        without the selection (`selected_layers`, `layer_scores`), where the adapter came from, and peft's type."""
        return {
            k: sorted(v) if isinstance(v, set) else getattr(v, "value", v)
            for k, v in self.to_dict().items()
            if k not in _NOT_RUN_SETTINGS
        }

    def _validate(self) -> None:
        self._validate_settings()
        self._validate_selection()

    def _bad(self, name: str, allowed: str) -> FieldError:
        return FieldError(name, f"is invalid: it must be {allowed}.", getattr(self, name))

    def _validate_settings(self) -> None:
        """Adapter shape, top-k and the identification budget."""
        bad = self._bad
        if not _is_int(self.r) or self.r < 1:
            raise bad("r", "an int >= 1")
        if not _is_number(self.lora_alpha) or self.lora_alpha <= 0:
            raise bad("lora_alpha", "a number > 0")
        if not _is_number(self.lora_dropout) or not 0 <= self.lora_dropout < 1:
            raise bad("lora_dropout", "a number in [0, 1)")
        for name in ("init_weights", "keep_stage1_weights"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "True or False")
        if not ((_is_int(self.top_k) and self.top_k >= 1) or (isinstance(self.top_k, float) and 0 < self.top_k <= 1)):
            raise bad("top_k", "an int >= 1 or a fraction in (0, 1]")
        if self.budget is not None:
            try:
                parse_budget(self.budget)
            except ValueError:
                raise bad("budget", "None, or 'time:F' or 'memory:F' with F in (0, 1] (e.g. 'time:0.6')") from None
        if self.bias not in BIASES:
            raise bad("bias", " or ".join(repr(b) for b in BIASES))
        if self.granularity not in GRANULARITIES:
            raise bad("granularity", "'module' or 'block'")
        for name in ("stage1_max_steps", "stability_window", "stage2_steps"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise bad(name, "an int >= 1")
        for name in ("stage1_lr", "gate_lr"):
            if not _is_number(getattr(self, name)) or getattr(self, name) <= 0:
                raise bad(name, "a number > 0")
        if not _is_number(self.stability_epsilon) or self.stability_epsilon < 0:
            raise bad("stability_epsilon", "a number >= 0 (0: no stability test)")
        if self.estimator not in ESTIMATOR_NAMES:
            raise bad("estimator", " or ".join(repr(name) for name in ESTIMATOR_NAMES))
        if not _is_number(self.gate_init) or not 0 < self.gate_init < 1:
            raise bad("gate_init", "a number in (0, 1)")
        if not _is_number(self.sparsity_weight) or self.sparsity_weight < 0:
            raise bad("sparsity_weight", "a number >= 0")
        if not _is_int(self.seed):
            raise bad("seed", "an int")

    def _validate_selection(self) -> None:
        """`selected_layers`, `layer_scores` and `layer_confidence` (float32 values, as the saved tensors hold them),
        `provenance`."""
        if self.selected_layers is not None:
            self.selected_layers = check_layer_names(self.selected_layers, "selected_layers")
        if self.layer_scores is not None:
            self.layer_scores = check_scores(self.layer_scores, "layer_scores")
            if self.selected_layers is not None and not set(self.selected_layers) <= set(self.layer_scores):
                missing = sorted(set(self.selected_layers) - set(self.layer_scores))[:3]
                raise FieldError(
                    "selected_layers",
                    f"names layers without a score in layer_scores (e.g. {missing}); give a score for every selected "
                    "layer or leave layer_scores None.",
                )
        if self.layer_confidence is not None:
            self.layer_confidence = check_scores(self.layer_confidence, "layer_confidence")
        if self.provenance is not None and not isinstance(self.provenance, dict):
            raise self._bad("provenance", "None or a dict")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
