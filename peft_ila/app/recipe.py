"""A recipe is one value: how a fine-tune chooses its layers and what trains on them (`executor.run_recipe` runs
one). `MODES`: the recipes `peft-ila versus` compares; `INSIDE`: identification inside the fine-tune, `train`'s
default."""

from __future__ import annotations

from dataclasses import dataclass

from ..identification.peers import PEERS

# identification inside the fine-tune, scored by stage 1's update norms, its top 75% going on with their stage-1
# weights: the mode benchmarks/MODES.md found level with LoRA on all layers at no more wall time ("ILA inside, norms";
# nothing it measured beat LoRA-all); `train`'s default when it identifies inline, and `demo`'s
INSIDE = {"estimator": "update-norm", "top_k": 0.75, "keep_stage1_weights": True}
LAYERS = ("all", "identify", "inside", *PEERS)
METHODS = ("lora", "full")
RANKS = ("uniform", "importance")


@dataclass(frozen=True)
class Recipe:
    """How layers are chosen (`layers`): "all" candidates; "identify": identification first, then fresh adapters on
    its top `top_k`; "inside": identification inside the fine-tune (its stage 1 is the fine-tune's first steps,
    scored by `estimator`, the top `top_k` go on with their stage-1 weights; `train`'s default); a peer selector
    ("random", "kappa", "spectrum": `identification.peers`) picking `top_k` of them without training. What trains
    (`method`): "lora" adapters, or "full" weights of `active` blocks at a time re-drawn uniformly every `interval`
    steps (LISA). `ranks`: every adapter at the configured rank ("uniform"), or ("importance", after "identify" with
    `top_k` 1) each layer's rank from its importance within LoRA-all's trainable parameters, at most `rho` times
    the rank (`tuner.ranks.importance_lora_config`). `lr_scale`: the schedule's learning rate times this. `label`:
    the recipe's name on a page."""

    label: str
    layers: str = "all"
    method: str = "lora"
    top_k: float = 1.0
    estimator: str | None = None
    active: int | None = None
    interval: int = 10
    ranks: str = "uniform"
    rho: float = 2.0
    lr_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.layers not in LAYERS or self.method not in METHODS or self.ranks not in RANKS:
            raise ValueError(
                f"Recipe {self.label!r}: layers must be one of {LAYERS}, method one of {METHODS}, ranks one of {RANKS}."
            )
        if (self.method == "full") != (self.active is not None) or (self.method == "full" and self.layers != "all"):
            raise ValueError(f"Recipe {self.label!r}: full weights train as sampled blocks (`active`) of all layers.")
        if self.ranks == "importance" and (self.layers != "identify" or self.top_k != 1.0):
            raise ValueError(f"Recipe {self.label!r}: ranks from importance need layers 'identify' with top_k 1.0.")

    @property
    def identifies(self) -> bool:
        """Whether ILA's identification ranks the layers (separately or inside the fine-tune)."""
        return self.layers in ("identify", "inside")

    @property
    def selects(self) -> bool:
        """Whether the adapters go on a selection of the candidates rather than on every one (with uniform ranks)."""
        return self.layers != "all" and self.ranks == "uniform"


MODES = {  # `peft-ila versus`'s recipes, by the name --modes takes
    "lora-all": Recipe("LoRA-all"),
    "inside": Recipe("ILA inside (train's default)", "inside", top_k=INSIDE["top_k"], estimator=INSIDE["estimator"]),
    "ila-75": Recipe("ILA top 75%, fresh adapters", "identify", top_k=0.75),
    "lisa": Recipe("LISA (2 blocks of full weights)", method="full", active=2),
}
