"""`Selection`: which candidate layers carry adapters, their scores, and where they came from.

A *layer* is what ILA scores: a module name such as `model.layers.7.self_attn.q_proj` (granularity "module") or a
block name such as `model.layers.7` (granularity "block"). A selection is validated here and only here; every other
form derives from it: the config's `selected_layers` / `layer_scores` / `provenance` (`config_fields`), the three mask
tensors in `adapter_model.safetensors` and a run's `mask.safetensors` (`to_tensors`), and a run's `importance.json`
(`to_json`). Scores are kept as float32 values (what the tensors hold), so every form compares exactly.

The tensors cover the ordered list of candidate layers:

- `base_model.ila_layer_names`: uint8 [n_bytes], the UTF-8 bytes of the candidate names joined by newlines;
- `base_model.ila_layer_mask`: bool [n_candidates], True where the layer carries an adapter;
- `base_model.ila_layer_scores`: float32 [n_candidates], the score in [0, 1] of the estimator, NaN where
  none is known;
- `base_model.ila_layer_confidence`: float32 [n_candidates], how sure each layer's membership in the selection is (the
  fraction of bootstrap resamples that agree), NaN where none is known; absent from files of peft-ila before it.
"""

from __future__ import annotations

import copy
import hashlib
import math
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from .sharding import full

NAMES_KEY = "base_model.ila_layer_names"
MASK_KEY = "base_model.ila_layer_mask"
SCORES_KEY = "base_model.ila_layer_scores"
CONFIDENCE_KEY = "base_model.ila_layer_confidence"
MASK_KEYS = (NAMES_KEY, MASK_KEY, SCORES_KEY)  # required
SAVED_KEYS = (*MASK_KEYS, CONFIDENCE_KEY)  # everything a selection writes into a weights file
CERTAIN = 0.9  # a layer is "certain" when at least this share of the bootstrap resamples agree on its membership


class ILALoadError(ValueError):
    """A saved ILA adapter does not fit the model it is loaded into, or its files disagree with each other."""


_NO_VALUE = object()


class FieldError(ValueError):
    """A value of one field of a config (`owner`, e.g. "ILAConfig") that cannot be used: `field` names it, `value` is
    the value given (absent when the problem is not one value), `problem` says what is wrong and what helps. Shown as
    "ILAConfig.top_k=0 is invalid: ..."; a command line shows the option behind the field instead."""

    def __init__(self, field: str, problem: str, value: object = _NO_VALUE, owner: str = "ILAConfig") -> None:
        self.field, self.problem, self.value, self.owner = field, problem, value, owner
        shown = "" if value is _NO_VALUE else f"={value!r}"
        super().__init__(f"{owner}.{field}{shown} {problem}")

    @property
    def has_value(self) -> bool:
        return self.value is not _NO_VALUE


_FIRST_INDEX = re.compile(r"^(.*?(?:^|\.)\d+)(?:\.|$)")


def layer_of(module_name: str, granularity: str) -> str:
    """The layer a module belongs to: itself, or for "block" its name up to its first numeric part."""
    if granularity == "module":
        return module_name
    match = _FIRST_INDEX.match(module_name)
    return match.group(1) if match else module_name


def as_float32(value: float) -> float:
    """`value` rounded to the nearest float32, as a Python float (what a float32 tensor gives back)."""
    return struct.unpack("f", struct.pack("f", value))[0]


def check_layer_names(names: object, field: str, owner: str = "ILAConfig") -> list[str]:
    """`names` as a list, or a `FieldError` naming `owner.field` (e.g. ILAConfig.selected_layers) unless it is a
    non-empty sequence of distinct non-empty names without newlines."""
    if (
        not isinstance(names, (list, tuple))
        or not names
        or not all(isinstance(n, str) and n and "\n" not in n for n in names)
        or len(set(names)) != len(names)
    ):
        problem = "is invalid: it must be a non-empty list of distinct layer names (no newlines)."
        raise FieldError(field, problem, names, owner)
    return list(names)


def check_scores(scores: object, field: str, owner: str = "ILAConfig") -> dict[str, float]:
    """`scores` with float32 values, or a `FieldError` naming `owner.field` unless it maps layer names to numbers in
    [0, 1]."""
    if not isinstance(scores, Mapping) or not all(
        isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1
        for k, v in scores.items()
    ):
        raise FieldError(field, "is invalid: it must be a dict of layer name -> score in [0, 1].", scores, owner)
    return {name: as_float32(value) for name, value in scores.items()}


@dataclass(frozen=True)
class Selection:
    """The layers of a model that carry adapters, most important first.

    Attributes:
        candidates: every candidate layer of the model, in model order (what gates and masks index).
        selected: the layers that carry adapters, most important first; a subset of `candidates`.
        scores: layer -> score in [0, 1] (float32 values) for some or all candidates; empty when none is known.
        ranking: every candidate, most important first; default: `selected`, then the rest by score (ties and
            unscored layers in candidate order). Identification gives its own (ties broken by ||dW||).
        provenance: where the selection came from: `estimator`, `settings` (the config's run settings),
            `base_model` (see `model_identity`), `data` (a fingerprint of the batches identification read).
        confidence: layer -> how sure its membership (in or out of `selected`) is, in [0, 1]: the fraction of
            bootstrap resamples of the estimator's stage that agree; empty when unknown.
    """

    candidates: tuple[str, ...]
    selected: tuple[str, ...]
    scores: Mapping[str, float] = field(default_factory=dict)
    ranking: tuple[str, ...] = ()
    provenance: Mapping = field(default_factory=dict)
    confidence: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        candidates = tuple(check_layer_names(self.candidates, "candidates", "Selection"))
        selected = tuple(check_layer_names(self.selected, "selected", "Selection"))
        scores = check_scores(self.scores, "scores", "Selection")
        confidence = check_scores(self.confidence, "confidence", "Selection")
        _require_known(selected, candidates, "selected")
        _require_known(scores, candidates, "scores")
        _require_known(confidence, candidates, "confidence")
        rest = sorted(set(candidates) - set(selected), key=_by_score(scores, candidates))
        ranking = tuple(self.ranking) or (*selected, *rest)
        if sorted(ranking) != sorted(candidates) or ranking[: len(selected)] != selected:
            raise ValueError("Selection.ranking is invalid: it must order every candidate, the selected ones first.")
        normalised = {"candidates": candidates, "selected": selected, "scores": scores, "ranking": ranking}
        normalised["confidence"] = confidence
        for name, value in {**normalised, "provenance": dict(self.provenance)}.items():
            object.__setattr__(self, name, value)

    @classmethod
    def everything(cls, candidates: Sequence[str]) -> Selection:
        """Every candidate carries an adapter, nothing is scored: the probe state."""
        return cls(tuple(candidates), tuple(candidates))

    def top(self, k: int) -> Selection:
        """The best `k` layers of the ranking (a resolved count, see `resolve_top_k`)."""
        if not 1 <= k <= len(self.candidates):
            raise ValueError(f"top({k}): k must be in [1, {len(self.candidates)}].")
        confidence = self.confidence if k == len(self.selected) else {}  # it speaks of this top k only
        return Selection(self.candidates, self.ranking[:k], self.scores, self.ranking, self.provenance, confidence)

    def within(self, candidates: Sequence[str], k: int | None = None) -> Selection:
        """This selection on a candidate list (of this model, or another): its selected layers that exist there, or
        with `k` the best k of them by its ranking; `ValueError` when that leaves none."""
        here, known = set(candidates), set(self.candidates)
        ranked = [name for name in self.ranking if name in here]
        kept = tuple(ranked[:k] if k is not None else (name for name in self.selected if name in here))
        if not kept:
            raise ValueError("none of the selected layers is a candidate of this model")
        scores = {name: value for name, value in self.scores.items() if name in here}
        ranking = (*ranked, *(name for name in candidates if name not in known))
        same = tuple(candidates) == self.candidates and set(kept) == set(self.selected)
        return Selection(tuple(candidates), kept, scores, ranking, self.provenance, self.confidence if same else {})

    def certain(self, level: float = CERTAIN) -> list[str]:
        """The selected layers whose confidence is at least `level`."""
        return [name for name in self.selected if self.confidence.get(name, -1.0) >= level]

    def to_peft_config(self, config: PeftConfig) -> PeftConfig:
        """A copy of another peft method's config (LoRA, DoRA, AdaLoRA, IA³, VeRA, ...) that adapts exactly the
        selected layers. Its `target_modules` becomes a regular expression of their full names, which peft matches in
        full: no other module whose name merely ends the same way is adapted. The given `target_modules`, if a list
        of name suffixes, narrows the selection to those module types; for selected blocks it is required and says
        which modules of each block to adapt. `ValueError` when nothing would be adapted or the config cannot say it.
        """
        where = f"Selection.to_peft_config({type(config).__name__})"
        if not hasattr(config, "target_modules"):
            raise ValueError(f"{where}: this method does not target modules by name, so no selection applies to it.")
        if getattr(config, "layers_to_transform", None) is not None:
            raise ValueError(f"{where}: the selection says which layers to adapt; leave `layers_to_transform` None.")
        kinds = config.target_modules
        if isinstance(kinds, str) and kinds != "all-linear":
            raise ValueError(
                f"{where}: target_modules={kinds!r} is a regular expression; pass None, 'all-linear' or a list of "
                "module name suffixes (e.g. ['q_proj', 'v_proj']) to narrow the selection."
            )
        suffixes = None if kinds is None or kinds == "all-linear" else sorted(kinds)
        blocks = [name for name in self.selected if layer_of(name, "block") == name]
        of_kind = lambda name: suffixes is None or any(name == s or name.endswith("." + s) for s in suffixes)  # noqa: E731
        patterns = [re.escape(name) for name in self.selected if name not in blocks and of_kind(name)]
        if blocks:
            if suffixes is None:
                raise ValueError(
                    f"{where}: the selection is of blocks ({blocks[0]}, ...); name the modules of each block to adapt, "
                    "e.g. target_modules=['q_proj', 'v_proj', 'down_proj']."
                )
            within = "|".join(map(re.escape, suffixes))
            patterns.append(rf"(?:{'|'.join(map(re.escape, blocks))})\.(?:.*\.)?(?:{within})")
        if not patterns:
            raise ValueError(f"{where}: none of the {len(self.selected)} selected layers ends in one of {suffixes}.")
        adapted = copy.deepcopy(config)
        adapted.target_modules = "|".join(patterns)
        return adapted

    # --- the forms a selection is stored in ---------------------------------------------------------------------

    def config_fields(self) -> dict:
        """`ILAConfig` fields: `selected_layers`, `layer_scores`, `layer_confidence` (None when empty), `provenance`."""
        return {
            "selected_layers": list(self.selected),
            "layer_scores": dict(self.scores) or None,
            "layer_confidence": dict(self.confidence) or None,
            "provenance": dict(self.provenance) or None,
        }

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The mask tensors, confidence included (see the module docstring)."""
        chosen = set(self.selected)
        return {
            NAMES_KEY: torch.tensor(list("\n".join(self.candidates).encode("utf-8")), dtype=torch.uint8),
            MASK_KEY: torch.tensor([name in chosen for name in self.candidates], dtype=torch.bool),
            SCORES_KEY: _column(self.scores, self.candidates),
            CONFIDENCE_KEY: _column(self.confidence, self.candidates),
        }

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], provenance: Mapping | None = None) -> Selection:
        """Decode the mask tensors; `ValueError` naming the problem if they are missing or inconsistent. The
        ranking is by score (the tensors keep the selected set, not its order)."""
        missing = [key for key in MASK_KEYS if key not in tensors]
        if missing:
            raise ValueError(
                f"the adapter weights lack the ILA mask tensors {missing}: the file was not written by peft-ila or "
                "was altered; save the adapter again with peft-ila."
            )
        raw, mask, scores = (tensors[key].detach().cpu() for key in MASK_KEYS)
        if raw.dtype != torch.uint8 or raw.dim() != 1 or mask.dtype != torch.bool or mask.dim() != 1:
            raise ValueError(
                "the ILA mask tensors have the wrong dtype or shape; save the adapter again with peft-ila."
            )
        candidates = bytes(raw.tolist()).decode("utf-8").split("\n") if raw.numel() else []
        if not (len(candidates) == mask.numel() == scores.numel()):
            raise ValueError(
                f"the ILA mask tensors disagree: {len(candidates)} layer names, {mask.numel()} mask entries, "
                f"{scores.numel()} scores; the file is damaged, save the adapter again."
            )
        known = _known(candidates, scores)
        adapted = sorted(
            (n for n, keep in zip(candidates, mask.tolist(), strict=True) if keep), key=_by_score(known, candidates)
        )
        confidence = tensors.get(CONFIDENCE_KEY)
        if confidence is not None and confidence.numel() != len(candidates):
            raise ValueError("the ILA confidence tensor does not cover the candidate layers; save the adapter again.")
        confidence = {} if confidence is None else _known(candidates, confidence.detach().cpu())
        return cls(tuple(candidates), tuple(adapted), known, (), provenance or {}, confidence)

    def to_json(self) -> dict:
        """Plain JSON: candidates, selected, ranking, scores, confidence, provenance."""
        return {
            "candidates": list(self.candidates),
            "selected": list(self.selected),
            "ranking": list(self.ranking),
            "scores": dict(self.scores),
            "confidence": dict(self.confidence),
            "provenance": dict(self.provenance),
        }

    @classmethod
    def from_json(cls, record: Mapping) -> Selection:
        """Read `to_json`'s form (also a whole `importance.json` record; records older than provenance have none)."""
        return cls(
            tuple(record["candidates"]),
            tuple(record["selected"]),
            record.get("scores") or {},
            tuple(record.get("ranking") or ()),
            record.get("provenance") or {},
            record.get("confidence") or {},
        )

    def differences(self, other: Selection) -> list[str]:
        """What two forms of one selection disagree on (candidates, selected set, scores, confidence; exact, all
        float32); empty when they agree. Order within `selected` and provenance are not compared."""
        found = []
        if self.candidates != other.candidates:
            found.append(f"candidates ({len(self.candidates)} vs {len(other.candidates)} layers)")
        if set(self.selected) != set(other.selected):
            found.append(f"selected layers ({_few(sorted(set(self.selected) ^ set(other.selected)), 3)} differ)")
        if dict(self.scores) != dict(other.scores):
            found.append("scores")
        if dict(self.confidence) != dict(other.confidence):
            found.append("confidence")
        return found


def model_identity(model: nn.Module) -> dict:
    """What tells base models apart, the same for a plain model and one wrapped with ILA adapters: the class, a SHA-256
    of the parameter names and shapes (the architecture; a 4-bit weight counts with its unpacked shape, so a model
    and its quantized self share it), a sampled SHA-256 of the weights as loaded (`weights_sha256`) and one of their
    values rounded to bfloat16 (`values_sha256`: the same for a checkpoint loaded in float32 or bfloat16, or a
    bfloat16 one in float16). Compare two with `same_weights`."""
    named = list(_base_parameters(model))
    shapes = "".join(f"{name} {_unpacked_shape(p)}\n" for name, p in named)
    return {
        "class": type(_unwrapped(model)).__name__,
        "architecture_sha256": hashlib.sha256(shapes.encode()).hexdigest(),
        **dict(zip(("weights_sha256", "values_sha256"), _fingerprints(named), strict=True)),
    }


def same_weights(a: dict, b: dict) -> bool | None:
    """Whether two `model_identity` records are of the same weights, whatever dtype each was loaded in (by their
    `values_sha256`; records written before it by the exact `weights_sha256`); None if either has no fingerprint."""
    for key in ("values_sha256", "weights_sha256"):
        if key in a and key in b:
            return a[key] == b[key]
    return None


def _unpacked_shape(p: torch.Tensor) -> tuple[int, ...]:
    """The shape of the matrix a parameter holds: a bitsandbytes 4-bit weight keeps it in its `quant_state`."""
    state = getattr(p, "quant_state", None)
    return tuple(state.shape if state is not None else p.shape)


def weights_fingerprint(named: Iterable[tuple[str, torch.Tensor]], sample: int = 1024) -> str:
    """SHA-256 over the names, shapes, dtypes and first `sample` values of tensors: tells base models apart (another
    architecture, or other weights of the same one) without reading all of them."""
    return _fingerprints(named, sample)[0]


def _fingerprints(named: Iterable[tuple[str, torch.Tensor]], sample: int = 1024) -> tuple[str, str]:
    """`weights_fingerprint`, and the same with the values rounded to bfloat16 and the dtypes left out (so that a
    model loaded in float32 and in bfloat16 give the same), from one read of each tensor."""
    exact, rounded = hashlib.sha256(), hashlib.sha256()
    for name, tensor in named:
        raw = full(tensor.detach()).reshape(-1)[:sample].cpu()  # sharded: gathered (every rank)
        exact.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        exact.update(raw.contiguous().view(torch.uint8).numpy().tobytes())
        rounded.update(f"{name}{tuple(tensor.shape)}".encode())
        values = raw.to(torch.bfloat16) if raw.is_floating_point() else raw
        rounded.update(values.contiguous().view(torch.uint8).numpy().tobytes())
    return exact.hexdigest(), rounded.hexdigest()


def _unwrapped(model: nn.Module) -> nn.Module:
    """The model under a `PeftModel` or a tuner, or `model` itself."""
    if isinstance(getattr(model, "base_model", None), BaseTuner):  # a PeftModel
        model = model.base_model
    return model.model if isinstance(model, BaseTuner) else model


def _base_parameters(model: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    """The base model's parameters under their own names: adapters, gates and modules_to_save copies left out."""
    for name, p in _unwrapped(model).named_parameters():
        if ".ila_" in name or ".modules_to_save." in name:
            continue
        yield name.replace(".base_layer.", ".").replace(".original_module.", "."), p


def _column(values: Mapping[str, float], candidates: Sequence[str]) -> torch.Tensor:
    return torch.tensor([values.get(name, math.nan) for name in candidates], dtype=torch.float32)


def _known(candidates: Sequence[str], column: torch.Tensor) -> dict[str, float]:
    return {n: v for n, v in zip(candidates, column.tolist(), strict=True) if not math.isnan(v)}


def _by_score(scores: Mapping[str, float], candidates: Sequence[str]):
    order = {name: i for i, name in enumerate(candidates)}
    return lambda name: (-scores.get(name, -1.0), order[name])


def _require_known(names: Iterable[str], candidates: Sequence[str], what: str) -> None:
    known = set(candidates)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"Selection.{what} names {len(unknown)} layer(s) that are not candidates: {_few(unknown)}.")


def _few(names: Iterable[str], n: int = 5) -> str:
    names = list(names)
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")
