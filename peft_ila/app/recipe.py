"""A recipe is one value: how a fine-tune chooses its layers and what trains on them (`executor.run_recipe` runs
one). `MODES`: the recipes `peft-ila versus` compares; `INSIDE`: identification inside the fine-tune, `train`'s
default."""

from __future__ import annotations

from dataclasses import dataclass

# identification inside the fine-tune, scored by stage 1's update norms, its top 75% going on with their stage-1
# weights: the mode benchmarks/MODES.md found level with LoRA on all layers at no more wall time ("ILA inside, norms";
# nothing it measured beat LoRA-all); `train`'s default when it identifies inline, and `demo`'s
INSIDE = {"estimator": "update-norm", "top_k": 0.75, "keep_stage1_weights": True}
LAYERS = ("all", "identify", "inside")
METHODS = ("lora", "full")


@dataclass(frozen=True)
class Recipe:
    """How layers are chosen (`layers`): "all" candidates; "identify": identification first, then fresh adapters on
    its top `top_k`; "inside": identification inside the fine-tune (its stage 1 is the fine-tune's first steps,
    scored by `estimator`, the top `top_k` go on with their stage-1 weights; `train`'s default). What trains
    (`method`): "lora" adapters, or "full" weights of `active` blocks at a time re-drawn uniformly every `interval`
    steps (LISA). `label`: the recipe's name on a page."""

    label: str
    layers: str = "all"
    method: str = "lora"
    top_k: float = 1.0
    estimator: str | None = None
    active: int | None = None
    interval: int = 10

    def __post_init__(self) -> None:
        if self.layers not in LAYERS or self.method not in METHODS:
            raise ValueError(f"Recipe {self.label!r}: layers must be one of {LAYERS}, method one of {METHODS}.")
        if (self.method == "full") != (self.active is not None) or (self.method == "full" and self.layers != "all"):
            raise ValueError(f"Recipe {self.label!r}: full weights train as sampled blocks (`active`) of all layers.")

    @property
    def identifies(self) -> bool:
        return self.layers != "all"


MODES = {  # `peft-ila versus`'s recipes, by the name --modes takes
    "lora-all": Recipe("LoRA-all"),
    "inside": Recipe("ILA inside (train's default)", "inside", top_k=INSIDE["top_k"], estimator=INSIDE["estimator"]),
    "ila-75": Recipe("ILA top 75%, fresh adapters", "identify", top_k=0.75),
    "lisa": Recipe("LISA (2 blocks of full weights)", method="full", active=2),
}
